"""OCR of one image, a multi-page document (TIFF, PDF) or a batch, in domain types. Knows nothing of HTTP."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from core.config import LimitsSettings
from core.deadline import deadline
from core.errors import ChatVLMError, DeadlineExceeded, InvalidParameter
from core.imaging import sniff_format
from core.types import CancelToken, Capability, OcrBlock, OcrResult

if TYPE_CHECKING:
    from llm.service import GenerationService
from models.adapter import OcrOptions
from models.manager import ModelManager
from models.selection import ModelSelector
from ocr.annotate import annotate
from ocr.formats import FORMATS, PAGE_SEPARATOR
from ocr.page_select import renumber, select_pdf_pages
from ocr.pages import Box, Document, ImageDecoder, Page, original_page, region_on, to_original

__all__ = ["BatchItem", "ImageDecoder", "OcrOutcome", "OcrService", "PageOutcome", "Upload"]


@dataclass
class PageOutcome:
    index: int                     # 0-based page of the upload
    text: str
    blocks: list[OcrBlock]         # in reading order, boxes in original page pixels
    image_size: tuple[int, int]    # the page's original size


@dataclass
class OcrOutcome:
    text: str                      # every page's text, joined
    model: str
    blocks: list[OcrBlock]
    image_size: tuple[int, int]    # the first page's original size
    pages: int
    processing_time: float
    language: str | None
    format: str = "text"
    page_results: list[PageOutcome] = field(default_factory=list)


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


@dataclass(frozen=True)
class OcrRequest:
    """What to read and how, beyond the model: output format and an optional region."""

    language: str | None = None
    format: str = "text"
    region: Box | None = None  # x1, y1, x2, y2 in original pixels, applied to every page

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InvalidParameter(f"format must be one of {', '.join(FORMATS)}", param="format",
                                   code="INVALID_FORMAT")
        r = self.region
        if r is not None and (len(r) != 4 or min(r) < 0 or r[2] <= r[0] or r[3] <= r[1]):
            raise InvalidParameter("region must be x1,y1,x2,y2 with 0 <= x1 < x2 and 0 <= y1 < y2",
                                   param="region", code="INVALID_REGION")


class OcrService:
    def __init__(self, selector: ModelSelector, manager: ModelManager, decoder: ImageDecoder,
                 limits: LimitsSettings, llm: "GenerationService") -> None:
        self.selector = selector
        self.manager = manager
        self.decoder = decoder
        self.limits = limits
        self.llm = llm

    async def ocr(self, data: bytes, *, model: str | None, language: str | None, format: str = "text",
                  region: Box | None = None, pages: list[int] | None = None) -> OcrOutcome:
        """Read every page of an image, multi-frame TIFF or PDF within the deadline (of a PDF,
        only ``pages`` when given: 0-based indices; other uploads ignore it)."""
        request = OcrRequest(language, format, region)
        model_id = self.selector.select(Capability.OCR, model, language)
        async with deadline(self.limits.request_timeout_s) as cancel:
            if pages is None or sniff_format(data) != "PDF":
                return await self._ocr(data, model_id, request, cancel)
            data = await asyncio.to_thread(select_pdf_pages, data, pages)
            return renumber(await self._ocr(data, model_id, request, cancel), pages)

    async def annotate(self, data: bytes, *, model: str | None, language: str | None, page: int = 0,
                       region: Box | None = None) -> bytes:
        """PNG of one page (original size) with the blocks the model found drawn on it."""
        request = OcrRequest(language, "json", region)
        model_id = self.selector.select(Capability.OCR, model, language)
        async with deadline(self.limits.request_timeout_s) as cancel:
            outcome, doc = await self._read(data, model_id, request, cancel, only_page=page)
            image = await original_page(self.decoder, data, doc, page)
        return await asyncio.to_thread(annotate, image, outcome.page_results[0].blocks)

    async def _ocr(self, data: bytes, model_id: str, request: OcrRequest, cancel: CancelToken) -> OcrOutcome:
        outcome, _ = await self._read(data, model_id, request, cancel)
        return outcome

    async def _read(self, data: bytes, model_id: str, request: OcrRequest, cancel: CancelToken,
                    only_page: int | None = None) -> tuple[OcrOutcome, Document]:
        started = time.perf_counter()
        entry = self.selector.entry(model_id)
        self.manager.check_capacity(model_id, cancel.deadline)  # a full queue: 503 before any decoding
        doc = await self.decoder.decode_pages(data, target_max_pixels=entry.spec.max_pixels, only_page=only_page)
        if request.region is not None and region_on(doc.pages[0], request.region) is None:
            raise InvalidParameter("region lies outside the image", param="region", code="INVALID_REGION")
        generative = Capability.GENERATE in entry.capabilities
        options = OcrOptions(language=request.language, format=request.format)
        # Pages are read concurrently, a few at a time: the model's runner (CPU engines) or the
        # engine's batching (generative models) does the rest, and one document cannot fill their queues.
        slots = asyncio.Semaphore(min(entry.spec.max_batch_size, 4) if generative else entry.spec.concurrency)

        async def one(index: int, page: Page) -> PageOutcome:
            async with slots:
                return await self._read_page(model_id, generative, page, index, options, request.region, cancel)

        try:
            async with asyncio.TaskGroup() as group:  # one page failing stops the others
                tasks = [group.create_task(one(doc.first_page + i, p)) for i, p in enumerate(doc.pages)]
        except BaseExceptionGroup as failed:  # callers see the page's own error, as for one image
            raise _first(failed) from None
        if cancel.cancelled:  # the engine stopped early: its partial text is not an answer
            raise DeadlineExceeded(f"not finished within {self.limits.request_timeout_s:g} s")
        pages = [t.result() for t in tasks]
        outcome = OcrOutcome(text=PAGE_SEPARATOR.join(p.text for p in pages if p.text), model=model_id,
                             blocks=[b for p in pages for b in p.blocks], image_size=doc.pages[0].original_size,
                             pages=len(pages), processing_time=time.perf_counter() - started,
                             language=request.language, format=request.format, page_results=pages)
        return outcome, doc

    async def _read_page(self, model_id: str, generative: bool, page: Page, index: int, options: OcrOptions,
                         region: Box | None, cancel: CancelToken) -> PageOutcome:
        box = region_on(page, region) if region is not None else None
        if region is not None and box is None:  # the region misses this page
            return PageOutcome(index, "", [], page.original_size)
        offset = (0, 0)
        if generative:  # a VLM reads through the generation engine with its own OCR prompt (and region mode)
            result = await self._ocr_by_prompt(model_id, page.image, replace(options, region=box), cancel)
        else:  # a CPU engine reads the crop; its boxes are shifted back onto the page
            image = page.image.crop(box) if box is not None else page.image
            offset = box[:2] if box is not None else offset
            result = await self.manager.run(model_id, "ocr", image, options, cancel=cancel)
        blocks = [to_original(b, page, index, offset) for b in result.blocks]
        return PageOutcome(index, result.text, blocks, page.original_size)

    async def _ocr_by_prompt(self, model_id: str, page, options: OcrOptions, cancel: CancelToken) -> OcrResult:
        """A generative model reads the page with its own OCR prompt, through the engine."""
        spec = self.selector.entry(model_id).spec
        params = replace(spec.generation, temperature=0.0)  # OCR is transcription: greedy
        if options.max_new_tokens:
            params = replace(params, max_new_tokens=options.max_new_tokens)
        params = replace(params, max_repeat=int(spec.options.get("max_repeat", 0)))
        remaining = (cancel.deadline - time.monotonic()) if cancel.deadline else None
        out, adapter = await self.llm.generate_with(model_id, lambda a: a.encode_ocr(page, options), params,
                                                    timeout_s=remaining)
        result = adapter.parse_ocr(out.text, page.size, options)
        result.model = model_id
        return result

    async def batch(self, uploads: list[Upload], *, model: str | None, language: str | None,
                    format: str = "text", region: Box | None = None) -> list[BatchItem]:
        """OCR every upload concurrently (the model's runner bounds the parallelism).

        One bad file becomes an error item; items not done by the deadline become
        DEADLINE_EXCEEDED items, and the others are still returned.
        """
        request = OcrRequest(language, format, region)
        model_id = self.selector.select(Capability.OCR, model, language)
        items = [BatchItem(u.filename) for u in uploads]

        async def one(item: BatchItem, upload: Upload, cancel: CancelToken) -> None:
            started = time.perf_counter()
            try:
                if upload.error is not None:
                    raise upload.error
                item.outcome = await self._ocr(upload.data, model_id, request, cancel)
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


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a (possibly nested) exception group."""
    exc = group.exceptions[0]
    return _first(exc) if isinstance(exc, BaseExceptionGroup) else exc
