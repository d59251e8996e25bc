"""OCR outcomes as text, markdown or JSON-ready structures.

Reading order is the order the model gave the blocks of a page in (the CPU engines
sort them into lines, top to bottom, left to right; layout models answer in reading
order). Markdown comes from block categories when the model gives them (dots.ocr's
layout categories), otherwise from the page text, which a generative model asked for
markdown already wrote as markdown.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from core.types import OcrBlock

if TYPE_CHECKING:
    from ocr.service import OcrOutcome, PageOutcome

FORMATS = ("text", "markdown", "json")
PAGE_SEPARATOR = "\n\n"

# Category (as layout models name them) -> markdown prefix for the block's text.
_PREFIX = {"title": "# ", "section-header": "## ", "list-item": "- ", "caption": "*", "footnote": "> "}
_SUFFIX = {"caption": "*"}
_SKIP = {"picture", "page-header", "page-footer"}
_BULLETS = "•·▪●◦■□➢►–"  # no reading text, or repeated furniture


def block_markdown(block: OcrBlock) -> str:
    """One block as markdown, by its category."""
    text = block.text.strip()
    cat = (block.category or "").strip().lower()
    if not text or cat in _SKIP:
        return ""
    if cat == "formula":
        body = text.strip("$").strip()
        return f"$$\n{body}\n$$"
    if cat == "table":
        return text  # layout models give tables as HTML, which markdown carries as it is
    if cat == "list-item" and text[:2] in ("- ", "* "):
        return text
    if cat == "list-item" and (text[:1] in _BULLETS or text[:2] in ("+ ", ". ")):  # a drawn bullet: markdown's own
        return "- " + text[1:].lstrip()
    return _PREFIX.get(cat, "") + text + _SUFFIX.get(cat, "")


def page_markdown(page: "PageOutcome") -> str:
    """A page as markdown: from the categories when the model gave any, else the page text."""
    if any(b.category for b in page.blocks):
        return PAGE_SEPARATOR.join(md for md in (block_markdown(b) for b in page.blocks) if md)
    return page.text


def document_markdown(outcome: "OcrOutcome") -> str:
    return PAGE_SEPARATOR.join(md for md in (page_markdown(p) for p in outcome.page_results) if md)


def block_dict(block: OcrBlock, reading_order: int) -> dict[str, Any]:
    out = {"text": block.text, "box": list(block.box) if block.box else None, "confidence": block.confidence,
           "category": block.category, "page": block.page, "reading_order": reading_order}
    if block.cells is not None:
        out["cells"] = [dict(c) for c in block.cells]
    return out


def blocks_json(blocks: list[OcrBlock]) -> list[dict[str, Any]]:
    """Blocks with their reading order within their page."""
    seen: dict[int, int] = {}
    out = []
    for b in blocks:
        order = seen.get(b.page, 0)
        seen[b.page] = order + 1
        out.append(block_dict(b, order))
    return out


def page_dict(page: "PageOutcome") -> dict[str, Any]:
    return {"page": page.index, "text": page.text, "blocks": blocks_json(page.blocks),
            "image_size": list(page.image_size)}


def render(outcome: "OcrOutcome", fmt: str) -> str:
    """The outcome as one string in the format (json: the pages with their blocks)."""
    if fmt == "text":
        return outcome.text
    if fmt == "markdown":
        return document_markdown(outcome)
    if fmt == "json":
        return json.dumps({"pages": [page_dict(p) for p in outcome.page_results]}, ensure_ascii=False)
    raise ValueError(f"unknown format {fmt!r}")
