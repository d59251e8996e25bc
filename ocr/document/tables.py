"""Table structure: ruled tables from their ruling lines (OpenCV morphology), borderless tables
from the alignment of their text, and both as HTML with rowspan/colspan (as dots.ocr writes them).

All boxes are (x1, y1, x2, y2) in the page's pixels.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

import cv2
import numpy as np

Box = tuple[int, int, int, int]


@dataclass
class TableCell:
    row: int
    col: int
    rowspan: int
    colspan: int
    box: Box
    text: str = ""


@dataclass
class Grid:
    box: Box
    rows: int
    cols: int
    cells: list[TableCell] = field(default_factory=list)


def ruling_masks(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ink, horizontal rules, vertical rules) as 0/255 masks of the page."""
    h, w = gray.shape
    ink = cv2.adaptiveThreshold(255 - gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 15, -10)
    # A rule is a run of ink far longer than any letter stroke.
    hk = cv2.getStructuringElement(cv2.MORPH_RECT, (max(25, w // 25), 1))
    vk = cv2.getStructuringElement(cv2.MORPH_RECT, (1, max(20, h // 60)))
    return ink, cv2.morphologyEx(ink, cv2.MORPH_OPEN, hk), cv2.morphologyEx(ink, cv2.MORPH_OPEN, vk)


def _positions(profile: np.ndarray, min_count: float) -> list[int]:
    """Centres of the runs of indices whose profile reaches ``min_count``."""
    idx = np.flatnonzero(profile >= min_count)
    if idx.size == 0:
        return []
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 2) + 1)
    return [int(r.mean()) for r in runs]


def find_grids(horizontal: np.ndarray, vertical: np.ndarray) -> list[Grid]:
    """Ruled tables: connected frames of rules with at least 2 x 2 cells, spans read from missing rules."""
    frame = cv2.dilate(cv2.bitwise_or(horizontal, vertical), np.ones((5, 5), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(frame, connectivity=8)
    grids = []
    for i in range(1, n):
        x, y, w, h, _ = (int(v) for v in stats[i])  # numpy ints would reach the JSON of jobs
        if w < 60 or h < 30:
            continue
        hs = horizontal[y:y + h, x:x + w] > 0
        vs = vertical[y:y + h, x:x + w] > 0
        ys = _positions(hs.sum(axis=1), 0.15 * w)
        xs = _positions(vs.sum(axis=0), 0.15 * h)
        if len(ys) < 2 or len(xs) < 2 or (len(ys) - 1) * (len(xs) - 1) < 2:
            continue
        grids.append(_grid(hs, vs, xs, ys, (x, y)))
    return grids


def paper_grids(grids: list[Grid], gray: np.ndarray, max_filled: float = 0.3) -> list[Grid]:
    """The grids that are tables: a bar chart's filled bars have long straight edges that look
    like rules, but a table is mostly paper (text and rules cover under a tenth of it)."""
    return [g for g in grids if (gray[g.box[1]:g.box[3], g.box[0]:g.box[2]] < 200).mean() < max_filled]


def _grid(hs: np.ndarray, vs: np.ndarray, xs: list[int], ys: list[int], origin: tuple[int, int]) -> Grid:
    rows, cols = len(ys) - 1, len(xs) - 1

    def has_v(c: int, r: int) -> bool:  # the rule right of elementary cell (r, c - 1)
        band = vs[ys[r] + 2:ys[r + 1] - 1, max(0, xs[c] - 3):xs[c] + 4].any(axis=1)
        return band.size > 0 and band.mean() > 0.6

    def has_h(r: int, c: int) -> bool:  # the rule above elementary cell (r, c)
        band = hs[max(0, ys[r] - 3):ys[r] + 4, xs[c] + 2:xs[c + 1] - 1].any(axis=0)
        return band.size > 0 and band.mean() > 0.6

    owner = [[-1] * cols for _ in range(rows)]
    cells: list[TableCell] = []
    ox, oy = origin
    for r in range(rows):
        for c in range(cols):
            if owner[r][c] >= 0:
                continue
            cs = 1
            while c + cs < cols and not has_v(c + cs, r) and owner[r][c + cs] < 0:
                cs += 1
            rs = 1
            while r + rs < rows and all(not has_h(r + rs, cc) for cc in range(c, c + cs)):
                rs += 1
            for rr in range(r, r + rs):
                for cc in range(c, c + cs):
                    owner[rr][cc] = len(cells)
            cells.append(TableCell(r, c, rs, cs, (ox + xs[c], oy + ys[r], ox + xs[c + cs], oy + ys[r + rs])))
    box = (ox + xs[0], oy + ys[0], ox + xs[-1], oy + ys[-1])
    return Grid(box, rows, cols, cells)


def segments(ink: np.ndarray, horizontal: np.ndarray, vertical: np.ndarray) -> list[Box]:
    """Blocks of text ink (rules removed): letters merge into words and lines, lines into
    paragraphs; gaps wider than a few letters (columns, table columns) stay apart."""
    text = cv2.subtract(ink, cv2.dilate(cv2.bitwise_or(horizontal, vertical), np.ones((3, 3), np.uint8)))
    h, w = text.shape
    merged = cv2.dilate(text, cv2.getStructuringElement(cv2.MORPH_RECT, (max(9, w // 80), max(5, h // 250))))
    n, _, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
    out = []
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if bw * bh >= 60 and bh >= 6:
            out.append((int(x), int(y), int(x + bw), int(y + bh)))
    return out


def fill_cells(grid: Grid, lines: list[tuple[str, Box]], joiner: str = " ") -> list[tuple[str, Box]]:
    """Give each cell the text lines whose centre lies in it; returns the lines left over."""
    texts: dict[int, list[tuple[str, Box]]] = {}
    rest = []
    for text, box in lines:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        hit = next((i for i, c in enumerate(grid.cells)
                    if c.box[0] <= cx <= c.box[2] and c.box[1] <= cy <= c.box[3]), None)
        if hit is None:
            rest.append((text, box))
        else:
            texts.setdefault(hit, []).append((text, box))
    for i, cell in enumerate(grid.cells):
        parts = sorted(texts.get(i, []), key=lambda t: (t[1][1], t[1][0]))
        cell.text = joiner.join(t for t, _ in parts).strip()
    return rest


def borderless(box: Box, lines: list[tuple[str, Box]], joiner: str = " ") -> Grid | None:
    """A table without rules: rows from the lines' vertical positions, columns from the vertical
    gaps that no line crosses. None when the text does not form at least 2 x 2 cells."""
    if len(lines) < 4:
        return None
    heights = sorted(b[3] - b[1] for _, b in lines)
    lh = max(1, heights[len(heights) // 2])
    rows: list[list[tuple[str, Box]]] = []
    for text, b in sorted(lines, key=lambda t: (t[1][1] + t[1][3]) / 2):
        cy = (b[1] + b[3]) / 2
        if rows and abs(cy - np.mean([(x[1][1] + x[1][3]) / 2 for x in rows[-1]])) < 0.6 * lh:
            rows[-1].append((text, b))
        else:
            rows.append([(text, b)])
    x0, x1 = min(b[0] for _, b in lines), max(b[2] for _, b in lines)
    covered = np.zeros(x1 - x0 + 1, bool)
    for _, b in lines:
        covered[b[0] - x0:b[2] - x0 + 1] = True
    # column boundaries: the middle of each uncovered run wider than a letter
    idx = np.flatnonzero(~covered)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if idx.size else []
    bounds = [x0 + int(r.mean()) for r in runs if r.size >= max(8, lh // 2)]
    if not bounds or len(rows) < 2:
        return None
    edges = [x0, *bounds, x1 + 1]
    cols = len(edges) - 1
    cells = []
    for r, row in enumerate(rows):
        top, bottom = min(b[1] for _, b in row), max(b[3] for _, b in row)
        for c in range(cols):
            parts = [(t, b) for t, b in row if edges[c] <= (b[0] + b[2]) / 2 < edges[c + 1]]
            text = joiner.join(t for t, _ in sorted(parts, key=lambda p: p[1][0])).strip()
            cells.append(TableCell(r, c, 1, 1, (edges[c], top, edges[c + 1] - 1, bottom), text))
    return Grid(box, len(rows), cols, cells)


def to_html(grid: Grid) -> str:
    """The table as HTML, the way dots.ocr answers tables (rowspan/colspan where cells span)."""
    by_row: dict[int, list[TableCell]] = {}
    for cell in grid.cells:
        by_row.setdefault(cell.row, []).append(cell)
    out = ["<table>"]
    for r in range(grid.rows):
        tds = []
        for cell in sorted(by_row.get(r, []), key=lambda c: c.col):
            span = (f' rowspan="{cell.rowspan}"' if cell.rowspan > 1 else "") + \
                   (f' colspan="{cell.colspan}"' if cell.colspan > 1 else "")
            tds.append(f"<td{span}>{html.escape(cell.text)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "".join(out)


def to_text(grid: Grid) -> str:
    """The table as plain text: one line per row, cells separated by ' | '."""
    rows: dict[int, list[TableCell]] = {}
    for cell in grid.cells:
        rows.setdefault(cell.row, []).append(cell)
    return "\n".join(" | ".join(c.text for c in sorted(cells, key=lambda c: c.col))
                     for _, cells in sorted(rows.items()))
