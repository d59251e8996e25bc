"""Upload routes: multipart only (415 otherwise, before the body is read), capped part
counts, files read with a size cap, and the model/language parameters that seed 003 sends
both as query parameters and as form fields."""
from __future__ import annotations

from contextlib import aclosing
from typing import Annotated, Any, Callable, Coroutine

from fastapi import Depends, Form, Query, Request, Response, UploadFile
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from core.errors import PayloadTooLarge, UnsupportedMediaType

CHUNK = 1024 * 1024
# Non-file form fields an upload route may carry (model, language, format, region, page,
# prompt, temperature, max_tokens and a few spare): more is refused while parsing (400).
MAX_FORM_FIELDS = 16


def upload_form_limits(max_files: int) -> dict[str, int]:
    """Per-route multipart caps: the parser stops with 400 at the first part past them."""
    return {"max_files": max_files, "max_fields": MAX_FORM_FIELDS}


class _FilePartsParser(MultiPartParser):
    """Starlette's parser, but a part that declares a non-text Content-Type is a file even
    without a filename (RFC 7578 makes the filename optional; aiohttp's FormData sends bytes
    that way), instead of a text field whose bytes would be decoded and lost."""

    def on_headers_finished(self) -> None:
        part = self._current_part
        ctype = next((v for k, v in part.item_headers if k == b"content-type"), b"").strip().lower()
        if ctype and not ctype.startswith(b"text/") and b"filename" not in parse_options_header(
                part.content_disposition)[1]:
            part.content_disposition += b'; filename=""'
        super().on_headers_finished()


class _UploadRequest(Request):
    """A request whose form is parsed by ``_FilePartsParser`` (the route already checked that
    the body is multipart), with the same part caps and 400 answers as Starlette's."""

    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024) -> FormData:
        if self._form is None:
            try:
                async with aclosing(self.stream()) as stream:
                    parser = _FilePartsParser(self.headers, stream, max_files=max_files, max_fields=max_fields,
                                              max_part_size=max_part_size)
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(status_code=400, detail=exc.message) from None
        return self._form


class UploadRoute(APIRoute):
    """A route that takes multipart/form-data only: any other body (url-encoded, JSON, raw
    bytes, none) is refused with 415 before a byte of it is read."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def multipart_only(request: Request) -> Response:
            ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "multipart/form-data":
                raise UnsupportedMediaType(
                    "this endpoint takes multipart/form-data uploads (curl -F file=@image.png), not "
                    + (f"'{ctype[:60]}'" if ctype else "a body without a Content-Type"),
                    code="MULTIPART_REQUIRED")
            return await handler(_UploadRequest(request.scope, request.receive, request._send))

        return multipart_only


async def read_upload(file: UploadFile, max_bytes: int, max_mb: float) -> bytes:
    """Read the whole file, stopping with 413 as soon as it passes ``max_bytes``."""
    parts: list[bytes] = []
    size = 0
    try:
        while chunk := await file.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"file '{_safe_name(file)}' is larger than {max_mb:g} MB",
                                      param="file", code="FILE_TOO_LARGE")
            parts.append(chunk)
    finally:
        await file.close()
    return b"".join(parts)


def _safe_name(file: UploadFile) -> str:
    name = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:100]


def filename_of(file: UploadFile) -> str:
    return _safe_name(file)


def form_or_query(query: str | None, form: str | None) -> str | None:
    """A parameter seed 003 takes as a form field or a query parameter: the form field wins;
    an empty value means "not given"."""
    value = form if form not in (None, "") else query
    return value or None


def _either(query: str | None, form: str | None) -> str | None:
    value = form_or_query(query, form)
    return value.strip() or None if value else None


async def _model(model_q: Annotated[str | None, Query(alias="model", max_length=128,
                                                description="Model id (also accepted as a form field)")] = None,
           model_f: Annotated[str | None, Form(alias="model", max_length=128)] = None) -> str | None:
    return _either(model_q, model_f)


async def _language(lang_q: Annotated[str | None, Query(alias="language", max_length=64,
                                                  description="Language hint, e.g. Russian, en, chi_sim")] = None,
              lang_f: Annotated[str | None, Form(alias="language", max_length=64)] = None) -> str | None:
    return _either(lang_q, lang_f)


ModelParam = Annotated[str | None, Depends(_model)]
LanguageParam = Annotated[str | None, Depends(_language)]
