"""Page images: one page of an upload (a PDF page, a TIFF frame, an image) as PNG at its
original size, the pixels the OCR answer's boxes refer to. Clients that draw the boxes
themselves (the playground) show PDF and TIFF pages with it; browsers cannot."""
from __future__ import annotations

import asyncio
import io
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from PIL import Image

from ocr import pdf
from server.deps import ServicesDep
from server.schemas.vision import error_responses
from server.uploads import UploadRoute, read_upload, upload_form_limits

router = APIRouter(tags=["vision"], route_class=UploadRoute)

_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "headers": {"X-Page-Count": {"description": "Pages of a PDF (the playground sends long ones to "
                                                          "POST /jobs/ocr)", "schema": {"type": "integer"}}},
              "description": "The page at its original size (a PDF page as rendered at limits.pdf_dpi)"}}
_ACCEPTS = {"requestBody": {"content": {"multipart/form-data": {"encoding": {"file": {
    "contentType": "image/jpeg, image/png, image/bmp, image/tiff, application/pdf"}}}}}}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: the page is shown once, locally
    return buf.getvalue()


@router.post("/pages/render", response_class=Response, responses={**_PNG, **error_responses(400, 413, 415, 422)},
             form_limits=upload_form_limits(max_files=1), openapi_extra=_ACCEPTS)
async def render_page(services: ServicesDep,
                      file: Annotated[UploadFile, File(description="JPG, PNG, BMP or TIFF image, or a PDF document")],
                      page_q: Annotated[int | None, Query(alias="page", ge=0, le=100_000,
                                                          description="0-based page (PDF page or TIFF frame)")] = None,
                      page_f: Annotated[int | None, Form(alias="page", ge=0, le=100_000)] = None) -> Response:
    """One page of an image or PDF as PNG, at the size the OCR boxes refer to. No model runs."""
    limits = services.settings.limits
    data = await read_upload(file, limits.max_file_bytes, limits.max_file_mb)
    page = page_f if page_f is not None else (page_q or 0)
    doc = await services.decoder.decode_pages(data, target_max_pixels=None, only_page=page)
    png = await asyncio.to_thread(_png, doc.pages[0].image)
    headers = {"X-Page-Count": str(await asyncio.to_thread(pdf.page_count, data))} if doc.format == "PDF" else None
    return Response(content=png, media_type="image/png", headers=headers)
