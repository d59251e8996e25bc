"""`pages` on /ocr (read some pages of a PDF, numbered as in the original) and POST /pages/render."""
from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ocr.page_ranges import parse_pages
from server.app import create_app
from tests.conftest import fake_settings
from tests.pdf_docs import pdf_of, text_page

# Pages of different widths: the fake OCR engine answers "<model> <w>x<h>", which names the page.
WIDTHS = (900, 910, 920)
PDF = pdf_of([text_page([f"PAGE {i + 1}"], size=(w, 420)) for i, w in enumerate(WIDTHS)])


@pytest.fixture
def client(tmp_path, fake_kind):
    with TestClient(create_app(fake_settings(tmp_path, {"fast": {}})), raise_server_exceptions=False) as c:
        yield c


def ocr(client, pages: str | None, data: bytes = PDF, **params):
    form = {"pages": pages} if pages is not None else {}
    return client.post("/ocr", files={"file": ("doc.pdf", data)}, data=form, params=params)


def test_parse_pages():
    assert parse_pages("2") == [1]
    assert parse_pages(" 1-3, 7 ,2") == [0, 1, 2, 6]
    assert parse_pages("") is None and parse_pages(None) is None
    for bad in ("0", "3-1", "a", "1-", "1,,2", "-2"):
        with pytest.raises(Exception) as exc:
            parse_pages(bad)
        assert exc.value.code == "INVALID_PAGES"


def test_selected_pages_keep_their_original_numbers(client):
    r = ocr(client, "2")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pages"] == 1 and body["text"] == "fast 910x420"
    assert [b["page"] for b in body["blocks"]] == [1]
    r = ocr(client, "1,3", format="json")
    body = r.json()
    assert body["pages"] == 2 and [p["page"] for p in body["page_results"]] == [0, 2]
    assert [p["text"] for p in body["page_results"]] == ["fast 900x420", "fast 920x420"]
    assert [b["page"] for b in body["blocks"]] == [0, 2]
    assert ocr(client, None).json()["pages"] == 3


def test_bad_page_selections(client):
    for pages, status, code in (("9", 400, "PAGE_OUT_OF_RANGE"), ("2-4", 400, "PAGE_OUT_OF_RANGE"),
                                ("x", 422, "INVALID_PAGES"), ("0", 422, "INVALID_PAGES")):
        r = ocr(client, pages)
        assert r.status_code == status, (pages, r.text)
        assert r.json()["code"] == code and r.json()["param"] == "pages"
    broken = ocr(client, "1", data=PDF[: len(PDF) // 3])
    assert broken.status_code == 400 and broken.json()["code"] == "INVALID_PDF"


def test_render_page_as_png(client):
    r = client.post("/pages/render", files={"file": ("doc.pdf", PDF)}, data={"page": "2"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (920, 420)
    assert r.headers["X-Page-Count"] == "3"  # how the playground knows a PDF is long enough for a job
    assert Image.open(io.BytesIO(client.post("/pages/render?page=0", files={"file": ("d.pdf", PDF)}).content)).size \
        == (900, 420)
    missing = client.post("/pages/render", files={"file": ("doc.pdf", PDF)}, data={"page": "3"})
    assert missing.status_code == 422 and missing.json()["code"] == "PAGE_OUT_OF_RANGE"
    assert client.post("/pages/render", json={"page": 0}).status_code == 415
    assert client.post("/pages/render", files={"file": ("x.txt", b"hello")}).status_code == 415
    assert client.post("/pages/render", files={"file": ("x.png", b"\x89PNG\r\n\x1a\nbroken")}).status_code == 400
