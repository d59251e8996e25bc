"""From text lines and layout regions to blocks with dots.ocr's categories, in reading order.

CDLA class -> dots.ocr category (documented in the README):

    text -> Text, title -> Section-header (the page title -> Title), figure -> Picture,
    figure_caption -> Caption, table -> Table, table_caption -> Caption, header -> Page-header,
    footer -> Page-footer, reference -> Text, equation -> Formula

The layout model finds regions but often merges a list into a paragraph or misses a heading,
so text regions are split again from the lines' geometry: a line much taller than the body
text is a heading, a line starting with a bullet or a number is a List-item, and lines that
follow each other closely in the same column make a paragraph. Lines in the top or bottom
margin band are page headers and footers even where the model saw none.

Reading order: page headers first, then the body in bands separated by full-width blocks (and by
narrower blocks that cross the gutter between two columns, such as a centred figure), each
band read column by column (columns split at vertical gaps no block crosses, so two, three or
more columns), then footers. Headings at the foot of a band with no block beside them (a short
section header over a full-width paragraph) are read with the full-width block below them, not
at the end of the column they line up with.
Captions are then moved beside their figure or table: a caption (the model's figure_caption or
table_caption, or a text block starting "Figure 2", "Table 1", "Рисунок", "Таблица", "图", "表")
belongs to the nearest Picture or Table that overlaps it horizontally by more than 30% of the
narrower of the two and lies within 3 body lines or 3% of the page height above or below it; it is
read right before that object when it is above it, right after it when below. A caption with
no such object keeps its place.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from core.types import OcrBlock
from ocr.document.adapter import PageAnalysis, Region
from ocr.document.tables import Grid, borderless, fill_cells, to_html, to_text

Box = tuple[int, int, int, int]
CDLA_TO_DOTS = {"text": "Text", "title": "Section-header", "figure": "Picture", "figure_caption": "Caption",
                "table": "Table", "table_caption": "Caption", "header": "Page-header", "footer": "Page-footer",
                "reference": "Text", "equation": "Formula"}
_FIXED = {"figure", "figure_caption", "table_caption", "equation", "header", "footer"}
LIST_START = re.compile(r"^\s*(?:[•·▪●◦■□➢►・]\s*|(?:[-–*+.]|\(?\d{1,3}[.)]|[a-zA-Zа-яА-Я][.)])\s+)\S")
_NUMBERED_HEADING = re.compile(r"^\s*\d+(?:\.\d+)*\.?\s+\S")
MARGIN_BAND = 0.06  # of the page height: page headers above it, footers below
CAPTION_START = re.compile(r"^\s*(?:fig(?:ure)?\.?|table|tab\.|рис(?:унок)?\.?|таблица|табл\.|图|表)\s*\d",
                           re.IGNORECASE)
CAPTION_REACH = 0.03  # of the page height (or 3 body lines, the larger): how far a caption sits from its object


@dataclass
class Line:
    text: str
    box: Box
    confidence: float | None = None


@dataclass
class _Block:
    category: str
    lines: list[Line]
    grid: Grid | None = None
    box: Box = (0, 0, 0, 0)
    extra: dict = field(default_factory=dict)

    def finish(self) -> "_Block":
        if self.grid is not None:
            self.box = self.grid.box
        elif self.lines:
            self.box = (min(l.box[0] for l in self.lines), min(l.box[1] for l in self.lines),
                        max(l.box[2] for l in self.lines), max(l.box[3] for l in self.lines))
        return self


def _centre(b: Box) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _inside(point: tuple[float, float], box: Box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the area of ``a``."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    area = max(1, (a[2] - a[0]) * (a[3] - a[1]))
    return max(0, w) * max(0, h) / area


def assemble(lines: list[Line], analysis: PageAnalysis, *, first_page: bool, cjk: bool) -> list[OcrBlock]:
    """Blocks in reading order, boxes in the analysed (upright) image's pixels."""
    width, height = analysis.image.size
    joiner = "" if cjk else " "
    blocks: list[_Block] = []
    rest = [l for l in lines if l.text.strip()]
    # 1. ruled tables (from the rules), then borderless ones (layout table regions without rules)
    for grid in analysis.grids:
        inside = [l for l in rest if _inside(_centre(l.box), grid.box)]
        rest = [l for l in rest if not _inside(_centre(l.box), grid.box)]
        fill_cells(grid, [(l.text, l.box) for l in inside], joiner)
        blocks.append(_Block("Table", inside, grid, extra={"ruled": True}).finish())
    # The model sometimes calls a borderless table a figure: a figure region whose text fills a
    # grid of at least 3 rows (two cells in three or more) is read as a table too.
    candidates = [r for r in analysis.regions if r.label == "table"] + \
                 [r for r in analysis.regions if r.label == "figure"]
    for region in candidates:
        if any(_overlap(region.box, g.box) > 0.3 for g in analysis.grids) or \
                any(b.category == "Table" and _overlap(region.box, b.box) > 0.5 for b in blocks):
            continue
        inside = [l for l in rest if _inside(_centre(l.box), region.box)]
        grid = borderless(region.box, [(l.text, l.box) for l in inside], joiner)
        if grid is None or (region.label == "figure" and (
                grid.rows < 3 or 3 * sum(bool(c.text) for c in grid.cells) < 2 * len(grid.cells))):
            continue
        rest = [l for l in rest if l not in inside]
        blocks.append(_Block("Table", inside, grid, extra={"ruled": False}).finish())
    # 2. regions whose category the model decides (figures, captions, formulas, headers, footers);
    # a "caption" in large type is the section heading above a table, which the model often mistakes
    body = _body_height(rest)
    for region in sorted((r for r in analysis.regions if r.label in _FIXED), key=lambda r: r.score, reverse=True):
        inside = [l for l in rest if _inside(_centre(l.box), region.box)]
        if region.label.endswith("caption") and any(l.box[3] - l.box[1] >= 1.15 * body for l in inside):
            continue
        if region.label == "figure" and any(b.category == "Table" and _overlap(region.box, b.box) > 0.5
                                            for b in blocks):
            continue  # the model sometimes sees a borderless table as a figure as well
        if inside or region.label == "figure":
            rest = [l for l in rest if l not in inside]
            blk = _Block(CDLA_TO_DOTS[region.label], sorted(inside, key=lambda l: (l.box[1], l.box[0])))
            blk.finish()
            if not inside or region.label == "figure":
                blk.box = region.box
            blocks.append(blk)
    # 3. margin bands: page furniture even where the model saw none
    for l in list(rest):
        cy = _centre(l.box)[1]
        if cy < MARGIN_BAND * height or cy > (1 - MARGIN_BAND) * height:
            rest.remove(l)
            blocks.append(_Block("Page-header" if cy < height / 2 else "Page-footer", [l]).finish())
    # 4. the rest: headings, list items and paragraphs from the lines' geometry
    blocks += _text_blocks(rest, [r for r in analysis.regions if r.label == "title"], cjk)
    _mark_title(blocks, first_page, height)
    reach = max(3 * body, CAPTION_REACH * height)
    for b in blocks:  # "Figure 2.", "Таблица 1", "表1" beside a figure or table, which the model missed
        if b.category == "Text" and CAPTION_START.match(b.lines[0].text if b.lines else "") and \
                _caption_target(b, blocks, reach) is not None:
            b.category = "Caption"
    ordered = place_captions(reading_order(blocks, width), reach)
    return [_to_ocr_block(b, joiner) for b in ordered]


def _body_height(lines: list[Line]) -> int:
    heights = sorted(l.box[3] - l.box[1] for l in lines)
    return max(1, heights[len(heights) // 2]) if heights else 1


def _gaps(line: Line, lines: list[Line]) -> tuple[float, float]:
    """Vertical gaps to the nearest lines above and below in the same column (inf when none)."""
    above = below = float("inf")
    for o in lines:
        if o is line or min(o.box[2], line.box[2]) - max(o.box[0], line.box[0]) <= 0:
            continue
        if o.box[3] <= line.box[1] + 2:
            above = min(above, line.box[1] - o.box[3])
        elif o.box[1] >= line.box[3] - 2:
            below = min(below, o.box[1] - line.box[3])
    return above, below


def _text_blocks(lines: list[Line], titles: list[Region], cjk: bool) -> list[_Block]:
    if not lines:
        return []
    body = _body_height(lines)
    blocks: list[_Block] = []
    current: _Block | None = None
    for line in sorted(lines, key=lambda l: (l.box[1], l.box[0])):
        h = line.box[3] - line.box[1]
        in_title = any(_overlap(line.box, t.box) > 0.5 for t in titles)
        above, below = _gaps(line, lines)
        # A heading stands apart: taller type, with space above and below it (a paragraph line
        # with tall glyphs sits tight between its neighbours).
        apart = min(above, below) >= 0.45 * body
        numbered = bool(_NUMBERED_HEADING.match(line.text))
        heading = apart and (h >= 1.2 * body or (numbered and (in_title or h >= 1.1 * body)))
        if heading:
            blocks.append(_Block("Section-header", [line]).finish())
            current = None
            continue
        listed = bool(LIST_START.match(line.text))
        cont = current is not None and _continues(current, line, body)
        if cont and not listed:
            current.lines.append(line)
            current.finish()
            continue
        # a line of the same paragraph may sit in the other column: look for the block it continues
        other = next((b for b in reversed(blocks) if b.category in ("Text", "List-item") and b is not current
                      and _continues(b, line, body)), None)
        if other is not None and not listed:
            other.lines.append(line)
            other.finish()
            current = other
            continue
        current = _Block("List-item" if listed else "Text", [line]).finish()
        blocks.append(current)
    return blocks


def _continues(block: _Block, line: Line, body: int) -> bool:
    """The line follows the block's last line closely, in the same column, at the same size."""
    last = block.lines[-1]
    same_column = min(block.box[2], line.box[2]) - max(block.box[0], line.box[0]) > 0.3 * min(
        block.box[2] - block.box[0], line.box[2] - line.box[0])
    # A line of short letters only ("качество регион", "neon ocean") has no ascenders: its box is
    # shorter than its neighbours' (15 px against 20 at 10 pt, 150 dpi); its height counts as at
    # least 0.8 of the body text's.
    floor = 0.8 * body
    h1, h2 = max(floor, last.box[3] - last.box[1]), max(floor, line.box[3] - line.box[1])
    if not (same_column and 0.75 < h2 / max(1, h1) < 1.33 and line.box[1] - last.box[3] > -0.3 * body):
        return False
    if len(block.lines) >= 2:
        # The block's own line pitch (centre to centre, which ascenders barely move): a new
        # paragraph starts further down than the lines of this one are apart.
        centres = [(l.box[1] + l.box[3]) / 2 for l in block.lines]
        pitch = sorted(b - a for a, b in zip(centres, centres[1:]))[(len(centres) - 1) // 2]
        if pitch > 0.5 * body:
            return (line.box[1] + line.box[3]) / 2 - centres[-1] <= 1.35 * pitch
    # A line without ascenders (lower-case Cyrillic, "neon ocean") starts lower than its neighbours'
    # would: its top is taken as its bottom less a body line's height.
    top = min(line.box[1], line.box[3] - body)
    return top - last.box[3] < 0.75 * body


def _mark_title(blocks: list[_Block], first_page: bool, height: int) -> None:
    """The largest heading in the top third of the first page is the Title."""
    if not first_page:
        return
    heads = [b for b in blocks if b.category == "Section-header" and b.box[1] < height / 3]
    if not heads:
        return
    best = max(heads, key=lambda b: b.box[3] - b.box[1])
    others = [b.box[3] - b.box[1] for b in blocks if b.category == "Section-header" and b is not best]
    if not others or (best.box[3] - best.box[1]) >= 1.1 * max(others):
        best.category = "Title"


def reading_order(blocks: list[_Block], page_width: int) -> list[_Block]:
    headers = sorted((b for b in blocks if b.category == "Page-header"), key=lambda b: (b.box[1], b.box[0]))
    footers = sorted((b for b in blocks if b.category == "Page-footer"), key=lambda b: (b.box[1], b.box[0]))
    body = sorted((b for b in blocks if b.category not in ("Page-header", "Page-footer")),
                  key=lambda b: (b.box[1], b.box[0]))
    if not body:
        return headers + footers
    left, right = min(b.box[0] for b in body), max(b.box[2] for b in body)
    full = 0.6 * (right - left)
    spanning = _spanning([b for b in body if b.box[2] - b.box[0] < full], left, right)
    out: list[_Block] = []
    band: list[_Block] = []
    for b in body:
        if b.box[2] - b.box[0] >= full or id(b) in spanning:
            heads = _heads_of(band)
            out += _columns([x for x in band if not any(x is h for h in heads)]) + heads
            band = []
            out.append(b)
        else:
            band.append(b)
    out += _columns(band)
    return headers + out + footers


def _heads_of(band: list[_Block]) -> list[_Block]:
    """The headings at the foot of a band with nothing beside them: they head the full-width
    block that follows (a section header over a full-width paragraph between two column bands),
    not the column they happen to line up with."""
    heads: list[_Block] = []
    rest = list(band)
    while rest:
        low = max(rest, key=lambda b: (b.box[1], b.box[0]))
        if low.category not in ("Title", "Section-header") or \
                any(o is not low and o.box[3] > low.box[1] + 2 for o in rest):
            break
        heads.insert(0, low)
        rest = [o for o in rest if o is not low]
    return heads


def _spanning(blocks: list[_Block], left: int, right: int) -> set[int]:
    """Blocks narrower than full width that still cross the gutter between two columns (a figure
    centred under both, its caption): they separate bands like full-width blocks. The gutter is
    the x, away from the page's sides, crossed by the fewest blocks, with at least two blocks
    wholly on each side of it and fewer crossing it than stand beside it."""
    span = right - left
    if len(blocks) < 4 or span <= 0:
        return set()
    cover = np.zeros(span + 1, np.int32)
    for b in blocks:
        cover[max(0, b.box[0] - left):max(0, b.box[2] - left)] += 1
    lo, hi = int(0.2 * span), int(0.8 * span)
    x = left + lo + int(np.argmin(cover[lo:hi]))
    crossing = [b for b in blocks if b.box[0] < x < b.box[2]]
    if not crossing:
        return set()
    n_left = sum(b.box[2] <= x for b in blocks)
    n_right = sum(b.box[0] >= x for b in blocks)
    if n_left >= 2 and n_right >= 2 and len(crossing) < n_left + n_right:
        return {id(b) for b in crossing}
    return set()


def _caption_target(caption: _Block, blocks: list[_Block], reach: float) -> tuple[_Block, bool] | None:
    """The figure or table nearest to the caption (above or below it, overlapping it
    horizontally, within ``reach``), and whether the caption is above it."""
    best: tuple[float, _Block, bool] | None = None
    c = caption.box
    for o in blocks:
        if o.category not in ("Picture", "Table"):
            continue
        b = o.box
        if min(c[2], b[2]) - max(c[0], b[0]) <= 0.3 * min(c[2] - c[0], b[2] - b[0]):
            continue
        above = (c[1] + c[3]) / 2 < (b[1] + b[3]) / 2
        gap = max(0, b[1] - c[3]) if above else max(0, c[1] - b[3])
        if gap <= reach and (best is None or gap < best[0]):
            best = (gap, o, above)
    return (best[1], best[2]) if best else None


def place_captions(ordered: list[_Block], reach: float) -> list[_Block]:
    """Each caption right beside its figure or table: before it when the caption is above the
    object, after it when below. A caption with no object within reach keeps its place."""
    before: dict[int, list[_Block]] = {}
    after: dict[int, list[_Block]] = {}
    placed = set()
    for b in ordered:
        if b.category != "Caption":
            continue
        target = _caption_target(b, ordered, reach)
        if target is None:
            continue
        obj, above = target
        (before if above else after).setdefault(id(obj), []).append(b)
        placed.add(id(b))
    out: list[_Block] = []
    for b in ordered:
        if id(b) in placed:
            continue
        out += sorted(before.get(id(b), []), key=lambda c: c.box[1])
        out.append(b)
        out += sorted(after.get(id(b), []), key=lambda c: c.box[1])
    return out


def _columns(band: list[_Block]) -> list[_Block]:
    """A band read column by column: columns split where no block crosses."""
    if len(band) < 2:
        return band
    spans = sorted((b.box[0], b.box[2]) for b in band)
    cuts = []
    reach = spans[0][1]
    for x1, x2 in spans[1:]:
        if x1 > reach:
            cuts.append((reach + x1) / 2)
        reach = max(reach, x2)
    columns: list[list[_Block]] = [[] for _ in range(len(cuts) + 1)]
    for b in band:
        cx = _centre(b.box)[0]
        columns[sum(cx > c for c in cuts)].append(b)
    return [b for col in columns for b in sorted(col, key=lambda b: (b.box[1], b.box[0]))]


def _to_ocr_block(b: _Block, joiner: str) -> OcrBlock:
    confs = [l.confidence for l in b.lines if l.confidence is not None]
    conf = round(sum(confs) / len(confs), 4) if confs else None
    if b.grid is not None:
        cells = tuple({"row": c.row, "col": c.col, "rowspan": c.rowspan, "colspan": c.colspan,
                       "text": c.text, "box": list(c.box)} for c in b.grid.cells)
        return OcrBlock(to_html(b.grid), box=b.box, confidence=conf, category="Table", cells=cells,
                        plain=to_text(b.grid))
    text = joiner.join(l.text.strip() for l in b.lines)
    return OcrBlock(text, box=b.box, confidence=conf, category=b.category)
