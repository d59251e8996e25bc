"""OCR of one image, a multi-page document (TIFF, PDF) or a batch, in domain types. Knows nothing of HTTP."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from core import request_context
from core.config import LimitsSettings
from core.deadline import deadline
from core.errors import ChatVLMError, DeadlineExceeded, InvalidParameter
from core.types import CancelToken, Capability, OcrBlock, OcrResult

if TYPE_CHECKING:
    from llm.service import GenerationService
from models.adapter import OcrOptions
from models.manager import ModelManager
from models.selection import ModelSelector, Selection
from ocr.annotate import annotate
from ocr.document.adapter import vector_enabled
from ocr.document.pages import DocumentPages, text_layer_page
from ocr.document.reader import DocumentReader
from ocr.formats import FORMATS, PAGE_SEPARATOR
from ocr.pages import Box, Document, ImageDecoder, Page, PageOutcome, original_page, region_on, to_original

__all__ = ["BatchItem", "ImageDecoder", "OcrOutcome", "OcrService", "PageOutcome", "Upload"]


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
    requested_model: str | None = None   # set when another model served (routing.ocr_fallback)
    fallback_reason: str | None = None


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
    pages: list[int] | None = None  # 0-based pages to read (PDF, TIFF); None: all
    force_ocr: bool = False  # OCR PDF pages even when they carry a text layer

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
        self.documents = DocumentPages(DocumentReader(selector, manager))

    async def ocr(self, data: bytes, *, model: str | None, language: str | None, format: str = "text",
                  region: Box | None = None, pages: list[int] | None = None, force_ocr: bool = False) -> OcrOutcome:
        """Read every page (or the ``pages``) of an image, multi-frame TIFF or PDF within the deadline."""
        request = OcrRequest(language, format, region, pages, force_ocr)
        chosen = self.selector.resolve(Capability.OCR, model, language, format)
        request_context.note_model(chosen.model_id)
        async with deadline(self.limits.request_timeout_s) as cancel:
            outcome = await self._ocr(data, chosen.model_id, request, cancel)
        return _with_fallback(outcome, chosen)

    async def annotate(self, data: bytes, *, model: str | None, language: str | None, page: int = 0,
                       region: Box | None = None) -> tuple[bytes, Selection]:
        """PNG of one page (original size) with the blocks the model found drawn on it, and the
        model that drew them."""
        request = OcrRequest(language, "json", region)
        chosen = self.selector.resolve(Capability.OCR, model, language, "json")
        request_context.note_model(chosen.model_id)
        async with deadline(self.limits.request_timeout_s) as cancel:
            outcome, doc = await self._read(data, chosen.model_id, request, cancel, only_page=page)
            image = await original_page(self.decoder, data, doc, page)
        png = await asyncio.to_thread(annotate, image, outcome.page_results[0].blocks)
        return png, chosen

    async def _ocr(self, data: bytes, model_id: str, request: OcrRequest, cancel: CancelToken) -> OcrOutcome:
        outcome, _ = await self._read(data, model_id, request, cancel)
        return outcome

    async def _read(self, data: bytes, model_id: str, request: OcrRequest, cancel: CancelToken,
                    only_page: int | None = None) -> tuple[OcrOutcome, Document]:
        started = time.perf_counter()
        entry = self.selector.entry(model_id)
        self.manager.check_capacity(model_id, cancel.deadline)  # a full queue: 503 before any decoding
        generative = Capability.GENERATE in entry.capabilities
        # CPU models take a PDF page's text layer instead of OCR; generative ones read the pixels.
        text_layer = not generative and not request.force_ocr
        # A plain engine reads only the text layer of a page that has one: no need to render it
        # (unless a region must be checked against the page, or a page is drawn on).
        needs_pixels = Capability.LAYOUT in entry.capabilities or only_page is not None or request.region is not None
        doc = await self.decoder.decode_pages(data, target_max_pixels=entry.spec.max_pixels, only_page=only_page,
                                              pages=request.pages if only_page is None else None,
                                              text_layer=text_layer, render_text_pages=needs_pixels,
                                              structure=Capability.LAYOUT in entry.capabilities
                                              and vector_enabled(entry.spec.options)
                                              and only_page is None and request.region is None)
        if request.region is not None and region_on(doc.pages[0], request.region) is None:
            raise InvalidParameter("region lies outside the image", param="region", code="INVALID_REGION")
        options = OcrOptions(language=request.language, format=request.format)
        # Pages are read concurrently, a few at a time: the model's runner (CPU engines) or the
        # engine's batching (generative models) does the rest, and one document cannot fill their queues.
        slots = asyncio.Semaphore(min(entry.spec.max_batch_size, 4) if generative else entry.spec.concurrency)

        async def one(index: int, page: Page) -> PageOutcome:
            async with slots:
                return await self.read_page(model_id, page, index, options, request.region, cancel)

        try:
            async with asyncio.TaskGroup() as group:  # one page failing stops the others
                tasks = [group.create_task(one(doc.index_of(i), p)) for i, p in enumerate(doc.pages)]
        except BaseExceptionGroup as failed:  # callers see the page's own error, as for one image
            raise _first(failed) from None
        if cancel.cancelled:  # the engine stopped early: its partial text is not an answer
            raise DeadlineExceeded(f"not finished within {self.limits.request_timeout_s:g} s")
        pages = [t.result() for t in tasks]
        outcome = OcrOutcome(text=PAGE_SEPARATOR.join(p.text for p in pages if p.text), model=model_id,
                             blocks=[b for p in pages for b in p.blocks], image_size=pages[0].image_size,
                             pages=len(pages), processing_time=time.perf_counter() - started,
                             language=request.language, format=request.format, page_results=pages)
        return outcome, doc

    async def read_page(self, model_id: str, page: Page, index: int, options: OcrOptions, region: Box | None,
                        cancel: CancelToken) -> PageOutcome:
        """One page by the model: a layout pipeline, its text layer, a generative model or a CPU engine."""
        entry = self.selector.entry(model_id)
        if Capability.LAYOUT in entry.capabilities:
            return await self.documents.read_page(model_id, page, index, options, region, cancel)
        if page.text_lines is not None:
            return text_layer_page(page, index, region)
        return await self._read_page(model_id, Capability.GENERATE in entry.capabilities, page, index, options,
                                     region, cancel)

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
                    format: str = "text", region: Box | None = None, pages: list[int] | None = None,
                    force_ocr: bool = False) -> list[BatchItem]:
        """OCR every upload concurrently (the model's runner bounds the parallelism).

        One bad file becomes an error item; items not done by the deadline become
        DEADLINE_EXCEEDED items, and the others are still returned.
        """
        request = OcrRequest(language, format, region, pages, force_ocr)
        chosen = self.selector.resolve(Capability.OCR, model, language, format)
        model_id = chosen.model_id
        request_context.note_model(model_id)
        items = [BatchItem(u.filename) for u in uploads]

        async def one(item: BatchItem, upload: Upload, cancel: CancelToken) -> None:
            started = time.perf_counter()
            try:
                if upload.error is not None:
                    raise upload.error
                item.outcome = _with_fallback(await self._ocr(upload.data, model_id, request, cancel), chosen)
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


def _with_fallback(outcome: OcrOutcome, chosen: Selection) -> OcrOutcome:
    outcome.requested_model, outcome.fallback_reason = chosen.requested_model, chosen.fallback_reason
    return outcome


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a (possibly nested) exception group."""
    exc = group.exceptions[0]
    return _first(exc) if isinstance(exc, BaseExceptionGroup) else exc
