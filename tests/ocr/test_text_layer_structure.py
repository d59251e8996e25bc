"""The fast path for PDF pages with a text layer (ocr/document/vector.py): the page's structure
from the PDF's own objects, no rendering and no layout model; scanned pages fall back to it."""
from __future__ import annotations

import asyncio
import io

from core.config import LimitsSettings
from core.types import CancelToken
from models.adapter import OcrOptions
from ocr.document.adapter import vector_enabled
from ocr.document.pages import DocumentPages
from ocr.pages import ImageDecoder
from scripts.make_doc_pages import draw_pdf, draw_png, make_page, scanned_pdf

SEED = 23  # not the bench's seed (7)


def read(data: bytes, structure: bool = True):
    """The pages as the service reads them with doc_cpu: decoded, then through DocumentPages with
    no reader at all (the fast path needs neither the layout model nor an OCR engine)."""
    async def go():
        doc = await ImageDecoder(LimitsSettings()).decode_pages(data, target_max_pixels=4_000_000,
                                                                 text_layer=True, structure=structure)
        pages = DocumentPages(reader=None)  # type: ignore[arg-type]
        return doc, [await pages.read_page("doc_cpu", p, i, OcrOptions(format="json"), None, CancelToken())
                     for i, p in enumerate(doc.pages)]
    return asyncio.run(go())


def test_headings_lists_tables_and_captions_from_the_pdf_itself():
    spec = make_page(0, "en", False, seed=SEED)
    doc, (page,) = read(draw_pdf([spec]))
    assert doc.pages[0].structure is not None and doc.pages[0].image.size == (1, 1)  # the path: not rendered
    got = [(b.category, b.text) for b in page.blocks]
    truth = [(b.category, b.text) for b in spec.blocks if b.category in ("Title", "Section-header", "List-item",
                                                                          "Caption", "Page-header", "Page-footer")]
    for t in truth:
        assert t in got, (t, got)
    heads = [t for c, t in got if c in ("Title", "Section-header")]
    assert len(heads) == sum(1 for b in spec.blocks if b.category in ("Title", "Section-header"))
    assert page.blocks[0].category == "Page-header" and page.blocks[-1].category == "Page-footer"
    tables = [b for b in page.blocks if b.category == "Table"]
    want = [sorted((c.row, c.col, c.rowspan, c.colspan, c.text) for c in b.cells)
            for b in spec.blocks if b.category == "Table"]
    assert [sorted((c["row"], c["col"], c["rowspan"], c["colspan"], c["text"]) for c in t.cells)
            for t in tables] == want  # the ruled table with its spanning header, then the borderless one
    assert 'colspan="3"' in tables[0].text and 'rowspan="2"' in tables[0].text
    picture = next(i for i, b in enumerate(page.blocks) if b.category == "Picture")
    assert page.blocks[picture + 1].category == "Caption"  # the figure's caption right after it
    caption = next(i for i, b in enumerate(page.blocks) if b.text.startswith("Table "))
    assert page.blocks[caption + 1] is tables[0]


def test_two_columns_are_read_column_by_column():
    spec = make_page(1, "ru", True, seed=SEED)
    _, (page,) = read(draw_pdf([spec]))
    body = [b.text for b in spec.blocks if b.category in ("Section-header", "Text")]
    got = [b.text for b in page.blocks]
    assert [got.index(t) for t in body] == sorted(got.index(t) for t in body)


def test_three_columns_are_read_column_by_column_and_are_no_table():
    """Lines of prose in three columns are short and far apart, like a borderless table's cells:
    they stay paragraphs, and the short heading over the full-width paragraph between the column
    bands is read with that paragraph, not at the end of the first column."""
    for index, language in ((0, "en"), (2, "ru")):
        spec = make_page(index, language, False, seed=SEED, columns=3)
        _, (page,) = read(draw_pdf([spec]))
        assert [b.category for b in page.blocks if b.category == "Table"] == ["Table"]  # the captioned one only
        body = [b.text for b in spec.blocks if b.category in ("Title", "Section-header", "Text", "Caption")]
        got = [b.text for b in page.blocks]
        assert all(t in got for t in body), [t for t in body if t not in got]
        assert [got.index(t) for t in body] == sorted(got.index(t) for t in body)
        table = next(i for i, b in enumerate(page.blocks) if b.category == "Table")
        assert page.blocks[table - 1].category == "Caption" and page.blocks[table + 1].category == "Page-footer"


def test_scans_and_the_option_off_take_the_layout_model():
    spec = make_page(0, "en", False, seed=SEED)
    doc, _ = asyncio.run(_decode(scanned_pdf([draw_png(spec)])))
    assert doc.pages[0].structure is None and doc.pages[0].text_lines is None
    # a scan with an OCR'd text layer: the page image covers the page, its text has no structure
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(595, 842))
    pdf.add_page()
    buf = io.BytesIO()
    draw_png(spec).save(buf, "PNG")
    pdf.image(buf, 0, 0, 595, 842)
    pdf.set_font("helvetica", size=10)
    pdf.text(50, 100, "An OCR text layer over the scanned page image")
    doc, _ = asyncio.run(_decode(bytes(pdf.output())))
    assert doc.pages[0].text_lines is not None and doc.pages[0].structure is None
    assert doc.pages[0].image.size != (1, 1)  # rendered for the layout model
    doc, _ = asyncio.run(_decode(draw_pdf([spec]), structure=False))
    assert doc.pages[0].structure is None and doc.pages[0].text_lines is not None
    assert vector_enabled({}) and not vector_enabled({"text_layer_structure": "false"})
    assert not vector_enabled({"text_layer_structure": False})


async def _decode(data: bytes, structure: bool = True):
    doc = await ImageDecoder(LimitsSettings()).decode_pages(data, target_max_pixels=4_000_000, text_layer=True,
                                                             structure=structure)
    return doc, None




def _pdf(draw) -> bytes:
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(595, 842))
    pdf.add_page()
    pdf.set_font("helvetica", size=10)
    pdf.text(50, 60, "A page drawn for the fast path with enough text to count as a text layer.")
    draw(pdf)
    return bytes(pdf.output())


def test_shaded_cells_stay_a_table_and_a_chart_with_gridlines_is_a_picture():
    def table(pdf):
        pdf.set_fill_color(200)
        pdf.rect(50, 100, 300, 20, style="F")  # a shaded header row
        for r in range(5):
            pdf.line(50, 100 + 20 * r, 350, 100 + 20 * r)
        for c in range(4):
            pdf.line(50 + 100 * c, 100, 50 + 100 * c, 180)
        for r, row in enumerate([["Name", "Plan", "Actual"], ["roads", "12", "14"], ["parks", "7", "9"],
                                 ["water", "30", "28"]]):
            for c, text in enumerate(row):
                pdf.text(56 + 100 * c, 114 + 20 * r, text)

    _, (page,) = read(_pdf(table))
    (tb,) = [b for b in page.blocks if b.category == "Table"]
    assert not [b for b in page.blocks if b.category == "Picture"]
    assert sorted((c["row"], c["col"], c["text"]) for c in tb.cells)[:3] == [(0, 0, "Name"), (0, 1, "Plan"),
                                                                             (0, 2, "Actual")]

    def chart(pdf):
        for k in range(5):  # horizontal gridlines, and a frame: a grid of rules
            pdf.line(50, 300 + 30 * k, 350, 300 + 30 * k)
        pdf.line(50, 300, 50, 420)
        pdf.line(350, 300, 350, 420)
        pdf.set_fill_color(90)
        for i, top in enumerate((320, 350, 310, 380, 340)):
            pdf.rect(70 + 55 * i, top, 35, 420 - top, style="F")

    _, (page,) = read(_pdf(chart))
    assert not [b for b in page.blocks if b.category == "Table"]
    (pic,) = [b for b in page.blocks if b.category == "Picture"]
    assert abs(pic.box[1] - round(300 * 150 / 72)) <= 4 and abs(pic.box[2] - round(350 * 150 / 72)) <= 4


def test_a_rotated_page_takes_the_layout_model():
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(draw_pdf([make_page(0, "en", False, seed=SEED)]))
    doc[0].set_rotation(90)
    buf = io.BytesIO()
    doc.save(buf)
    decoded, _ = asyncio.run(_decode(buf.getvalue()))
    assert decoded.pages[0].text_lines is not None and decoded.pages[0].structure is None
