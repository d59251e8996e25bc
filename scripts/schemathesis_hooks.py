"""Schemathesis hooks: real files for the media types our upload routes declare.

The OpenAPI of /ocr, /ocr/annotate, /chat and /batch/ocr says each file part holds
image/jpeg, image/png, image/bmp, image/tiff (or application/pdf). JSON Schema cannot say
"decodable pixels", so without these strategies schemathesis would send random bytes as a
"valid" image. Here each media type generates an actual file of that type: random size,
colour mode and content (noise or drawn text-like strokes), so positive cases exercise the
decoders and the OCR/chat paths, while negative cases still send garbage.

Loaded by scripts/run_schemathesis.py through SCHEMATHESIS_HOOKS (with scripts/schemathesis.toml).
"""
from __future__ import annotations

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image, ImageDraw


@st.composite
def _picture(draw: st.DrawFn) -> Image.Image:
    w = draw(st.integers(8, 320))
    h = draw(st.integers(8, 240))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1"]))
    background = draw(st.integers(0, 255))
    img = Image.new("RGB", (w, h), (background,) * 3)
    pen = ImageDraw.Draw(img)
    for _ in range(draw(st.integers(0, 6))):  # a few strokes and words
        x, y = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        ink = (255 - background,) * 3
        if draw(st.booleans()):
            pen.text((x, y), draw(st.text("ABCXYZ0189 ", min_size=1, max_size=8)), fill=ink)
        else:
            pen.line((x, y, draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))), fill=ink, width=2)
    return img if mode == "RGB" else img.convert(mode)


def _encoded(fmt: str) -> st.SearchStrategy[bytes]:
    def save(img: Image.Image) -> bytes:
        if fmt == "JPEG" and img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()

    return _picture().map(save)


def _pdf(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "PDF")
    return buf.getvalue()


schemathesis.openapi.media_type("image/png", _encoded("PNG"))
schemathesis.openapi.media_type("image/jpeg", _encoded("JPEG"))
schemathesis.openapi.media_type("image/bmp", _encoded("BMP"))
schemathesis.openapi.media_type("image/tiff", _encoded("TIFF"))
schemathesis.openapi.media_type("application/pdf", _picture().map(_pdf))
# Free-text multipart fields (prompt, language): any short text. A multipart part is text by
# nature, so "a JSON array in the prompt field" is text too, not a type violation.
schemathesis.openapi.media_type("text/plain", st.text(max_size=64).map(lambda t: t.encode("utf-8")))

# OpenAI image_url.url declares the custom format "image-url": a data: URL of a real image.
schemathesis.openapi.format("image-url", _encoded("PNG").map(
    lambda data: "data:image/png;base64," + base64.b64encode(data).decode("ascii")))
