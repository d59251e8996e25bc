"""OCR of one image or a batch, in domain types. Knows nothing of HTTP."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from core.config import LimitsSettings
from core.deadline import deadline
from core.errors import ChatVLMError, DeadlineExceeded, PayloadTooLarge
from core.imaging import DecodedImage, decode_image
from core.types import CancelToken, Capability, OcrBlock, OcrResult

if TYPE_CHECKING:
    from llm.service import GenerationService
from models.adapter import OcrOptions
from models.manager import ModelManager
from models.selection import ModelSelector

PAGE_SEPARATOR = "\n\n"


@dataclass
class OcrOutcome:
    text: str
    model: str
    blocks: list[OcrBlock]
    image_size: tuple[int, int]
    pages: int
    processing_time: float
    language: str | None


@dataclass
class BatchItem:
    filename: str
    outcome: OcrOutcome | None = None
    error: ChatVLMError | None = None
    processing_time: float = 0.0


@dataclass
class Upload:
    filename: str
    data: bytes
    error: ChatVLMError | None = None  # set when the upload itself was refused (e.g. too large)


class ImageDecoder:
    """Decodes uploads on worker threads, a bounded number at a time."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.decode_concurrency)

    async def decode(self, data: bytes, *, target_max_pixels: int | None, all_frames: bool) -> DecodedImage:
        if len(data) > self.limits.max_file_bytes:
            raise PayloadTooLarge(f"file is larger than {self.limits.max_file_mb:g} MB", param="file",
                                  code="FILE_TOO_LARGE")
        async with self._slots:
            return await asyncio.to_thread(
                decode_image, data, allowed_formats=tuple(self.limits.allowed_formats),
                max_pixels=self.limits.max_image_pixels, max_frames=self.limits.max_image_frames,
                target_max_pixels=target_max_pixels, all_frames=all_frames)


class OcrService:
    def __init__(self, selector: ModelSelector, manager: ModelManager, decoder: ImageDecoder,
                 limits: LimitsSettings, llm: "GenerationService") -> None:
        self.selector = selector
        self.manager = manager
        self.decoder = decoder
        self.limits = limits
        self.llm = llm

    async def ocr(self, data: bytes, *, model: str | None, language: str | None) -> OcrOutcome:
        """Read the text of one image (every frame of a multi-frame TIFF) within the deadline."""
        model_id = self.selector.select(Capability.OCR, model, language)
        async with deadline(self.limits.request_timeout_s) as cancel:
            return await self._ocr(data, model_id, language, cancel)

    async def _ocr(self, data: bytes, model_id: str, language: str | None, cancel: CancelToken) -> OcrOutcome:
        started = time.perf_counter()
        spec = self.selector.entry(model_id).spec
        image = await self.decoder.decode(data, target_max_pixels=spec.max_pixels, all_frames=True)
        options = OcrOptions(language=language)
        texts: list[str] = []
        blocks: list[OcrBlock] = []
        generative = Capability.GENERATE in self.selector.entry(model_id).capabilities
        for page_no, page in enumerate(image.pages):
            if generative:  # a VLM reads through the generation engine, prompted for OCR
                result = await self._ocr_by_prompt(model_id, page, options, cancel)
            else:
                result = await self.manager.run(model_id, "ocr", page, options, cancel=cancel)
            if cancel.cancelled:  # the engine stopped early: its partial text is not an answer
                raise DeadlineExceeded(f"not finished within {self.limits.request_timeout_s:g} s")
            texts.append(result.text)
            blocks.extend(_to_original(b, image.scale, page_no) for b in result.blocks)
        return OcrOutcome(text=PAGE_SEPARATOR.join(t for t in texts if t), model=model_id, blocks=blocks,
                          image_size=image.original_size, pages=len(image.pages),
                          processing_time=time.perf_counter() - started, language=language)

    async def _ocr_by_prompt(self, model_id: str, page, options: OcrOptions, cancel: CancelToken) -> OcrResult:
        """A generative model reads the page with its own OCR prompt, through the engine."""
        spec = self.selector.entry(model_id).spec
        params = replace(spec.generation, temperature=0.0)  # OCR is transcription: greedy
        if options.max_new_tokens:
            params = replace(params, max_new_tokens=options.max_new_tokens)
        remaining = (cancel.deadline - time.monotonic()) if cancel.deadline else None
        out, adapter = await self.llm.generate_with(model_id, lambda a: a.encode_ocr(page, options), params,
                                                    timeout_s=remaining)
        result = adapter.parse_ocr(out.text, page.size, options)
        result.model = model_id
        return result

    async def batch(self, uploads: list[Upload], *, model: str | None, language: str | None) -> list[BatchItem]:
        """OCR every upload concurrently (the model's runner bounds the parallelism).

        One bad file becomes an error item; items not done by the deadline become
        DEADLINE_EXCEEDED items, and the others are still returned.
        """
        model_id = self.selector.select(Capability.OCR, model, language)
        items = [BatchItem(u.filename) for u in uploads]

        async def one(item: BatchItem, upload: Upload, cancel: CancelToken) -> None:
            started = time.perf_counter()
            try:
                if upload.error is not None:
                    raise upload.error
                item.outcome = await self._ocr(upload.data, model_id, language, cancel)
            except ChatVLMError as exc:
                item.error = exc
            finally:
                item.processing_time = time.perf_counter() - started

        cancel = CancelToken(deadline=time.monotonic() + self.limits.request_timeout_s)
        tasks = [asyncio.create_task(one(i, u, cancel)) for i, u in zip(items, uploads)]
        try:
            _, pending = await asyncio.wait(tasks, timeout=self.limits.request_timeout_s)
        finally:  # deadline passed or the client left: stop the model work of the rest
            if any(not t.done() for t in tasks):
                cancel.cancel()
                for task in tasks:
                    task.cancel()
        for item, task in zip(items, tasks):
            if task in pending:
                item.error = DeadlineExceeded(f"not finished within {self.limits.request_timeout_s:g} s")
            elif task.exception() is not None:  # a bug, not the client's fault: let it surface
                raise task.exception()
        return items


def _to_original(block: OcrBlock, scale: float, page: int) -> OcrBlock:
    box = block.box
    if box is not None and scale != 1.0:
        box = tuple(int(round(v * scale)) for v in box)
    return replace(block, box=box, page=page)
