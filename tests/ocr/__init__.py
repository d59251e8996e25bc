"""OCR engine tests: real RapidOCR/Tesseract runs on the rendered samples in samples/."""
from __future__ import annotations

import difflib
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"


@lru_cache(maxsize=None)
def expected() -> dict[str, dict]:
    return json.loads((SAMPLES / "expected.json").read_text(encoding="utf-8"))


def load_rgb(name: str) -> Image.Image:
    """A sample as the adapters receive images: decoded, EXIF applied, RGB."""
    with Image.open(SAMPLES / name) as im:
        return im.convert("RGB")


def normalise(text: str, *, drop_spaces: bool = False) -> str:
    """NFKC (full-width "：" == ":"), whitespace collapsed, or removed for CJK text."""
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"\s+", "" if drop_spaces else " ", text).strip()


def similarity(got: str, want: str, *, drop_spaces: bool = False) -> float:
    return difflib.SequenceMatcher(None, normalise(got, drop_spaces=drop_spaces),
                                   normalise(want, drop_spaces=drop_spaces)).ratio()


def assert_blocks_sane(result, image: Image.Image) -> None:
    assert result.blocks, "no blocks"
    w, h = image.size
    for b in result.blocks:
        assert b.text.strip()
        assert b.box is not None
        x1, y1, x2, y2 = b.box
        assert all(isinstance(v, int) for v in b.box)
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, b
        assert b.confidence is not None and 0.0 <= b.confidence <= 1.0, b
