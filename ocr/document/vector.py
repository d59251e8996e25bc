"""The fast path for PDF pages with a text layer: the page's structure from the PDF itself, no
layout model and no rendering.

PDFium gives the text runs with their boxes (textlayer.py) and the page objects: thin path
objects are ruling lines, other paths (filled bars, curves) and images are drawings. From them:

* ruled tables: the rules are drawn into masks at page pixels and read by the same grid code as
  a scan's rules (tables.find_grids: rows, columns, row and column spans); a grid with a drawing
  inside it is a chart, not a table;
* figures: drawings (with the rules that touch them, a chart's axes) merged into one region;
* borderless tables: three or more consecutive rows of two or more short text runs, a few body
  heights apart, each run leaving most of the way to the next one empty (lines of prose in
  three columns are short and far apart too, but fill their column), the first row not set
  right under a line above it at a paragraph's spacing;
* the rest (title, section headers from type size, list items from bullets and numbers, page
  headers and footers from the margin bands, paragraphs from line pitch, columns for reading
  order, captions beside their objects) is assemble.py's, as for every page.

A page whose images cover most of it (a scan with an OCR'd text layer) has no usable structure:
``page_structure`` answers None and the page goes through the layout model as before (so do
pages turned by /Rotate and pages drawn in form XObjects, which this path does not read yet).

Callers of ``page_structure`` hold ocr/pdf.py's PDFium lock: PDFium is not thread-safe.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import cv2
import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from ocr.document.adapter import PageAnalysis, Region
from ocr.document.assemble import Line
from ocr.document.tables import find_grids

Box = tuple[int, int, int, int]
RULE_MAX_PT = 3.0       # a path no thicker than this (and longer than RULE_MIN_PT) is a rule
RULE_MIN_PT = 10.0
SCANNED_SHARE = 0.5     # images covering this share of the page: a scan, read by the layout model
_MERGE_PX = 6
MAX_FILLED = 0.3        # a grid whose drawings cover this share of it is a chart, not a table
CELL_FILL = 0.6         # a borderless cell spans at most this share of the way to the next cell


@dataclass
class VectorLayout:
    size: tuple[int, int]                            # the page in pixels
    rules: list[Box] = field(default_factory=list)   # thin paths: ruling lines, axes
    shapes: list[Box] = field(default_factory=list)  # other paths: filled areas, curves
    images: list[Box] = field(default_factory=list)
    # text runs with boxes from their font size and baseline (not their glyphs' ink, which makes a
    # 13-pt heading without descenders as tall as a 10-pt line with them)
    lines: list[tuple[str, Box]] = field(default_factory=list)


def page_structure(page: "pdfium.PdfPage", scale: float) -> VectorLayout | None:
    """The page's drawings in pixels at ``scale`` pixels per point; None for a scanned page, and
    for pages this path does not read yet (turned by /Rotate; content in form XObjects, whose
    objects' bounds are in the form's space): the layout model reads those as before."""
    if page.get_rotation() % 360:
        return None
    width, height = page.get_size()
    left, bottom = page.get_cropbox()[:2]
    out = VectorLayout((round(width * scale), round(height * scale)))
    image_area = 0.0
    for obj in page.get_objects(max_depth=1):
        if obj.type == pdfium_c.FPDF_PAGEOBJ_FORM:
            return None
        if obj.type not in (pdfium_c.FPDF_PAGEOBJ_PATH, pdfium_c.FPDF_PAGEOBJ_IMAGE):
            continue
        l, b, r, t = obj.get_bounds()
        box = (round((l - left) * scale), round((height - (t - bottom)) * scale),
               round((r - left) * scale), round((height - (b - bottom)) * scale))
        if obj.type == pdfium_c.FPDF_PAGEOBJ_IMAGE:
            image_area += max(0.0, r - l) * max(0.0, t - b)
            out.images.append(box)
        elif min(r - l, t - b) <= RULE_MAX_PT and max(r - l, t - b) >= RULE_MIN_PT:
            out.rules.append(box)
        elif max(r - l, t - b) > RULE_MAX_PT:
            out.shapes.append(box)
    if image_area >= SCANNED_SHARE * width * height:
        return None
    out.lines = _sized_lines(page, scale, height, left, bottom)
    return out


def _sized_lines(page: "pdfium.PdfPage", scale: float, height: float, left: float,
                 bottom: float) -> list[tuple[str, Box]]:
    textpage = page.get_textpage()
    try:
        raw = textpage.raw
        x, y = ctypes.c_double(), ctypes.c_double()
        lines = []
        for i in range(textpage.count_rects()):
            l, b, r, t = textpage.get_rect(i)
            text = textpage.get_text_bounded(l, b, r, t).replace("\r", " ").replace("\n", " ").strip()
            if not text:
                continue
            idx = pdfium_c.FPDFText_GetCharIndexAtPos(raw, l + min(1.0, (r - l) / 2), (b + t) / 2, 1.0, (t - b) / 2)
            size = pdfium_c.FPDFText_GetFontSize(raw, idx) if idx >= 0 else 0.0
            if idx >= 0 and size > 0 and pdfium_c.FPDFText_GetCharOrigin(raw, idx, x, y):
                top, low = y.value + 0.8 * size, y.value - 0.25 * size
            else:
                top, low = t, b
            lines.append((text, (round((l - left) * scale), round((height - (top - bottom)) * scale),
                                 round((r - left) * scale), round((height - (low - bottom)) * scale))))
        return lines
    finally:
        textpage.close()


def _centre_in(box: Box, region: Box) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def _filled(region: Box, drawings: list[Box]) -> float:
    """The share of ``region`` under the drawings whose centre lies in it (they seldom overlap)."""
    area = max(1, (region[2] - region[0]) * (region[3] - region[1]))
    inside = sum(max(0, min(d[2], region[2]) - max(d[0], region[0])) * max(0, min(d[3], region[3]) - max(d[1], region[1]))
                 for d in drawings if _centre_in(d, region))
    return inside / area


def _touch(a: Box, b: Box, pad: int = _MERGE_PX) -> bool:
    return a[0] - pad <= b[2] and b[0] - pad <= a[2] and a[1] - pad <= b[3] and b[1] - pad <= a[3]


def _clusters(boxes: list[tuple[Box, bool]]) -> list[tuple[Box, bool]]:
    """Boxes merged while any two touch; each cluster says whether it holds a drawing."""
    items = [(list(b), d) for b, d in boxes]
    merged = True
    while merged:
        merged = False
        out: list[tuple[list[int], bool]] = []
        for box, drawing in items:
            for o in out:
                if _touch(tuple(o[0]), tuple(box)):  # type: ignore[arg-type]
                    o[0][:] = [min(o[0][0], box[0]), min(o[0][1], box[1]), max(o[0][2], box[2]), max(o[0][3], box[3])]
                    out[out.index(o)] = (o[0], o[1] or drawing)
                    merged = True
                    break
            else:
                out.append((box, drawing))
        items = out
    return [(tuple(b), d) for b, d in items]  # type: ignore[misc]


def _borderless_regions(lines: list[Line], taken: list[Box]) -> list[Box]:
    """Runs of three or more rows made of two or more short, well separated text runs."""
    free = [l for l in lines if not any(g[0] <= (l.box[0] + l.box[2]) / 2 <= g[2]
                                        and g[1] <= (l.box[1] + l.box[3]) / 2 <= g[3] for g in taken)]
    if len(free) < 6:
        return []
    heights = sorted(l.box[3] - l.box[1] for l in free)
    body = max(1, heights[len(heights) // 2])
    span = max(l.box[2] for l in free) - min(l.box[0] for l in free)
    rows: list[list[Line]] = []
    for line in sorted(free, key=lambda l: (l.box[1] + l.box[3]) / 2):
        cy = (line.box[1] + line.box[3]) / 2
        if rows and abs(cy - np.mean([(o.box[1] + o.box[3]) / 2 for o in rows[-1]])) < 0.5 * body:
            rows[-1].append(line)
        else:
            rows.append([line])

    def cells(row: list[Line]) -> bool:
        # Cells leave most of the way to the next cell empty; the lines of prose set in three
        # columns are as short and as far apart, but each fills its column up to the gutter.
        row = sorted(row, key=lambda l: l.box[0])
        return len(row) >= 2 and all(l.box[2] - l.box[0] <= 0.35 * span for l in row) and \
            all(b.box[0] - a.box[2] >= 1.5 * body and a.box[2] - a.box[0] <= CELL_FILL * (b.box[0] - a.box[0])
                for a, b in zip(row, row[1:]))

    regions: list[Box] = []
    group: list[list[Line]] = []

    def close() -> None:
        if len(group) >= 3:
            ls = [l for row in group for l in row]
            regions.append((min(l.box[0] for l in ls) - 2, min(l.box[1] for l in ls) - 2,
                            max(l.box[2] for l in ls) + 2, max(l.box[3] for l in ls) + 2))

    def glued(row: list[Line]) -> bool:
        """A run of the row sits right under a line above it, at a paragraph's line spacing: the
        row continues prose (the short last lines of paragraphs in three columns)."""
        return any(all(o is not x for x in row) and min(o.box[2], l.box[2]) - max(o.box[0], l.box[0]) > 0
                   and -2 <= l.box[1] - o.box[3] < 0.6 * body for l in row for o in free)

    for row in rows:
        top = min(l.box[1] for l in row)
        if group and cells(row) and top - max(l.box[3] for l in group[-1]) < 3 * body:
            group.append(row)
            continue
        close()
        group = [row] if cells(row) and not glued(row) else []
    close()
    return regions


def analyze_vector(lines: list[Line], layout: VectorLayout) -> PageAnalysis:
    """What the layout model gives assemble(), from the PDF's own objects."""
    w, h = layout.size
    hmask = np.zeros((h, w), np.uint8)
    vmask = np.zeros((h, w), np.uint8)
    for x1, y1, x2, y2 in layout.rules:
        mask = hmask if x2 - x1 >= y2 - y1 else vmask
        cv2.rectangle(mask, (max(0, x1), max(0, y1)), (min(w - 1, x2), min(h - 1, y2)), 255, -1)
    drawings = layout.shapes + layout.images
    # A grid is a table when it is mostly paper: shaded cells are fine, a bar chart's filled bars
    # between its gridlines are not (tables.paper_grids, from the PDF's objects).
    grids = [g for g in find_grids(hmask, vmask) if _filled(g.box, drawings) < MAX_FILLED]
    grid_boxes = [g.box for g in grids]
    drawings = [d for d in drawings if not any(_centre_in(d, g) for g in grid_boxes)]  # cell shading
    loose = [r for r in layout.rules if not any(_touch(r, g, 2) for g in grid_boxes)]
    regions = [Region(box, "figure", 1.0) for box, drawing in
               _clusters([(d, True) for d in drawings] + [(r, False) for r in loose]) if drawing]
    taken = grid_boxes + [r.box for r in regions]
    regions += [Region(box, "table", 1.0) for box in _borderless_regions(lines, taken)]
    return PageAnalysis(0, Image.new("1", (w, h)), regions, grids, [])
