"""The page model shared by images, multi-frame TIFFs and PDFs, and the decoding of uploads into it.

A document is a list of pages. Each page holds the image the model reads (scaled to the
model's pixel budget) and its original size: the upload's pixels as displayed for an
image, the rendering at ``limits.pdf_dpi`` for a PDF page. Boxes and regions are in
original pixels; ``Page.scale`` converts from the model's pixels.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from core.config import LimitsSettings
from core.errors import InvalidParameter, Overloaded, PayloadTooLarge
from core.imaging import DecodedImage, decode_image, sniff_format
from core.types import OcrBlock
from ocr import pdf

Box = tuple[int, int, int, int]


@dataclass
class Page:
    image: Image.Image              # what the model reads
    original_size: tuple[int, int]  # what the client's coordinates refer to
    index: int | None = None        # 0-based page of the upload (None: pages[i] is page first_page + i)
    # A PDF page's embedded text as (text, box in original pixels), when it has a text layer.
    text_lines: list[tuple[str, Box]] | None = None
    # Its structure from the PDF's own objects (ocr/document/vector.py): the layout model's fast path.
    structure: Any = None

    @property
    def scale(self) -> float:
        """Original pixels per model pixel."""
        return self.original_size[0] / self.image.width


@dataclass
class Document:
    pages: list[Page]
    format: str            # "PDF", "PNG", "TIFF", ...
    first_page: int = 0    # index of pages[0] in the source (non-zero when one page was asked for)

    def index_of(self, i: int) -> int:
        """The 0-based page of the upload that pages[i] is."""
        page = self.pages[i]
        return page.index if page.index is not None else self.first_page + i


@dataclass
class PageOutcome:
    index: int                     # 0-based page of the upload
    text: str
    blocks: list[OcrBlock]         # in reading order, boxes in original page pixels
    image_size: tuple[int, int]    # the page's original size (upright, for a page the pipeline turned)


class ImageDecoder:
    """Decodes uploads on worker threads, a bounded number at a time, behind a bounded queue:
    past ``limits.decode_queue`` waiting uploads, a new one gets 503 at once."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.decode_concurrency)
        self.waiting = 0

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.waiting >= self.limits.decode_queue:
            raise Overloaded("image decoding is at capacity; retry shortly", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.limits.max_file_bytes:
            raise PayloadTooLarge(f"file is larger than {self.limits.max_file_mb:g} MB", param="file",
                                  code="FILE_TOO_LARGE")

    async def decode(self, data: bytes, *, target_max_pixels: int | None, all_frames: bool) -> DecodedImage:
        """An image upload (never a PDF) as RGB pages."""
        self._check_size(data)
        async with self._slot():
            return await asyncio.to_thread(
                decode_image, data, allowed_formats=tuple(self.limits.allowed_formats),
                max_pixels=self.limits.max_image_pixels, max_frames=self.limits.max_image_frames,
                target_max_pixels=target_max_pixels, all_frames=all_frames)

    async def decode_pages(self, data: bytes, *, target_max_pixels: int | None,
                           only_page: int | None = None, pages: list[int] | None = None,
                           text_layer: bool = False, max_pages: int | None = None,
                           render_text_pages: bool = True, structure: bool = False) -> Document:
        """An image, multi-frame TIFF or (when allowed) PDF upload as a document of pages: all of
        them, ``only_page``, or the 0-based ``pages`` (a page range); with ``text_layer``, PDF pages
        carry their embedded text."""
        self._check_size(data)
        if sniff_format(data) == "PDF" and "PDF" in self.limits.allowed_formats:
            async with self._slot():
                rendered = await asyncio.to_thread(
                    pdf.render_pdf, data, dpi=self.limits.pdf_dpi, max_pages=max_pages or self.limits.max_pdf_pages,
                    max_pixels=self.limits.max_image_pixels, target_max_pixels=target_max_pixels,
                    only_page=only_page, pages=pages, text_layer=text_layer, render_text_pages=render_text_pages,
                    structure=structure)
            return Document([Page(r.image, r.original_size, r.index, r.text_lines, r.structure) for r in rendered], "PDF",
                            only_page or 0)
        image = await self.decode(data, target_max_pixels=target_max_pixels, all_frames=True)
        # decode_image reports the first frame's displayed size; other frames of another size get theirs
        # estimated from the common scale (within a pixel).
        first = image.pages[0].size
        frames = [Page(img, image.original_size if img.size == first else _scaled(img.size, image.scale), i)
                  for i, img in enumerate(image.pages)]
        if only_page is None and pages is not None:
            kind = "image" if len(frames) == 1 else "TIFF"
            return Document([frames[i] for i in pdf.check_pages(pages, len(frames), kind)], image.format)
        if only_page is None:
            return Document(frames, image.format)
        if not 0 <= only_page < len(frames):
            raise InvalidParameter(f"page {only_page} does not exist; the image has {len(frames)} page(s), "
                                   "numbered from 0", param="page", code="PAGE_OUT_OF_RANGE")
        return Document([frames[only_page]], image.format, only_page)


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def region_on(page: Page, region: Box) -> Box | None:
    """The region (original pixels) clipped to the page, in the model image's pixels; None if empty."""
    w, h = page.original_size
    x1, y1, x2, y2 = max(0, region[0]), max(0, region[1]), min(w, region[2]), min(h, region[3])
    if x2 <= x1 or y2 <= y1:
        return None
    s = page.scale
    iw, ih = page.image.size
    box = (int(x1 / s), int(y1 / s), min(iw, int(round(x2 / s + 0.499))), min(ih, int(round(y2 / s + 0.499))))
    return box if box[2] > box[0] and box[3] > box[1] else None


def to_original(block: OcrBlock, page: Page, page_index: int, offset: tuple[int, int] = (0, 0)) -> OcrBlock:
    """A block read from the model's image (or a crop at ``offset`` in it) in original page pixels."""
    box = block.box
    if box is not None:
        s, (ox, oy) = page.scale, offset
        w, h = page.original_size
        x1, y1, x2, y2 = box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy
        box = (min(w, max(0, round(x1 * s))), min(h, max(0, round(y1 * s))),
               min(w, max(0, round(x2 * s))), min(h, max(0, round(y2 * s))))
    return replace(block, box=box, page=page_index)


async def original_page(decoder: ImageDecoder, data: bytes, doc: Document, index: int) -> Image.Image:
    """The page at its original size, for drawing on (decoded again only when the model's was scaled)."""
    page = doc.pages[index - doc.first_page]
    if page.image.size == page.original_size:
        return page.image
    full = await decoder.decode_pages(data, target_max_pixels=None, only_page=index)
    return full.pages[0].image
