"""Reading dots.ocr's answers: the layout JSON (a list of {bbox, category, text} in reading order,
boxes in the resized image's pixels) and plain text, both guarded against the model's known
failure modes: JSON cut off by the token limit, and endless runs of dots or underscores.

Nothing here raises on model output: whatever cannot be read is dropped and reported in
``LayoutParse.problems``, and the raw text is kept as the fallback answer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

CATEGORIES = ("Caption", "Footnote", "Formula", "List-item", "Page-footer", "Page-header", "Picture",
              "Section-header", "Table", "Text", "Title")
_CANONICAL = {c.lower(): c for c in CATEGORIES}

# A leader row of dots is normal in a table of contents; thousands of them are the model looping.
MAX_RUN = 48
_FILLER_RUN = re.compile(r"(?:(\.|_|-|=|·|…|\*)\s?){%d,}" % (MAX_RUN + 1))
# Any short unit repeated this many times at the very end: generation stopped inside a loop.
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_TAIL_LOOP = re.compile(r"(.{1,24}?)\1{15,}$", re.DOTALL)


@dataclass
class LayoutCell:
    bbox: tuple[int, int, int, int]  # original page pixels
    category: str
    text: str = ""


@dataclass
class LayoutParse:
    cells: list[LayoutCell] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what was repaired or dropped, for logs
    parsed: bool = False  # False: no JSON list could be read at all

    @property
    def text(self) -> str:
        """Cell texts in reading order (pictures have none), separated by blank lines."""
        return "\n\n".join(c.text for c in self.cells if c.text)


def clean_repetition(text: str) -> tuple[str, bool]:
    """Cap runs of filler characters at MAX_RUN and cut a looping tail; (text, changed)."""
    out = _FILLER_RUN.sub(lambda m: m.group(0)[:MAX_RUN], text)
    tail = out[-4000:]
    loop = _TAIL_LOOP.search(tail)
    if loop:
        unit = loop.group(1)
        out = out[:len(out) - len(tail) + loop.start()] + unit * 3
    return out, out != text


def _fix_escapes(text: str) -> str:
    """Double every backslash that does not start a valid JSON escape (pairs are read left to right)."""
    return _ESCAPE.sub(lambda m: m.group(0) if m.group(1) in '"\\/bfnrtu' else "\\\\" + m.group(1), text)


def _strip_fences(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        if text.rstrip().endswith("```"):
            text = text.rstrip()[:-3]
    return text.strip()


def _scan(text: str) -> tuple[list[str], bool, int]:
    """Walk JSON text: (open brackets left, inside a string at the end, end of the last complete
    top-level array element)."""
    stack: list[str] = []
    in_string = escape = False
    last_complete = -1
    for i, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append(ch)
        elif ch in "]}":
            if stack:
                stack.pop()
            if len(stack) == 1 and stack[0] == "[":
                last_complete = i + 1
    return stack, in_string, last_complete


def _close(text: str) -> str | None:
    """Complete truncated JSON: close an open string, drop a dangling key/comma, close brackets."""
    stack, in_string, _ = _scan(text)
    if in_string:
        text = text[:-1] if text.endswith("\\") else text
        text += '"'
    text = re.sub(r'(,\s*"[^"]*"\s*:?\s*|,\s*|:\s*)$', "", text.rstrip())
    closers = "".join("]" if b == "[" else "}" for b in reversed(stack))
    try:
        json.loads(text + closers)
    except json.JSONDecodeError:
        return None
    return text + closers


def _load_list(text: str, problems: list[str]) -> tuple[list | None, bool]:
    """The JSON list in ``text`` and whether it had to be repaired."""
    start = text.find("[")
    if start < 0:
        problems.append("no JSON list in the output")
        return None, False
    body = text[start:]
    # LaTeX in formulas sometimes comes with single backslashes, which JSON rejects.
    for candidate in dict.fromkeys((body, _fix_escapes(body))):
        try:
            data = json.loads(candidate)
            return (data, candidate is not body) if isinstance(data, list) else (None, False)
        except json.JSONDecodeError:
            pass
        closed = _close(candidate)
        if closed is not None:
            problems.append("truncated JSON closed")
            return json.loads(closed), True
        _, _, last = _scan(candidate)
        if last > 0:
            try:
                data = json.loads(candidate[:last] + "]")
            except json.JSONDecodeError:
                continue
            dropped = candidate[last:].lstrip(", \n")
            problems.append(f"invalid JSON after the last complete element; dropped {len(dropped)} characters")
            return data, True
    problems.append("invalid JSON")
    return None, False


def _box(raw, scale: tuple[float, float], limit: tuple[int, int]) -> tuple[int, int, int, int] | None:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in raw)
    except (TypeError, ValueError):
        return None
    sx, sy = scale
    w, h = limit
    x1, x2 = sorted((min(max(round(x1 * sx), 0), w), min(max(round(x2 * sx), 0), w)))
    y1, y2 = sorted((min(max(round(y1 * sy), 0), h), min(max(round(y2 * sy), 0), h)))
    return x1, y1, x2, y2


def parse_layout(output: str, resized: tuple[int, int], original: tuple[int, int]) -> LayoutParse:
    """Cells with boxes moved from the resized image (``resized`` w, h) to ``original`` (w, h) pixels."""
    result = LayoutParse()
    items, repaired = _load_list(_strip_fences(output), result.problems)
    if items is None:
        return result
    result.parsed = True
    scale = (original[0] / resized[0], original[1] / resized[1])
    last = len(items) - 1
    for i, item in enumerate(items):
        box = _box(item.get("bbox"), scale, original) if isinstance(item, dict) else None
        category = item.get("category") if isinstance(item, dict) else None
        if box is None or not isinstance(category, str):
            what = "trailing partial element" if i == last else f"element {i}"
            result.problems.append(f"dropped {what} without a valid bbox and category")
            continue
        known = _CANONICAL.get(category.strip().lower())
        if known is None and repaired and i == last:  # a category cut short by the token limit
            result.problems.append("dropped trailing partial element with an incomplete category")
            continue
        category = known or category.strip()
        text = item.get("text", "")
        text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        # A single-backslash \frac or \beta decodes as a control character: give LaTeX its backslash back.
        text = text.replace("\x0c", "\\f").replace("\x08", "\\b")
        text, looped = clean_repetition(text)
        if looped:
            result.problems.append(f"cut repetition in element {i}")
        result.cells.append(LayoutCell(box, category, "" if category == "Picture" else text.strip()))
    return result


def to_markdown(cells: list[LayoutCell]) -> str:
    """A Markdown page: cells in reading order; formulas as display math, tables as their HTML,
    pictures left out."""
    parts = []
    for c in cells:
        if not c.text:
            continue
        if c.category == "Formula" and not c.text.startswith("$"):
            parts.append(f"$$\n{c.text}\n$$")
        else:
            parts.append(c.text)
    return "\n\n".join(parts)
