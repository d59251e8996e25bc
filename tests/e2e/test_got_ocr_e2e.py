"""GOT-OCR 2.0 served end to end: the tiny checkpoint through /ocr and /models."""
from __future__ import annotations

import io

import requests
from PIL import Image, ImageDraw


def png(size=(640, 320)) -> bytes:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((20, 20), "Invoice 12345  Total: 678.90", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_models_lists_got_ocr_installed_for_ocr(tiny_server):
    models = {m["id"]: m for m in requests.get(tiny_server.url + "/models", timeout=10).json()["available"]}
    got = models["got_ocr"]
    assert got["installed"] and got["kind"] == "got_ocr" and "ocr" in got["tasks"]


def test_ocr_with_got(tiny_server):
    r = requests.post(tiny_server.url + "/ocr", params={"model": "got_ocr"},
                      files={"file": ("page.png", png(), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "got_ocr" and isinstance(body["text"], str)


def test_ocr_with_got_json_over_a_region(tiny_server):
    """GOT gives lines without boxes; a region reaching past the page is clipped, not refused."""
    r = requests.post(tiny_server.url + "/ocr", data={"model": "got_ocr", "format": "json", "region": "10,10,900,200"},
                      files={"file": ("page.png", png(), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "got_ocr" and body["format"] == "json"
    assert all(b["box"] is None and b["category"] is None for b in body["blocks"])
