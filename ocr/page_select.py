"""Reading only some pages of a PDF (``pages`` on /ocr, parsed by ocr/page_ranges.py): the
selected pages are copied into a smaller PDF (PDFium copies the page objects, nothing is
rendered), which is then read like any upload, and the outcome's page numbers are mapped back
to the original document's. ``limits.max_pdf_pages`` applies to the selection, so a long
document can be read in parts."""
from __future__ import annotations

import io
from dataclasses import replace
from typing import TYPE_CHECKING

from core.errors import BadRequest

if TYPE_CHECKING:
    from ocr.service import OcrOutcome


def select_pdf_pages(data: bytes, pages: list[int]) -> bytes:
    """A PDF of the 0-based ``pages``; a page outside the document is 400 PAGE_OUT_OF_RANGE.
    An unreadable PDF raises as rendering does (INVALID_PDF, PDF_ENCRYPTED)."""
    import pypdfium2 as pdfium

    from ocr.pdf import _LOCK, _open

    with _LOCK:  # PDFium is not thread-safe
        src = _open(data)
        try:
            n = len(src)
            bad = [p for p in pages if not 0 <= p < n]
            if bad:
                raise BadRequest(f"page {bad[0] + 1} is outside the PDF, which has {n} page(s) (pages are "
                                 "numbered from 1)", param="pages", code="PAGE_OUT_OF_RANGE", details={"page_count": n})
            out = pdfium.PdfDocument.new()
            try:
                out.import_pages(src, list(pages))
                buf = io.BytesIO()
                out.save(buf)
                return buf.getvalue()
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
