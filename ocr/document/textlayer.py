"""The embedded text of a born-digital PDF page (PDFium's text page), as lines with boxes.

Used instead of OCR for a page that has one (unless the client sends ``force_ocr=true``): it
is exact and far faster. A page whose text layer holds fewer than ``MIN_CHARS`` visible
characters (a scan, or a scan with a stray page number) is read by OCR.

Callers hold ocr/pdf.py's PDFium lock: PDFium is not thread-safe.
"""
from __future__ import annotations

import pypdfium2 as pdfium

MIN_CHARS = 16
Box = tuple[int, int, int, int]


def page_lines(page: "pdfium.PdfPage", scale: float) -> list[tuple[str, Box]] | None:
    """(text, box in pixels at ``scale`` pixels per point) per text run, or None without a text layer."""
    textpage = page.get_textpage()
    try:
        if textpage.count_chars() < MIN_CHARS:
            return None
        _, height = page.get_size()
        left, bottom = page.get_cropbox()[:2]
        lines = []
        for i in range(textpage.count_rects()):
            l, b, r, t = textpage.get_rect(i)
            text = textpage.get_text_bounded(l, b, r, t).replace("\r", " ").replace("\n", " ").strip()
            if not text:
                continue
            box = (round((l - left) * scale), round((height - (t - bottom)) * scale),
                   round((r - left) * scale), round((height - (b - bottom)) * scale))
            lines.append((text, box))
        if sum(len(t.replace(" ", "")) for t, _ in lines) < MIN_CHARS:
            return None
        return lines
    finally:
        textpage.close()
