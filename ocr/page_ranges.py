"""Reading only some pages of a PDF: ``pages=1-3,7`` (1-based, as people count pages).

The selected pages are copied into a smaller PDF (PDFium copies the page objects, nothing is
rendered), which is then read like any upload; the outcome's page numbers are mapped back to
the original document's. The page cap (``limits.max_pdf_pages``) applies to the selection, so
a client can read a long document in parts.
"""
from __future__ import annotations

import io
from dataclasses import replace
from typing import TYPE_CHECKING

from core.errors import InvalidParameter

if TYPE_CHECKING:
    from ocr.service import OcrOutcome

MAX_PAGE = 99_999


def parse_pages(spec: str | None) -> tuple[int, ...] | None:
    """0-based page indices, ascending, or None for every page (an empty value means every page)."""
    if spec is None or not spec.strip():
        return None
    pages: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise InvalidParameter(f"pages: {part.strip()!r} is not a page number or a range like 2-5",
                                   param="pages", code="INVALID_PAGES") from None
        first, last = min(first, last), max(first, last)  # "3-1" is pages 1 to 3
        if not 1 <= first <= last <= MAX_PAGE:
            raise InvalidParameter(f"pages: {part.strip()!r} must count from 1 upwards (at most {MAX_PAGE})",
                                   param="pages", code="INVALID_PAGES")
        pages.update(range(first - 1, last))
    return tuple(sorted(pages))


def select_pdf_pages(data: bytes, pages: tuple[int, ...]) -> tuple[bytes, list[int]]:
    """A PDF of the selected pages that exist, and their 0-based indices in the original.
    None of them existing is 422 PAGE_OUT_OF_RANGE; an unreadable PDF raises as rendering does."""
    import pypdfium2 as pdfium

    from ocr.pdf import _LOCK, _open

    with _LOCK:  # PDFium is not thread-safe
        src = _open(data)
        try:
            kept = [p for p in pages if p < len(src)]
            if not kept:
                raise InvalidParameter(f"pages selects none of the document's {len(src)} page(s)",
                                       param="pages", code="PAGE_OUT_OF_RANGE")
            out = pdfium.PdfDocument.new()
            try:
                out.import_pages(src, kept)
                buf = io.BytesIO()
                out.save(buf)
                return buf.getvalue(), kept
            finally:
                out.close()
        finally:
            src.close()


def renumber(outcome: "OcrOutcome", original: list[int]) -> "OcrOutcome":
    """The outcome with the original document's page numbers on its pages and blocks."""
    def fix(i: int) -> int:
        return original[i] if 0 <= i < len(original) else i

    for page in outcome.page_results:
        page.index = fix(page.index)
        page.blocks = [replace(b, page=fix(b.page)) for b in page.blocks]
    outcome.blocks = [replace(b, page=fix(b.page)) for b in outcome.blocks]
    return outcome
