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
one to one when their counts agree; otherwise only the first character of the line is checked
against the first glyph (a list marker). Anything else is left as the engine read it.
"""
from __future__ import annotations

import cv2
import numpy as np

# What engines write for a dot or a dash they cannot tell apart.
CANDIDATES = frozenset("•·・∙⋅●◦*+.-–—−‐¢°")
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
        # neighbouring lines' ascenders and descenders reach into a padded box from its edges
        if y + hh <= 0.25 * h or y >= 0.75 * h or area < 2:
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
    if 0.6 <= w / h <= 1.67 and fill >= 0.55 and 0.3 <= raised <= 0.75 and max(w, h) <= 0.8 * tall:
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
    tall = float(heights[min(len(heights) - 1, int(0.9 * len(heights)))])
    body = [g for g in glyphs if g["y2"] - g["y1"] >= 0.5 * tall]
    if tall < 6 or not body:
        return text
    baseline = float(np.median([g["y2"] for g in body]))
    chars = [i for i, c in enumerate(text) if not c.isspace()]
    out = list(text)
    if len(chars) == len(glyphs):
        pairs = list(zip(chars, glyphs))
    else:  # the counts disagree (a letter in two pieces, a missed glyph): the list marker only
        pairs = [(chars[0], glyphs[0])] if chars else []
    for i, glyph in pairs:
        if out[i] in CANDIDATES:
            out[i] = _decide(out[i], glyph, tall, baseline)
    return "".join(out)
