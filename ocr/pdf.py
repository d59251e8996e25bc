"""PDF documents as page images, rendered in memory with PDFium (pypdfium2).

Each page is rendered at the configured DPI; that rendering is the page's "original"
size (what boxes, regions and ``image_size`` refer to). When the model reads smaller
images, the page is rendered straight at the smaller scale rather than resampled.

Refusals, all before any pixel is rendered:
* a password-protected document: 400 ``PDF_ENCRYPTED`` (no password support);
* a document PDFium cannot open (truncated, corrupt): 400 ``INVALID_PDF``;
* more pages than the limit: 413 ``TOO_MANY_PAGES``;
* a page whose rendering at the DPI would pass the pixel cap (a huge MediaBox, the PDF
  form of a decompression bomb): 413 ``PAGE_TOO_LARGE``.

PDFium is not thread-safe, even across documents: every call goes through one lock.
Rendering is CPU work; callers run these functions on a worker thread.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from core.errors import BadRequest, InvalidParameter, PayloadTooLarge
from ocr.document.textlayer import page_lines
from ocr.document.vector import VectorLayout, page_structure

POINTS_PER_INCH = 72.0
MAX_SIDE = 65_535
_LOCK = threading.Lock()


@dataclass
class RenderedPage:
    image: Image.Image              # RGB, at the model's scale
    original_size: tuple[int, int]  # the page at the configured DPI
    index: int = 0                  # 0-based page of the document
    # The page's embedded text, as (text, box in original pixels), when asked for and present.
    text_lines: list[tuple[str, tuple[int, int, int, int]]] | None = None
    # With ``structure``: the page's structure from its own objects (ocr/document/vector.py), for a
    # page with a usable text layer; such a page is not rendered (its image is a 1 x 1 placeholder).
    structure: VectorLayout | None = None


def page_count(data: bytes) -> int:
    """Number of pages (opens the document; raises the client errors above)."""
    with _LOCK:
        doc = _open(data)
        try:
            return len(doc)
        finally:
            doc.close()


def render_pdf(data: bytes, *, dpi: float, max_pages: int, max_pixels: int,
               target_max_pixels: int | None = None, only_page: int | None = None,
               pages: list[int] | None = None, text_layer: bool = False,
               render_text_pages: bool = True, structure: bool = False) -> list[RenderedPage]:
    """Render every page (or only ``only_page``, or the 0-based ``pages``), each scaled to fit
    ``target_max_pixels``; with ``text_layer``, each page also carries its embedded text, and
    without ``render_text_pages`` a page that has one is not rendered (its image is a 1 x 1
    placeholder: a caller that reads only the text layer needs no pixels)."""
    with _LOCK:
        doc = _open(data)
        try:
            n = len(doc)
            if n == 0:
                raise BadRequest("the PDF has no pages", code="INVALID_PDF")
            if only_page is not None:
                indices = [_check_page(only_page, n)]
            elif pages is not None:
                indices = check_pages(pages, n, "PDF")
            else:
                indices = list(range(n))
            if len(indices) > max_pages:
                raise PayloadTooLarge(f"{len(indices)} pages of the PDF were asked for; at most {max_pages} are "
                                      "accepted (send a page range with pages=)", param="file", code="TOO_MANY_PAGES")
            sizes = {i: _original_size(doc, i, dpi, max_pixels) for i in indices}  # refuse before rendering
            return [_render(doc, i, sizes[i], dpi, target_max_pixels, text_layer, render_text_pages, structure)
                    for i in indices]
        finally:
            doc.close()


def check_pages(pages: list[int], n: int, kind: str) -> list[int]:
    """The 0-based pages, checked against the document's ``n`` pages (400 naming the count)."""
    bad = [p for p in pages if not 0 <= p < n]
    if bad:
        raise BadRequest(f"page {bad[0] + 1} is outside the {kind}, which has {n} page(s) (pages are numbered from 1)",
                         param="pages", code="PAGE_OUT_OF_RANGE", details={"page_count": n})
    return pages


def _open(data: bytes) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise BadRequest("the PDF is password-protected; send an unencrypted document",
                             param="file", code="PDF_ENCRYPTED") from None
        raise BadRequest("the file could not be read as a PDF; it may be truncated or corrupt",
                         param="file", code="INVALID_PDF") from None


def _check_page(page: int, n: int) -> int:
    if not 0 <= page < n:
        raise InvalidParameter(f"page {page} does not exist; the document has {n} page(s), numbered from 0",
                               param="page", code="PAGE_OUT_OF_RANGE")
    return page


def _original_size(doc: pdfium.PdfDocument, index: int, dpi: float, max_pixels: int) -> tuple[int, int]:
    try:
        page = doc[index]
        try:
            w_pt, h_pt = page.get_size()  # rotation applied
        finally:
            page.close()
    except pdfium.PdfiumError:
        raise BadRequest(f"page {index} of the PDF could not be read", param="file", code="INVALID_PDF") from None
    w, h = _px(w_pt, dpi), _px(h_pt, dpi)
    if w <= 0 or h <= 0 or not math.isfinite(w_pt * h_pt):
        raise BadRequest(f"page {index} of the PDF has no area", param="file", code="INVALID_PDF")
    if w * h > max_pixels or max(w, h) > MAX_SIDE:
        raise PayloadTooLarge(f"page {index} is {w} x {h} pixels at {dpi:g} dpi; the limit is {max_pixels:,} pixels",
                              param="file", code="PAGE_TOO_LARGE")
    return w, h


def _render(doc: pdfium.PdfDocument, index: int, size: tuple[int, int], dpi: float,
            target: int | None, text_layer: bool = False, render_text_pages: bool = True,
            structure: bool = False) -> RenderedPage:
    w, h = size
    scale = dpi / POINTS_PER_INCH
    reduced = target is not None and w * h > target
    if reduced:
        scale *= math.sqrt(target / (w * h))
    page = doc[index]
    lines = None
    try:
        if text_layer:
            lines = page_lines(page, dpi / POINTS_PER_INCH)
            layout = page_structure(page, dpi / POINTS_PER_INCH) if lines is not None and structure else None
            if layout is not None:
                return RenderedPage(image=Image.new("RGB", (1, 1), "white"), original_size=(w, h), index=index,
                                    text_lines=lines, structure=layout)
            if lines is not None and not render_text_pages:
                return RenderedPage(image=Image.new("RGB", (1, 1), "white"), original_size=(w, h), index=index,
                                    text_lines=lines)
        bitmap = page.render(scale=scale, draw_annots=True, may_draw_forms=True)
        try:
            image = bitmap.to_pil().convert("RGB")  # a copy: the bitmap's buffer is freed below
        finally:
            bitmap.close()
    except pdfium.PdfiumError:
        raise BadRequest(f"page {index} of the PDF could not be rendered", param="file", code="INVALID_PDF") from None
    finally:
        page.close()
    if not reduced and image.size != (w, h):  # PDFium rounds the bitmap up by a pixel at times
        fits = image.width >= w and image.height >= h
        image = image.crop((0, 0, w, h)) if fits else image.resize((w, h), Image.Resampling.LANCZOS)
    return RenderedPage(image=image, original_size=(w, h), index=index, text_lines=lines)


def _px(points: float, dpi: float) -> int:
    return max(0, int(round(points * dpi / POINTS_PER_INCH))) if math.isfinite(points) else 0
