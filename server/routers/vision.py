"""Vision core surface (seed 003): OCR, chat about an image, and batch OCR."""
from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from core.errors import InvalidParameter, PayloadTooLarge
from ocr import formats
from ocr.page_ranges import parse_pages
from ocr.service import BatchItem, OcrOutcome, Upload
from server.deps import ServicesDep
from server.schemas.vision import (BatchItemResponse, BatchOcrResponse, Block, ChatResponse, ChatUsage,
                                   OcrResponse, PageResult, error_responses)
from server.uploads import (LanguageParam, ModelParam, UploadRoute, filename_of, form_or_query, read_upload,
                             upload_form_limits)

# Every route here takes a multipart upload: other bodies get 415 before they are read.
# One file per request except /batch/ocr, whose file cap is the app's (limits.max_batch_files).
router = APIRouter(tags=["vision"], route_class=UploadRoute)
_ONE_FILE = upload_form_limits(max_files=1)


def _accepts(part: str, *, pdf: bool, text: tuple[str, ...] = ("language",)) -> dict:
    """OpenAPI: the media types a file part may hold (the server sniffs the bytes; the
    limits.allowed_formats filter and the size caps are applied in server/openapi.py), and
    the free-text parts, which are plain text whatever they look like."""
    types = "image/jpeg, image/png, image/bmp, image/tiff" + (", application/pdf" if pdf else "")
    encoding = {part: {"contentType": types}} | {name: {"contentType": "text/plain"} for name in text}
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": encoding}}}}

_OCR_ERRORS = error_responses(400, 404, 413, 415, 422, 502, 503, 504)
# Set when the named model is not installed and another served (routing.ocr_fallback).
FALLBACK_HEADER = {"X-Model-Fallback": {"description": "'<requested>; served-by=<model>; reason=<why>' when the "
                                        "named OCR model is not installed and the default route served",
                                        "schema": {"type": "string"}}}
_OCR_OK = {200: {"headers": FALLBACK_HEADER}}
_FILE_DOC = "JPG, PNG, BMP or TIFF image, or a PDF document"


# ---- format, region and page: query parameters or form fields, like model and language ----
# The schema states exactly what the parsers accept (an empty value means "not given").
_NUM = "([0-9]{1,9}(?:[.][0-9]{1,6})?)"
REGION_PATTERN = rf"^$|^ *[\[(]? *{_NUM} *, *{_NUM} *, *{_NUM} *, *{_NUM} *[\])]? *$"
_REGION_RE = re.compile(REGION_PATTERN)


_FORMAT_DOC = {"description": "text (default), markdown or json", "json_schema_extra": {"enum": [*formats.FORMATS, ""]}}
_REGION_DOC = {"description": "x1,y1,x2,y2 in original pixels: read only this box",
               "json_schema_extra": {"pattern": REGION_PATTERN}}


async def _format(q: Annotated[str | None, Query(alias="format", max_length=16, **_FORMAT_DOC)] = None,
            f: Annotated[str | None, Form(alias="format", max_length=16, **_FORMAT_DOC)] = None) -> str:
    value = form_or_query(q, f) or "text"
    if value not in formats.FORMATS:
        raise InvalidParameter(f"format must be one of {', '.join(formats.FORMATS)}", param="format", code="INVALID_FORMAT")
    return value


async def _region(q: Annotated[str | None, Query(alias="region", max_length=100, **_REGION_DOC)] = None,
            f: Annotated[str | None, Form(alias="region", max_length=100, **_REGION_DOC)] = None
            ) -> tuple[int, int, int, int] | None:
    value = form_or_query(q, f)
    if value is None:
        return None
    m = _REGION_RE.match(value)
    if m is None or m.lastindex != 4:
        raise InvalidParameter("region must be four numbers: x1,y1,x2,y2", param="region", code="INVALID_REGION")
    return tuple(int(round(float(v))) for v in m.groups())  # type: ignore[return-value]


async def _page(q: Annotated[int | None, Query(alias="page", ge=0, le=100_000,
                                         description="0-based page (PDF page or TIFF frame) to draw")] = None,
          f: Annotated[int | None, Form(alias="page", ge=0, le=100_000)] = None) -> int:
    return f if f is not None else (q or 0)


_PAGES_DOC = {"description": "1-based pages and ranges of a PDF or TIFF to read, e.g. 1-3,7 (default: all)",
              "json_schema_extra": {"pattern": r"^$|^ *[0-9]{1,6}( *- *[0-9]{1,6})? *(, *[0-9]{1,6}( *- *[0-9]{1,6})? *)*$"}}


async def _pages(q: Annotated[str | None, Query(alias="pages", max_length=200, **_PAGES_DOC)] = None,
                 f: Annotated[str | None, Form(alias="pages", max_length=200, **_PAGES_DOC)] = None) -> list[int] | None:
    return parse_pages(form_or_query(q, f))


_FORCE_DOC = {"description": "OCR PDF pages even when they carry a text layer (default false)"}


async def _force_ocr(q: Annotated[bool | None, Query(alias="force_ocr", **_FORCE_DOC)] = None,
                     f: Annotated[bool | None, Form(alias="force_ocr", **_FORCE_DOC)] = None) -> bool:
    return bool(f if f is not None else q)


PagesParam = Annotated[list[int] | None, Depends(_pages)]
ForceOcrParam = Annotated[bool, Depends(_force_ocr)]
FormatParam = Annotated[str, Depends(_format)]
RegionParam = Annotated[tuple[int, int, int, int] | None, Depends(_region)]
PageParam = Annotated[int, Depends(_page)]


def _block(b, order: int) -> Block:
    return Block(**formats.block_dict(b, order))


def _blocks(outcome: OcrOutcome) -> list[Block]:
    return [Block(**d) for d in formats.blocks_json(outcome.blocks)]


def _structured(o: OcrOutcome) -> dict:
    """The fields that depend on the format and the page count."""
    pages = None
    if o.pages > 1 or o.format == "json":
        pages = [PageResult(page=p.index, text=p.text, image_size=list(p.image_size),
                            blocks=[_block(b, i) for i, b in enumerate(p.blocks)]) for p in o.page_results]
    return {"pages": o.pages, "page_results": pages,
            "markdown": formats.document_markdown(o) if o.format == "markdown" else None}


def ocr_response(o: OcrOutcome) -> OcrResponse:
    """The /ocr answer for an outcome; the job result and the CLI's in-process output use it too."""
    return OcrResponse(text=o.text, model=o.model, processing_time=round(o.processing_time, 3),
                       image_size=list(o.image_size), language=o.language, blocks=_blocks(o), format=o.format,
                       requested_model=o.requested_model, fallback_reason=o.fallback_reason, **_structured(o))


@router.post("/ocr", response_model=OcrResponse, responses=_OCR_OK | _OCR_ERRORS, form_limits=_ONE_FILE,
             openapi_extra=_accepts("file", pdf=True))
async def ocr(services: ServicesDep, file: Annotated[UploadFile, File(description=_FILE_DOC)],
              model: ModelParam, language: LanguageParam, format: FormatParam, region: RegionParam,
              pages: PagesParam, force_ocr: ForceOcrParam, response: Response) -> OcrResponse:
    """Extract the text of an image or of every page of a PDF. With no model, the first installed OCR
    model that reads the language serves. `format` adds markdown or per-page JSON blocks."""
    limits = services.settings.limits
    data = await read_upload(file, limits.max_file_bytes, limits.max_file_mb)
    outcome = await services.ocr.ocr(data, model=model, language=language, format=format, region=region,
                                     pages=pages, force_ocr=force_ocr)
    mark_fallback(response, outcome.model, outcome.requested_model, outcome.fallback_reason)
    return ocr_response(outcome)


_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "headers": FALLBACK_HEADER,
              "description": "The page (original size) with the blocks' boxes drawn, numbered in reading order"}}


@router.post("/ocr/annotate", response_class=Response, responses={**_PNG, **_OCR_ERRORS}, form_limits=_ONE_FILE,
             openapi_extra=_accepts("file", pdf=True))
async def ocr_annotate(services: ServicesDep, file: Annotated[UploadFile, File(description=_FILE_DOC)],
                       model: ModelParam, language: LanguageParam, region: RegionParam, page: PageParam) -> Response:
    """OCR one page and answer it as a PNG with each block's box drawn (coloured by category) and
    numbered by its reading order, as in the `format=json` answer."""
    limits = services.settings.limits
    data = await read_upload(file, limits.max_file_bytes, limits.max_file_mb)
    png, chosen = await services.ocr.annotate(data, model=model, language=language, page=page, region=region)
    out = Response(content=png, media_type="image/png")
    mark_fallback(out, chosen.model_id, chosen.requested_model, chosen.fallback_reason)
    return out


@router.post("/chat", response_model=ChatResponse, responses=_OCR_ERRORS, form_limits=_ONE_FILE,
             openapi_extra=_accepts("file", pdf=False, text=("prompt",)))
async def chat(services: ServicesDep, file: Annotated[UploadFile, File(description="The image to talk about")],
               model: ModelParam,
               prompt: Annotated[str | None, Form(max_length=8000, description="Question (default: Describe this image)")] = None,
               temperature: Annotated[float | None, Form(ge=0.0, le=2.0, description="0 means greedy")] = None,
               max_tokens: Annotated[int | None, Form(ge=1, le=8192)] = None) -> ChatResponse:
    """Ask a vision-language model about an image."""
    limits = services.settings.limits
    data = await read_upload(file, limits.max_file_bytes, limits.max_file_mb)
    out = await services.chat.chat(data, prompt=prompt, model=model, temperature=temperature, max_tokens=max_tokens)
    u = out.result.usage
    return ChatResponse(response=out.response, model=out.model, processing_time=round(out.processing_time, 3),
                        prompt=out.prompt, image_size=list(out.image_size) if out.image_size else None,
                        finish_reason=out.result.finish_reason,
                        usage=ChatUsage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                        total_tokens=u.total_tokens))


@router.post("/batch/ocr", response_model=BatchOcrResponse, responses=_OCR_OK | _OCR_ERRORS,
             openapi_extra=_accepts("files", pdf=True))
async def batch_ocr(services: ServicesDep,
                    files: Annotated[list[UploadFile], File(description="Up to 10 images or PDFs")],
                    model: ModelParam, language: LanguageParam, format: FormatParam,
                    region: RegionParam, pages: PagesParam, force_ocr: ForceOcrParam,
                    response: Response) -> BatchOcrResponse:
    """OCR several images or PDFs at once. A bad file becomes an error item; the others still succeed."""
    limits = services.settings.limits  # the parser already refused more than limits.max_batch_files files
    started = time.perf_counter()
    uploads = []
    for f in files:
        try:
            uploads.append(Upload(filename_of(f), await read_upload(f, limits.max_file_bytes, limits.max_file_mb)))
        except PayloadTooLarge as exc:  # one oversized file fails alone, not the batch
            uploads.append(Upload(filename_of(f), b"", error=exc))
    items = await services.ocr.batch(uploads, model=model, language=language, format=format, region=region,
                                     pages=pages, force_ocr=force_ocr)
    results = [_item(i) for i in items]
    ok = sum(r.status == "success" for r in results)
    served = next((i.outcome for i in items if i.outcome is not None), None)
    requested, reason = (served.requested_model, served.fallback_reason) if served else (None, None)
    if served is not None:
        mark_fallback(response, served.model, requested, reason)
    return BatchOcrResponse(results=results, total=len(results), successful=ok, failed=len(results) - ok,
                            model=next((r.model for r in results if r.model), None),
                            processing_time=round(time.perf_counter() - started, 3),
                            requested_model=requested, fallback_reason=reason)


def mark_fallback(response: Response, served: str, requested: str | None, reason: str | None) -> None:
    """X-Model-Fallback: the named model, the one that served and why, when they differ."""
    if requested is None:
        return
    value = f"{requested}; served-by={served}; reason={reason or 'not installed'}"
    # Header values are latin-1: keep them ASCII whatever a weights path holds.
    response.headers["X-Model-Fallback"] = value.encode("ascii", "backslashreplace").decode("ascii")


def _item(item: BatchItem) -> BatchItemResponse:
    if item.outcome is None:
        err = item.error
        return BatchItemResponse(filename=item.filename, status="error", processing_time=round(item.processing_time, 3),
                                 error=err.message if err else "failed", code=err.code if err else "FAILED")
    o = item.outcome
    return BatchItemResponse(filename=item.filename, status="success", text=o.text, model=o.model,
                             processing_time=round(item.processing_time, 3), image_size=list(o.image_size),
                             blocks=_blocks(o), **_structured(o))
