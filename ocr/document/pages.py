"""Pages as the document pipeline and the text layer answer them, in original page pixels."""
from __future__ import annotations

import asyncio
from dataclasses import replace

from core.types import CancelToken, OcrBlock
from models.adapter import OcrOptions
from ocr.document.assemble import Line, assemble
from ocr.document.reader import DocumentReader, is_cjk
from ocr.document.vector import VectorLayout, analyze_vector
from ocr.pages import Box, Page, PageOutcome, region_on

_LINE_SEPARATOR = "\n"


def _inside(box: Box, region: Box) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def text_layer_page(page: Page, index: int, region: Box | None) -> PageOutcome:
    """A PDF page read from its embedded text: its runs in the document's order, as lines."""
    lines = page.text_lines or []
    if region is not None:
        lines = [(t, b) for t, b in lines if _inside(b, region)]
    blocks = [OcrBlock(t, box=b, confidence=1.0, page=index) for t, b in lines]
    return PageOutcome(index, _LINE_SEPARATOR.join(b.text for b in blocks), blocks, page.original_size)


def page_text(blocks: list[OcrBlock]) -> str:
    """A structured page as plain text: blocks in reading order, tables as rows."""
    return _LINE_SEPARATOR.join((b.plain if b.plain is not None else b.text) for b in blocks if b.text)


def vector_blocks(layout: VectorLayout, *, first_page: bool) -> list[OcrBlock]:
    """A text-layer page's blocks from its own objects (the layout model's fast path), in page pixels."""
    lines = [Line(t, b, 1.0) for t, b in layout.lines]  # exact text: confidence 1.0, as the README says
    analysis = analyze_vector(lines, layout)
    return assemble(lines, analysis, first_page=first_page, cjk=is_cjk("".join(l.text for l in lines[:200])))


class DocumentPages:
    """Runs a page through the document reader and maps its blocks back to original page pixels."""

    def __init__(self, reader: DocumentReader) -> None:
        self.reader = reader

    async def read_page(self, model_id: str, page: Page, index: int, options: OcrOptions, region: Box | None,
                        cancel: CancelToken) -> PageOutcome:
        if page.structure is not None:  # a text-layer page: its structure from the PDF, no model
            blocks = await asyncio.to_thread(vector_blocks, page.structure, first_page=index == 0)
            out = [replace(b, page=index) for b in blocks]
            return PageOutcome(index, page_text(out), out, page.original_size)
        box = region_on(page, region) if region is not None else None
        if region is not None and box is None:
            return PageOutcome(index, "", [], page.original_size)
        image = page.image.crop(box) if box is not None else page.image
        ox, oy = (box[0], box[1]) if box is not None else (0, 0)
        s = page.scale
        text_lines = None
        if page.text_lines is not None:  # original pixels -> the model image's (crop) pixels
            text_lines = [(t, (round(b[0] / s) - ox, round(b[1] / s) - oy, round(b[2] / s) - ox, round(b[3] / s) - oy))
                          for t, b in page.text_lines]
            if box is not None:
                text_lines = [(t, b) for t, b in text_lines if _inside(b, (0, 0, image.width, image.height))]
        blocks, angle = await self.reader.read(model_id, image, options, cancel, first_page=index == 0,
                                               text_lines=text_lines)

        def scale(b: tuple) -> tuple[int, int, int, int]:
            return (round((b[0] + ox) * s), round((b[1] + oy) * s), round((b[2] + ox) * s), round((b[3] + oy) * s))

        out = []
        for b in blocks:
            cells = tuple({**c, "box": list(scale(c["box"]))} for c in b.cells) if b.cells else None
            out.append(replace(b, box=scale(b.box) if b.box else None, cells=cells, page=index))
        size = page.original_size if angle in (0, 180) else (page.original_size[1], page.original_size[0])
        return PageOutcome(index, page_text(out), out, size)
