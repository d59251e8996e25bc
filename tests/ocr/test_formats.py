"""Output formats (ocr/formats.py), box drawing (ocr/annotate.py), and the /ocr parameters that use
them (format, region, PDF pages, /ocr/annotate) against the fake adapter, in-process."""
from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.types import OcrBlock
from ocr import formats
from ocr.annotate import annotate, colour_of
from ocr.service import OcrOutcome, PageOutcome
from server.app import create_app
from tests.conftest import fake_settings
from tests.pdf_docs import encrypted_pdf, text_pdf

LAYOUT = [OcrBlock("Annual Report", (10, 10, 200, 40), None, "Title", 0),
          OcrBlock("1. Results", (10, 50, 200, 70), None, "Section-header", 0),
          OcrBlock("Revenue grew.", (10, 80, 200, 100), None, "Text", 0),
          OcrBlock("first point", (10, 110, 200, 120), None, "List-item", 0),
          OcrBlock("E = mc^2", (10, 130, 200, 150), None, "Formula", 0),
          OcrBlock("<table><tr><td>1</td></tr></table>", (10, 160, 200, 190), None, "Table", 0),
          OcrBlock("", (10, 200, 100, 260), None, "Picture", 0),
          OcrBlock("page 1", (10, 280, 50, 290), None, "Page-footer", 0)]


def outcome(pages: list[PageOutcome], fmt: str = "text") -> OcrOutcome:
    return OcrOutcome(text="\n\n".join(p.text for p in pages), model="m", blocks=[b for p in pages for b in p.blocks],
                      image_size=pages[0].image_size, pages=len(pages), processing_time=0.1, language=None,
                      format=fmt, page_results=pages)


def test_markdown_from_categories():
    md = formats.page_markdown(PageOutcome(0, "ignored", LAYOUT, (300, 300)))
    assert md.split("\n\n") == ["# Annual Report", "## 1. Results", "Revenue grew.", "- first point",
                                "$$\nE = mc^2\n$$", "<table><tr><td>1</td></tr></table>"]


def test_markdown_without_categories_is_the_text_and_pages_join():
    plain = [OcrBlock("hello", (0, 0, 5, 5), 0.9)]
    out = outcome([PageOutcome(0, "hello", plain, (10, 10)), PageOutcome(1, "# Already md", [], (10, 10))])
    assert formats.document_markdown(out) == "hello\n\n# Already md"
    assert formats.render(out, "markdown") == formats.document_markdown(out)
    assert formats.render(out, "text") == "hello\n\n# Already md"


def test_json_blocks_carry_reading_order_per_page():
    blocks = [OcrBlock("a", (0, 0, 1, 1), 0.5, None, 0), OcrBlock("b", None, None, None, 0),
              OcrBlock("c", (0, 0, 1, 1), None, "Text", 1)]
    rows = formats.blocks_json(blocks)
    assert [(r["page"], r["reading_order"]) for r in rows] == [(0, 0), (0, 1), (1, 0)]
    assert rows[0] == {"text": "a", "box": [0, 0, 1, 1], "confidence": 0.5, "category": None, "page": 0,
                       "reading_order": 0}
    doc = json.loads(formats.render(outcome([PageOutcome(0, "a b", blocks[:2], (10, 10)),
                                             PageOutcome(1, "c", blocks[2:], (10, 10))]), "json"))
    assert [p["page"] for p in doc["pages"]] == [0, 1] and doc["pages"][1]["blocks"][0]["category"] == "Text"


def test_annotate_draws_coloured_boxes_and_returns_png():
    page = Image.new("RGB", (300, 300), "white")
    png = annotate(page, LAYOUT)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (300, 300)
    assert img.getpixel((100, 40)) == colour_of("Title")  # the title box's bottom edge
    assert colour_of("Table") != colour_of("Title") and colour_of("Unknown-kind") == colour_of("whatever")
    assert page.getpixel((100, 40)) == (255, 255, 255)  # the caller's image is untouched


# ---- through the HTTP layer, with the fake OCR adapter ---------------------------------------
def png_bytes(w=200, h=100) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def client(tmp_path, fake_kind):
    with TestClient(create_app(fake_settings(tmp_path, {"fast": {}})), raise_server_exceptions=False) as c:
        yield c


def test_format_json_and_markdown_shapes(client):
    r = client.post("/ocr", files={"file": ("a.png", png_bytes())}, data={"format": "json"})
    body = r.json()
    assert r.status_code == 200 and body["format"] == "json" and body["pages"] == 1
    assert body["text"] == "fast 200x100" and body["markdown"] is None
    (page,) = body["page_results"]
    assert page["page"] == 0 and page["image_size"] == [200, 100] and page["text"] == body["text"]
    assert page["blocks"][0] == {"text": "fast 200x100", "box": [0, 0, 200, 100], "confidence": 0.9,
                                 "category": None, "page": 0, "reading_order": 0, "cells": None}
    r = client.post("/ocr", files={"file": ("a.png", png_bytes())}, params={"format": "markdown"})
    assert r.json()["markdown"] == "fast 200x100" and r.json()["page_results"] is None
    plain = client.post("/ocr", files={"file": ("a.png", png_bytes())}).json()
    assert plain["format"] == "text" and plain["page_results"] is None and plain["blocks"][0]["reading_order"] == 0


@pytest.mark.parametrize("params,code", [({"format": "xml"}, "INVALID_FORMAT"), ({"region": "1,2,3"}, "INVALID_REGION"),
                                         ({"region": "5,5,2,9"}, "INVALID_REGION"),
                                         ({"region": "500,500,600,600"}, "INVALID_REGION")])
def test_bad_format_or_region_is_422(client, params, code):
    r = client.post("/ocr", files={"file": ("a.png", png_bytes())}, data=params)
    assert r.status_code == 422 and r.json()["code"] == code


def test_region_crops_for_cpu_engines_and_offsets_boxes_back(client):
    r = client.post("/ocr", files={"file": ("a.png", png_bytes())}, data={"region": "50,20,150,80"})
    body = r.json()
    assert body["text"] == "fast 100x60"  # the engine saw the crop only
    assert body["blocks"][0]["box"] == [50, 20, 150, 80]  # in the upload's pixels


def test_pdf_pages_each_get_a_result(client):
    data, _ = text_pdf(3)
    body = client.post("/ocr", files={"file": ("doc.pdf", data)}).json()
    assert body["pages"] == 3 and body["image_size"] == [900, 420]
    assert [p["page"] for p in body["page_results"]] == [0, 1, 2]
    assert body["text"] == "\n\n".join(p["text"] for p in body["page_results"])
    assert [b["page"] for b in body["blocks"]] == [0, 1, 2]
    r = client.post("/ocr", files={"file": ("doc.pdf", encrypted_pdf())})
    assert r.status_code == 400 and r.json()["code"] == "PDF_ENCRYPTED"
    r = client.post("/chat", files={"file": ("doc.pdf", data)})
    assert r.status_code == 415  # PDFs are for OCR only


def test_batch_mixes_pdf_and_image_items(client):
    data, _ = text_pdf(2)
    r = client.post("/batch/ocr", files=[("files", ("d.pdf", data)), ("files", ("a.png", png_bytes())),
                                         ("files", ("bad.pdf", encrypted_pdf()))], data={"format": "json"})
    pdf_item, png_item, bad = r.json()["results"]
    assert pdf_item["status"] == "success" and pdf_item["pages"] == 2 and len(pdf_item["page_results"]) == 2
    assert png_item["status"] == "success" and png_item["pages"] == 1 and len(png_item["page_results"]) == 1
    assert bad["status"] == "error" and bad["code"] == "PDF_ENCRYPTED"


def test_annotate_endpoint_answers_a_png_of_the_page(client):
    data, _ = text_pdf(2)
    r = client.post("/ocr/annotate", files={"file": ("d.pdf", data)}, data={"page": "1"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (900, 420)
    r = client.post("/ocr/annotate", files={"file": ("d.pdf", data)}, params={"page": 5})
    assert r.status_code == 422 and r.json()["code"] == "PAGE_OUT_OF_RANGE"
    spec = client.get("/openapi.json").json()["paths"]["/ocr/annotate"]["post"]
    assert "image/png" in spec["responses"]["200"]["content"]
    assert {"format", "region"} <= {p["name"] for p in client.get("/openapi.json").json()["paths"]["/ocr"]["post"]
                                    .get("parameters", [])}
