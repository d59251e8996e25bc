"""Generated PDF documents for tests and benchmarks: text pages drawn with Pillow and saved with
Pillow's PDF writer, plus an encrypted one and a truncated one made by hand."""
from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

WORDS = ["INVOICE", "Harbour", "Street", "Total", "Market", "Leeds", "Coffee", "Bread", "Apples", "Receipt",
         "Orange", "Butter", "Cheese", "Station", "Garden", "Window"]


def page_lines(index: int) -> list[str]:
    """Distinct, readable lines for page ``index``."""
    w = lambda k: WORDS[(index * 3 + k) % len(WORDS)]  # noqa: E731
    return [f"PAGE {index + 1} {w(0)}", f"{w(1)} {w(2)} {10 + index}.50", f"{w(3)} number {4200 + index}"]


def text_page(lines: list[str], size: tuple[int, int] = (900, 420)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=40)
    for i, line in enumerate(lines):
        draw.text((40, 40 + i * 110), line, fill="black", font=font)
    return img


def pdf_of(pages: list[Image.Image], dpi: int = 150) -> bytes:
    """A PDF whose pages are these images, laid out so that rendering at ``dpi`` gives them back."""
    out = io.BytesIO()
    pages[0].save(out, "PDF", save_all=True, append_images=pages[1:], resolution=dpi)
    return out.getvalue()


def text_pdf(n_pages: int, dpi: int = 150) -> tuple[bytes, list[str]]:
    """A PDF of ``n_pages`` text pages and each page's expected text."""
    texts = [page_lines(i) for i in range(n_pages)]
    return pdf_of([text_page(t) for t in texts], dpi), ["\n".join(t) for t in texts]


def blank_pdf(n_pages: int, size_pt: tuple[float, float] = (200, 200)) -> bytes:
    """A hand-written PDF of empty pages of any MediaBox (Pillow cannot write huge pages cheaply)."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(n_pages))
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode()]
    objs += [f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {size_pt[0]:g} {size_pt[1]:g}] >>".encode()] * n_pages
    return _assemble(objs, b"")


def encrypted_pdf() -> bytes:
    """A PDF whose standard security handler wants a user password (random /O and /U: none opens it).

    No library installed here writes encrypted PDFs, so the /Encrypt dictionary is written by hand."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
            b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>"]
    return _assemble(objs, b" /Encrypt 4 0 R /ID [<" + b"ab" * 16 + b"> <" + b"ab" * 16 + b">]")


def _assemble(objs: list[bytes], trailer_extra: bytes) -> bytes:
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, trailer_extra, xref)
    return bytes(out)


def truncated(pdf: bytes) -> bytes:
    return pdf[: len(pdf) // 2]
