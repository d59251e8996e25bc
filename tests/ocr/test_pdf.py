"""PDF rendering (ocr/pdf.py) and the page model (ocr/pages.py): sizes, limits, refusals."""
from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from core.config import LimitsSettings
from core.errors import BadRequest, InvalidParameter, PayloadTooLarge, UnsupportedMediaType
from core.types import OcrBlock
from ocr import pdf
from ocr.pages import ImageDecoder, Page, region_on, to_original
from tests.pdf_docs import blank_pdf, encrypted_pdf, text_page, text_pdf, truncated


def render(data: bytes, **kw):
    args = dict(dpi=150, max_pages=20, max_pixels=50_000_000)
    return pdf.render_pdf(data, **{**args, **kw})


def test_pages_come_back_at_the_dpi_they_were_laid_out_for():
    data, _ = text_pdf(3)
    pages = render(data)
    assert [p.original_size for p in pages] == [(900, 420)] * 3
    assert all(p.image.size == (900, 420) and p.image.mode == "RGB" for p in pages)
    assert render(data, dpi=300)[0].original_size == (1800, 840)  # the same page, finer
    # the drawn text is there: dark pixels where the first line was drawn
    assert pages[0].image.crop((40, 40, 400, 90)).convert("L").getextrema()[0] < 100


def test_target_renders_smaller_without_changing_the_original_size():
    data, _ = text_pdf(1)
    page = render(data, dpi=300, target_max_pixels=100_000)[0]
    assert page.original_size == (1800, 840)
    assert page.image.width * page.image.height <= 100_000 * 1.01 and page.image.width > 400


def test_only_page_and_out_of_range():
    data, _ = text_pdf(3)
    assert len(render(data, only_page=2)) == 1
    with pytest.raises(InvalidParameter) as exc:
        render(data, only_page=3)
    assert exc.value.code == "PAGE_OUT_OF_RANGE"


@pytest.mark.parametrize("data,error,code", [
    (encrypted_pdf(), BadRequest, "PDF_ENCRYPTED"),
    (truncated(text_pdf(2)[0]), BadRequest, "INVALID_PDF"),
    (b"%PDF-1.7\nnot really", BadRequest, "INVALID_PDF"),
    (blank_pdf(21), PayloadTooLarge, "TOO_MANY_PAGES"),
    (blank_pdf(1, (14_400, 14_400)), PayloadTooLarge, "PAGE_TOO_LARGE"),  # 30000 x 30000 px at 150 dpi
])
def test_refusals(data, error, code):
    with pytest.raises(error) as exc:
        render(data)
    assert exc.value.code == code
    assert "pdfium" not in exc.value.message.lower() and "/" not in exc.value.message


def test_page_limit_is_the_setting():
    assert len(render(blank_pdf(5), max_pages=5)) == 5
    with pytest.raises(PayloadTooLarge):
        render(blank_pdf(6), max_pages=5)


def test_concurrent_renders_are_serialised_safely():
    data, _ = text_pdf(2)
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(3):
                assert len(render(data)) == 2
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---- the page model ---------------------------------------------------------------------
def decoder(**kw) -> ImageDecoder:
    return ImageDecoder(LimitsSettings(**kw))


def test_decoder_gives_pdf_pages_and_image_pages_alike():
    data, _ = text_pdf(2)
    doc = asyncio.run(decoder().decode_pages(data, target_max_pixels=None))
    assert doc.format == "PDF" and len(doc.pages) == 2 and doc.pages[1].original_size == (900, 420)
    buf = io.BytesIO()
    text_page(["x"]).save(buf, "TIFF", save_all=True, append_images=[text_page(["y"])])
    doc = asyncio.run(decoder().decode_pages(buf.getvalue(), target_max_pixels=90_000))
    assert doc.format == "TIFF" and len(doc.pages) == 2
    assert all(p.original_size == (900, 420) and p.image.width < 900 for p in doc.pages)
    one = asyncio.run(decoder().decode_pages(buf.getvalue(), target_max_pixels=None, only_page=1))
    assert one.first_page == 1 and len(one.pages) == 1


def test_pdf_refused_when_not_allowed_and_by_the_chat_decoder():
    data, _ = text_pdf(1)
    with pytest.raises(UnsupportedMediaType):
        asyncio.run(decoder(allowed_formats=["PNG"]).decode_pages(data, target_max_pixels=None))
    with pytest.raises(UnsupportedMediaType):  # decode() serves /chat: images only
        asyncio.run(decoder().decode(data, target_max_pixels=None, all_frames=False))


def test_max_pdf_pages_setting_applies():
    with pytest.raises(PayloadTooLarge) as exc:
        asyncio.run(decoder(max_pdf_pages=2).decode_pages(blank_pdf(3), target_max_pixels=None))
    assert exc.value.code == "TOO_MANY_PAGES"


def test_region_and_boxes_map_between_original_and_model_pixels():
    page = Page(Image.new("RGB", (450, 210)), (900, 420))  # the model reads at half size
    assert region_on(page, (100, 40, 500, 4000)) == (50, 20, 250, 210)  # clipped to the page
    assert region_on(page, (950, 0, 990, 10)) is None
    block = OcrBlock("a", (10, 5, 60, 25), 0.5)
    assert to_original(block, page, 3, offset=(50, 20)).box == (120, 50, 220, 90)
    assert to_original(block, page, 3).page == 3
