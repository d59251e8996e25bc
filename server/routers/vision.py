"""Vision core surface (seed 003): OCR, chat about an image, and batch OCR."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from core.errors import BadRequest, PayloadTooLarge
from ocr.service import BatchItem, OcrOutcome, Upload
from server.deps import ServicesDep
from server.schemas.vision import (BatchItemResponse, BatchOcrResponse, Block, ChatResponse, ChatUsage,
                                   OcrResponse, error_responses)
from server.uploads import LanguageParam, ModelParam, filename_of, read_upload

router = APIRouter(tags=["vision"])

_OCR_ERRORS = error_responses(400, 404, 413, 415, 422, 503, 504)


def _blocks(outcome: OcrOutcome) -> list[Block]:
    return [Block(text=b.text, box=list(b.box) if b.box else None, confidence=b.confidence,
                  category=b.category, page=b.page) for b in outcome.blocks]


@router.post("/ocr", response_model=OcrResponse, responses=_OCR_ERRORS)
async def ocr(services: ServicesDep, file: Annotated[UploadFile, File(description="JPG, PNG, BMP or TIFF image")],
              model: ModelParam, language: LanguageParam) -> OcrResponse:
    """Extract the text of an image. With no model, the first installed OCR model that reads the language serves."""
    limits = services.settings.limits
    data = await read_upload(file, limits.max_file_bytes, limits.max_file_mb)
    outcome = await services.ocr.ocr(data, model=model, language=language)
    return OcrResponse(text=outcome.text, model=outcome.model, processing_time=round(outcome.processing_time, 3),
                       image_size=list(outcome.image_size), language=outcome.language, pages=outcome.pages,
                       blocks=_blocks(outcome))


@router.post("/chat", response_model=ChatResponse, responses=_OCR_ERRORS)
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


@router.post("/batch/ocr", response_model=BatchOcrResponse, responses=_OCR_ERRORS)
async def batch_ocr(services: ServicesDep, files: Annotated[list[UploadFile], File(description="Up to 10 images")],
                    model: ModelParam, language: LanguageParam) -> BatchOcrResponse:
    """OCR several images at once. A bad file becomes an error item; the others still succeed."""
    limits = services.settings.limits
    if len(files) > limits.max_batch_files:
        for f in files:
            await f.close()
        raise BadRequest(f"at most {limits.max_batch_files} files per batch, got {len(files)}",
                         param="files", code="TOO_MANY_FILES")
    started = time.perf_counter()
    uploads = []
    for f in files:
        try:
            uploads.append(Upload(filename_of(f), await read_upload(f, limits.max_file_bytes, limits.max_file_mb)))
        except PayloadTooLarge as exc:  # one oversized file fails alone, not the batch
            uploads.append(Upload(filename_of(f), b"", error=exc))
    items = await services.ocr.batch(uploads, model=model, language=language)
    results = [_item(i) for i in items]
    ok = sum(r.status == "success" for r in results)
    return BatchOcrResponse(results=results, total=len(results), successful=ok, failed=len(results) - ok,
                            model=next((r.model for r in results if r.model), None),
                            processing_time=round(time.perf_counter() - started, 3))


def _item(item: BatchItem) -> BatchItemResponse:
    if item.outcome is None:
        err = item.error
        return BatchItemResponse(filename=item.filename, status="error", processing_time=round(item.processing_time, 3),
                                 error=err.message if err else "failed", code=err.code if err else "FAILED")
    o = item.outcome
    return BatchItemResponse(filename=item.filename, status="success", text=o.text, model=o.model,
                             processing_time=round(item.processing_time, 3), image_size=list(o.image_size),
                             blocks=_blocks(o))
