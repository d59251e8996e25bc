"""Lone dots and dashes re-decided from their ink (ocr/document/glyphs.py), on lines drawn here in
the fonts the system provides, at the sizes of 8-12 pt print scanned at 150 and 300 dpi."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ocr.document.glyphs import fix_symbols

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NOTO = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
NOTO_BOLD = "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc"
SIZES = (17, 21, 25, 40)


def line(text: str, font: str, px: int) -> np.ndarray:
    """The line as a scanner gives it: grey levels, a few pixels of white around the ink."""
    f = ImageFont.truetype(font, px)
    x1, y1, x2, y2 = f.getbbox(text)
    img = Image.new("L", (x2 - x1 + 8, y2 - y1 + 8), 255)
    ImageDraw.Draw(img).text((4 - x1, 4 - y1), text, font=f, fill=0)
    return np.asarray(img)


@pytest.mark.parametrize("px", SIZES)
@pytest.mark.parametrize("drawn,read", [
    ("• Item one of the list", "* Item one of the list"),        # Tesseract: no • in eng/rus
    ("• Школа здоровье служба", "+ Школа здоровье служба"),
    ("• Рост район гавань", ". Рост район гавань"),
    ("City Council · 2021", "City Council - 2021"),              # a separator Tesseract reads as -
    ("Городской совет · 2031", "Городской совет : 2031"),
    ("— 4 —", "- 4 -"),                                          # RapidOCR: an em dash as a hyphen
])
def test_misread_dots_and_dashes_are_recovered(drawn, read, px):
    assert fix_symbols(read, line(drawn, DEJAVU, px)) == drawn


@pytest.mark.parametrize("px", SIZES)
@pytest.mark.parametrize("drawn,read", [("•港道通住络预审成。", "·港道通住络预审成。"),
                                        ("•网数议房资议度场。", "・网数议房资议度场。")])
def test_small_cjk_bullet_is_a_bullet(drawn, read, px):
    assert fix_symbols(read, line(drawn, NOTO, px)) == drawn


@pytest.mark.parametrize("px", SIZES)
@pytest.mark.parametrize("font,text", [
    (DEJAVU, "Total 3.5 kg. See p. 12."),        # periods sit on the baseline
    (DEJAVU, "e-mail and x-ray - a dash"),       # hyphens stay hyphens
    (DEJAVU, "Price: 10 and 12 °C"),             # a colon is two dots, a degree sign is raised high
    (DEJAVU, "5 * 3 + 2 = 17"),                  # real operators
    (DEJAVU, "Report 2020–2021 · final"),        # an en dash is narrower than a tall glyph
    (NOTO_BOLD, "2. 预算与支出"),                  # a bold period beside Han glyphs
    (NOTO, "城市议会·2021"),
])
def test_what_is_read_right_is_left_alone(font, text, px):
    assert fix_symbols(text, line(text, font, px)) == text


def test_no_candidates_or_no_ink():
    blank = np.full((20, 200), 255, np.uint8)
    assert fix_symbols("plain words", line("plain words", DEJAVU, 21)) == "plain words"
    assert fix_symbols("* star", blank) == "* star"
    assert fix_symbols("* star", np.zeros((0, 0), np.uint8)) == "* star"
