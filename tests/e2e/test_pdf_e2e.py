"""PDF input and structured output end to end: the real server, RapidOCR reading generated pages."""
from __future__ import annotations

import io
import shutil
import subprocess

import pytest
import requests
from PIL import Image

from tests.e2e.conftest import similarity
from tests.pdf_docs import blank_pdf, encrypted_pdf, page_lines, text_page, text_pdf, truncated


@pytest.fixture(scope="module")
def doc():
    return text_pdf(3)


def post(server, path, files, **params):
    return requests.post(f"{server.url}{path}", files=files, params={"model": "rapidocr", **params}, timeout=120)


def test_pdf_pages_are_read_back(cpu_server, doc):
    data, expected = doc
    r = post(cpu_server, "/ocr", {"file": ("doc.pdf", data, "application/pdf")}, format="json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "rapidocr" and body["pages"] == 3 and body["image_size"] == [900, 420]
    for page, want in zip(body["page_results"], expected):
        assert similarity(page["text"], want) >= 0.9, (page["text"], want)
        assert page["image_size"] == [900, 420]
        assert [b["reading_order"] for b in page["blocks"]] == list(range(len(page["blocks"])))
        assert all(0 <= b["confidence"] <= 1 and b["page"] == page["page"] for b in page["blocks"])
        first = page["blocks"][0]  # "PAGE n ..." drawn at (40, 40): its box is in page pixels
        assert first["box"][0] < 80 and first["box"][1] < 80
    assert similarity(body["text"], "\n\n".join(expected)) >= 0.9


def test_markdown_and_region(cpu_server, doc):
    data, expected = doc
    body = post(cpu_server, "/ocr", {"file": ("doc.pdf", data)}, format="markdown").json()
    assert similarity(body["markdown"], "\n\n".join(expected)) >= 0.9
    # the second line of each page only (drawn at y = 150..200)
    body = post(cpu_server, "/ocr", {"file": ("doc.pdf", data)}, region="0,130,900,230").json()
    for page, lines in zip(body["page_results"], [page_lines(i) for i in range(3)]):
        assert similarity(page["text"], lines[1]) >= 0.9, page["text"]
        assert all(130 <= b["box"][1] and b["box"][3] <= 230 for b in page["blocks"])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_pdf_errors_with_curl(cpu_server, tmp_path):
    cases = {"enc.pdf": (encrypted_pdf(), 400, "PDF_ENCRYPTED"),
             "broken.pdf": (truncated(text_pdf(2)[0]), 400, "INVALID_PDF"),
             "long.pdf": (blank_pdf(21), 413, "TOO_MANY_PAGES"),
             "huge.pdf": (blank_pdf(1, (14_400, 14_400)), 413, "PAGE_TOO_LARGE")}
    for name, (data, status, code) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-F", f"file=@{path}", f"{cpu_server.url}/ocr"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        body, got = out.rsplit("\n", 1)
        assert int(got) == status and f'"{code}"' in body, (name, out)


def test_annotate_returns_a_png_of_the_page(cpu_server, doc):
    data, _ = doc
    r = post(cpu_server, "/ocr/annotate", {"file": ("doc.pdf", data)}, page=2)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size == (900, 420)
    assert len(img.convert("RGB").getcolors(1 << 16) or []) > 2  # boxes drawn over black-on-white text


def test_batch_with_a_pdf_and_an_image(cpu_server, doc):
    data, expected = doc
    buf = io.BytesIO()
    text_page(page_lines(7)).save(buf, "PNG")
    r = post(cpu_server, "/batch/ocr", [("files", ("doc.pdf", data)), ("files", ("page.png", buf.getvalue()))])
    pdf_item, png_item = r.json()["results"]
    assert pdf_item["status"] == png_item["status"] == "success"
    assert pdf_item["pages"] == 3 and len(pdf_item["page_results"]) == 3
    assert similarity(pdf_item["text"], "\n\n".join(expected)) >= 0.9
    assert similarity(png_item["text"], "\n".join(page_lines(7))) >= 0.9
