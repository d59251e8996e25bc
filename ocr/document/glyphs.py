"""Dots and dashes read again from their ink.

The OCR engines cannot be trusted with a lone dot or dash: Tesseract's ``eng`` and ``rus``
models have no "•" or "·" in their character set at all (``combine_tessdata -u`` and their
``lstm-unicharset``), so a list bullet comes out as "*", "+", "." or "¢" and a " · " separator as
"-" or ":"; RapidOCR reads a small bullet (Noto CJK's "•" is 5 px at 10 pt and 150 dpi) as "·"
or "・", and an em dash as "-". These are the characters a reader sees as different, so the
pipeline looks at the glyph itself: a symbol character the engines confuse, whose ink is a
single solid round blob raised off the baseline, is a bullet "•" when it is at least a quarter
of the line's tall-glyph height across, a middle dot "·" when smaller; a single flat bar at least
as wide as a tall glyph is high is an em dash "—".

Characters are paired with ink glyphs (connected components grouped by horizontal overlap)
one to one when their counts agree; otherwise the line's first character is paired with its
first glyph (a list marker), and one-character words with one-glyph ink words when the line's
words and its ink words (split at wide gaps) agree in number. Anything else is left as the
engine read it.
"""
from __future__ import annotations

import re

import cv2
import numpy as np

# What engines write for a dot or a dash they cannot tell apart.
CANDIDATES = frozenset("•·・∙⋅●◦*+.:-–—−‐¢°")
BULLET = "•"
MIDDLE_DOT = "·"
EM_DASH = "—"
_DASHES = frozenset("-–—−‐")
BULLET_MIN = 0.25   # blob diameter over tall-glyph height: bullet above, middle dot below
EM_DASH_MIN = 0.95  # bar width over tall-glyph height (em dash ~1.1-1.5, en dash <= 0.8, hyphen ~0.4)


def _glyphs(gray: np.ndarray) -> list[dict]:
    """Ink glyphs left to right: components overlapping horizontally are one glyph ("й", ":")."""
    h = gray.shape[0]
    if gray.size == 0 or h < 4:
        return []
    _, ink = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    n, _, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    comps = []
    for i in range(1, n):
        x, y, w, hh, area = (int(v) for v in stats[i])
        # a neighbouring line's descenders or ascenders, cut by the crop's top or bottom edge
        if area < 2 or ((y == 0 or y + hh == h) and hh < 0.5 * h):
            continue
        comps.append((x, y, w, hh, area))
    comps.sort()
    groups: list[dict] = []
    for x, y, w, hh, area in comps:
        if groups and x < groups[-1]["x2"]:
            g = groups[-1]
            g["x2"] = max(g["x2"], x + w)
            g["y1"], g["y2"] = min(g["y1"], y), max(g["y2"], y + hh)
            g["parts"].append((x, y, w, hh, area))
        else:
            groups.append({"x1": x, "x2": x + w, "y1": y, "y2": y + hh, "parts": [(x, y, w, hh, area)]})
    return groups


def _decide(char: str, glyph: dict, tall: float, baseline: float) -> str:
    if len(glyph["parts"]) != 1:
        return char
    _, y, w, h, area = glyph["parts"][0]
    fill = area / max(1, w * h)
    raised = (baseline - (y + h / 2)) / tall
    if 0.6 <= w / h <= 1.67 and fill >= 0.62 and 0.3 <= raised <= 0.8 and max(w, h) <= 0.8 * tall:
        return BULLET if max(w, h) / tall >= BULLET_MIN else MIDDLE_DOT
    if w / h >= 2.5 and fill >= 0.6 and 0.1 <= raised <= 0.75 and char in _DASHES and w / tall >= EM_DASH_MIN:
        return EM_DASH
    return char


def fix_symbols(text: str, gray: np.ndarray) -> str:
    """``text`` with its lone dots and dashes re-decided from the line's ink (``gray``: the line's crop)."""
    if not any(c in CANDIDATES for c in text):
        return text
    glyphs = _glyphs(gray)
    if not glyphs:
        return text
    heights = sorted(g["y2"] - g["y1"] for g in glyphs)
    # the height of capitals and ascenders; a line of Cyrillic lower case has few of them, so its
    # 90th percentile can be the x-height: the tallest glyph (a capital, a bracket) bounds it below
    tall = max(float(heights[min(len(heights) - 1, int(0.9 * len(heights)))]), 0.8 * heights[-1])
    body = [g for g in glyphs if g["y2"] - g["y1"] >= 0.5 * tall]
    if tall < 6 or not body:
        return text
    baseline = float(np.median([g["y2"] for g in body]))
    out = list(text)
    for i, glyph in _pairs(text, glyphs, tall):
        if out[i] in CANDIDATES:
            out[i] = _decide(out[i], glyph, tall, baseline)
    return "".join(out)


def _pairs(text: str, glyphs: list[dict], tall: float) -> list[tuple[int, dict]]:
    """(index in text, glyph) of the characters that can be matched with their ink."""
    chars = [i for i, c in enumerate(text) if not c.isspace()]
    if not chars:
        return []
    if len(chars) == len(glyphs):
        return list(zip(chars, glyphs))
    pairs = [(chars[0], glyphs[0])]  # the list marker
    # Letters that touch make fewer glyphs than characters: match words instead (ink words are
    # split at gaps wider than 0.4 of a tall glyph), and the one-character words in them.
    words: list[list[dict]] = [[glyphs[0]]]
    for g in glyphs[1:]:
        if g["x1"] - words[-1][-1]["x2"] >= 0.4 * tall:
            words.append([g])
        else:
            words[-1].append(g)
    spans = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    if len(spans) == len(words):
        pairs += [(start, ink[0]) for (start, word), ink in zip(spans, words) if len(word) == 1 and len(ink) == 1]
    return pairs
