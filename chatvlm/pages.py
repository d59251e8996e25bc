"""``--pages``: which pages of a PDF to read, e.g. ``1-3,7`` (1-based, as people count pages).

The API reads whole documents, so the selected pages are copied into a smaller PDF (PDFium,
no re-rendering) and the answer's page numbers are mapped back to the original's.
"""
from __future__ import annotations

from typing import Any


class PageSpecError(ValueError):
    pass


def parse_pages(spec: str | None) -> list[int] | None:
    """0-based page indices in ascending order, or None for every page."""
    if spec is None or not spec.strip():
        return None
    pages: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if dash else first
        except ValueError:
            raise PageSpecError(f"--pages: {part!r} is not a page or a range like 2-5") from None
        if first < 1 or last < first:
            raise PageSpecError(f"--pages: {part!r} must count from 1 upwards")
        pages.update(range(first - 1, last))
    return sorted(pages)


def select_pdf_pages(data: bytes, pages: list[int]) -> tuple[bytes, list[int]]:
    """A PDF of only the pages that exist among ``pages``, and their original indices."""
    import io

    import pypdfium2 as pdfium

    src = pdfium.PdfDocument(data)
    try:
        kept = [p for p in pages if p < len(src)]
        if not kept:
            raise PageSpecError(f"--pages selects none of the document's {len(src)} page(s)")
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


def remap_pages(result: dict[str, Any], original: list[int]) -> dict[str, Any]:
    """Give blocks and page results the page numbers of the original document."""
    def fix(page: int) -> int:
        return original[page] if 0 <= page < len(original) else page

    for block in result.get("blocks") or ():
        block["page"] = fix(block.get("page", 0))
    for page in result.get("page_results") or ():
        page["page"] = fix(page.get("page", 0))
        for block in page.get("blocks") or ():
            block["page"] = fix(block.get("page", 0))
    return result
