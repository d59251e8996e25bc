"""Reading uploaded files with a size cap, and the model/language parameters that
seed 003 sends both as query parameters and as form fields."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Form, Query, UploadFile

from core.errors import PayloadTooLarge

CHUNK = 1024 * 1024


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


def _either(query: str | None, form: str | None) -> str | None:
    value = form if form not in (None, "") else query
    return value.strip() if value and value.strip() else None


def _model(model_q: Annotated[str | None, Query(alias="model", max_length=128,
                                                description="Model id (also accepted as a form field)")] = None,
           model_f: Annotated[str | None, Form(alias="model", max_length=128)] = None) -> str | None:
    return _either(model_q, model_f)


def _language(lang_q: Annotated[str | None, Query(alias="language", max_length=64,
                                                  description="Language hint, e.g. Russian, en, chi_sim")] = None,
              lang_f: Annotated[str | None, Form(alias="language", max_length=64)] = None) -> str | None:
    return _either(lang_q, lang_f)


ModelParam = Annotated[str | None, Depends(_model)]
LanguageParam = Annotated[str | None, Depends(_language)]
