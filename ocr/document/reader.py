"""Reads one page through the document pipeline: the layout model (doc_cpu) finds the structure,
the OCR engines read the text, both through the model manager (one loaded copy of each engine,
shared with /ocr), and assemble.py turns lines and regions into ordered, categorised blocks.

Engines: RapidOCR reads the whole upright page in one call (its detector keeps columns and table
cells apart); Tesseract, whose single-block mode would run lines of two columns together, reads
each ink segment and each ruled-table cell on its own (segments side by side in two layout
regions, such as two of three columns, stay apart). RapidOCR's detector sees the page scaled
down to 1216 px, where 8-pt print can vanish: ink segments no line covers are read again from
their own full-resolution crop. Lone dots and dashes are then checked against their ink
(glyphs.py). A PDF page with a text layer is not OCR'd at all unless the client asks for
``force_ocr``.
"""
from __future__ import annotations

import asyncio
import unicodedata
from dataclasses import replace

import numpy as np
from PIL import Image

from core.errors import BadRequest, Overloaded
from core.types import CancelToken, Capability, OcrBlock
from models.adapter import OcrOptions
from models.manager import ModelManager
from models.selection import ModelSelector
from ocr.document.adapter import PageAnalysis
from ocr.document.assemble import Line, assemble
from ocr.document.glyphs import fix_symbols

Box = tuple[int, int, int, int]
_CELL_INSET = 3  # px: keeps the rules out of a cell's crop


def is_cjk(text: str) -> bool:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    han = sum(1 for c in chars if "CJK" in unicodedata.name(c, "") or "\u3000" <= c <= "\u30ff")
    return han / len(chars) > 0.3


class DocumentReader:
    def __init__(self, selector: ModelSelector, manager: ModelManager) -> None:
        self.selector = selector
        self.manager = manager

    def engine_for(self, model_id: str, language: str | None) -> str:
        """The first installed engine of the pipeline's ``engines`` that reads the language."""
        entry = self.selector.entry(model_id)
        engines = list((entry.spec.options or {}).get("engines", ["rapidocr", "tesseract"]))
        for engine_id in engines:
            engine = self.selector.registry.get(engine_id)
            if engine is None or Capability.OCR not in engine.capabilities or not engine.install_state().installed:
                continue
            if self.selector.supports_language(engine, language):
                return engine.id
        raise BadRequest(f"no OCR engine of '{model_id}' ({', '.join(engines)}) can read language '{language}'",
                         param="language", code="LANGUAGE_NOT_SUPPORTED")

    async def read(self, model_id: str, image: Image.Image, options: OcrOptions, cancel: CancelToken, *,
                   first_page: bool, text_lines: list[tuple[str, Box]] | None = None) -> tuple[list[OcrBlock], int]:
        """Blocks of one page image (boxes in its pixels, upright), and the angle it was turned by."""
        use_text = text_lines is not None
        engine = None if use_text else self.engine_for(model_id, options.language)
        # A page with a text layer is upright by construction: the classifier is not asked.
        method = "analyze_upright" if use_text else "analyze"
        analysis: PageAnalysis = await self.manager.run(model_id, method, image, cancel=cancel)
        if use_text:
            lines = [Line(t, b, None) for t, b in text_lines or []]
        else:
            lines = await self._ocr_lines(engine, analysis, options, cancel)
        cjk = is_cjk("".join(l.text for l in lines[:200]))
        blocks = await asyncio.to_thread(assemble, lines, analysis, first_page=first_page, cjk=cjk)
        return blocks, analysis.angle

    async def _ocr_lines(self, engine: str, analysis: PageAnalysis, options: OcrOptions,
                         cancel: CancelToken) -> list[Line]:
        opts = replace(options, format="text", region=None)
        page = analysis.image
        slots = asyncio.Semaphore(max(1, self.selector.entry(engine).spec.concurrency))

        async def one(box: Box) -> list[Line]:
            async with slots:
                result = await self.manager.run(engine, "ocr", page.crop(box), opts, cancel=cancel)
            dx, dy = box[0], box[1]
            return [Line(b.text, (b.box[0] + dx, b.box[1] + dy, b.box[2] + dx, b.box[3] + dy), b.confidence)
                    for b in result.blocks if b.box is not None and b.text.strip()]

        if self.selector.entry(engine).spec.kind == "rapidocr":
            result = await self.manager.run(engine, "ocr", page, opts, cancel=cancel)
            lines = [Line(b.text, b.box, b.confidence) for b in result.blocks if b.box is not None]
            # The detector sees the page scaled down to its input size: small print it missed
            # there (an 8-pt page number) is read again from its own crop at full resolution.
            # Best effort: when the engine is too busy for these extra calls to finish before the
            # deadline (another page's full-page call ahead of them), the page goes without them.
            async def again(box: Box) -> list[Line]:
                try:
                    return await one(box)
                except Overloaded:
                    return []

            found = await asyncio.gather(*(again(u) for u in _missed(analysis, lines)))
            lines += [line for part in found for line in part]
        else:
            found = await asyncio.gather(*(one(u) for u in _units(analysis)))
            lines = [line for part in found for line in part]
        return await asyncio.to_thread(_check_symbols, lines, page)


def _check_symbols(lines: list[Line], page: Image.Image) -> list[Line]:
    """Lone dots and dashes re-decided from their ink (glyphs.py: the engines cannot tell them apart)."""
    gray = np.asarray(page.convert("L"))
    pad = 2  # Tesseract's boxes touch the ink; a little white keeps a glyph apart from the edge
    for line in lines:
        x1, y1, x2, y2 = line.box
        line.text = fix_symbols(line.text, gray[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad])
    return lines


def _missed(analysis: PageAnalysis, lines: list[Line]) -> list[Box]:
    """Crops of the ink segments no text line covers, outside tables and figures, of text height."""
    boxes = [l.box for l in lines]
    heights = sorted(b[3] - b[1] for b in boxes)
    body = heights[len(heights) // 2] if heights else 0
    skip = [g.box for g in analysis.grids] + [r.box for r in analysis.regions if r.label == "figure"]
    w, h = analysis.image.size
    out = []
    for seg in analysis.segments:
        sx1, sy1, sx2, sy2 = seg
        sh = sy2 - sy1
        if body and sh > 3 * body:
            continue
        centre = ((sx1 + sx2) / 2, (sy1 + sy2) / 2)
        if any(b[0] <= centre[0] <= b[2] and b[1] <= centre[1] <= b[3] for b in skip):
            continue
        if _covered(seg, boxes) >= 0.5:
            continue
        pad = max(8, sh)  # the detector needs some white around a short line
        out.append((max(0, sx1 - pad), max(0, sy1 - pad), min(w, sx2 + pad), min(h, sy2 + pad)))
    return out


def _covered(seg: Box, boxes: list[Box]) -> float:
    """The share of ``seg``'s area under the boxes (boxes of one page's lines barely overlap)."""
    area = max(1, (seg[2] - seg[0]) * (seg[3] - seg[1]))
    inter = 0
    for b in boxes:
        iw = min(seg[2], b[2]) - max(seg[0], b[0])
        ih = min(seg[3], b[3]) - max(seg[1], b[1])
        if iw > 0 and ih > 0:
            inter += iw * ih
    return min(1.0, inter / area)


def _units(analysis: PageAnalysis) -> list[Box]:
    """What Tesseract reads one at a time: each ruled-table cell, and paragraphs of ink segments."""
    units: list[Box] = []
    for grid in analysis.grids:
        for cell in grid.cells:
            x1, y1, x2, y2 = cell.box
            if x2 - x1 > 2 * _CELL_INSET + 4 and y2 - y1 > 2 * _CELL_INSET + 4:
                units.append((x1 + _CELL_INSET, y1 + _CELL_INSET, x2 - _CELL_INSET, y2 - _CELL_INSET))
    free = [s for s in analysis.segments
            if not any(g.box[0] <= (s[0] + s[2]) / 2 <= g.box[2] and g.box[1] <= (s[1] + s[3]) / 2 <= g.box[3]
                       for g in analysis.grids)]
    w, h = analysis.image.size
    pad = 4
    blocks = [r.box for r in analysis.regions if r.label not in ("figure", "table")]
    return units + [(max(0, x1 - pad), max(0, y1 - pad), min(w, x2 + pad), min(h, y2 + pad))
                    for x1, y1, x2, y2 in _paragraphs(free, blocks)]


def _region_of(box: Box, regions: list[Box]) -> int | None:
    """The smallest of the layout regions holding the box's centre (None: in none of them)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    inside = [i for i, r in enumerate(regions) if r[0] <= cx <= r[2] and r[1] <= cy <= r[3]]
    return min(inside, key=lambda i: (regions[i][2] - regions[i][0]) * (regions[i][3] - regions[i][1]), default=None)


def _paragraphs(segments: list[Box], regions: list[Box] | None = None) -> list[Box]:
    """Merge line segments that stack closely in one column into paragraph boxes.

    Words of one line side by side are merged too, unless the layout model put them in two
    different text regions: three columns' gutters are barely wider than a word space at heading
    size once the ink is dilated."""
    out: list[list[int]] = []
    where: list[int | None] = []  # the region of each paragraph's first segment
    heights = sorted(s[3] - s[1] for s in segments)
    line_h = heights[len(heights) // 2] if heights else 0  # most segments are one line of text
    for s in sorted(segments, key=lambda b: (b[1], b[0])):
        h = s[3] - s[1]
        mine = _region_of(s, regions or [])
        for k in range(len(out) - 1, -1, -1):
            p = out[k]
            overlap = min(p[2], s[2]) - max(p[0], s[0])
            v_overlap = min(p[3], s[3]) - max(p[1], s[1])
            # words of a heading: side by side, a word space apart (of one line's height, not of a
            # paragraph's: two columns' paragraphs are side by side too, a gutter apart)
            gap = min(h, p[3] - p[1], line_h)
            same_line = v_overlap > 0.5 * min(h, p[3] - p[1]) and -gap < s[0] - p[2] < gap and \
                (mine is None or where[k] is None or mine == where[k])
            if same_line or (overlap > 0.3 * min(p[2] - p[0], s[2] - s[0]) and 0 <= s[1] - p[3] < 0.8 * h):
                p[0], p[1], p[2], p[3] = min(p[0], s[0]), min(p[1], s[1]), max(p[2], s[2]), max(p[3], s[3])
                break
        else:
            out.append(list(s))
            where.append(mine)
    return [tuple(p) for p in out]  # type: ignore[misc]
