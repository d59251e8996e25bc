"""Pages per second: a 10-page PDF through /ocr against the same pages sent as PNG images.

Starts the real server (CPU engines only, as `make run` without weights), generates a
10-page A4 document at the server's PDF resolution, and reads it three ways with RapidOCR:
one /ocr call with the PDF, ten sequential /ocr calls with the pages as PNGs (the same
pixels the server renders), and one /batch/ocr call with the ten PNGs. Prints them side
by side with the ratio to the PDF.

    .venv/bin/python scripts/bench_pdf.py [--pages 10] [--rounds 3] [--dpi 150]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.pdf_docs import page_lines, pdf_of  # noqa: E402
from tests.server_process import RemoteServer  # noqa: E402


def a4_page(index: int, dpi: int) -> Image.Image:
    """An A4 page of printed-looking text lines at ``dpi``."""
    w, h = round(8.27 * dpi), round(11.69 * dpi)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, dpi // 6))
    step = max(20, dpi // 3)
    for row in range(int((h - dpi) / step)):
        line = " ".join(page_lines(index + row)[row % 3].split()[:4])
        draw.text((dpi // 2, dpi // 2 + row * step), line, fill="black", font=font)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dpi", type=int, default=150)
    args = ap.parse_args()

    pages = [a4_page(i, args.dpi) for i in range(args.pages)]
    pdf = pdf_of(pages, args.dpi)
    pngs = [png(p) for p in pages]
    params = {"model": "rapidocr"}
    print(f"{args.pages} pages, {pages[0].width}x{pages[0].height} px (A4 at {args.dpi} dpi); "
          f"PDF {len(pdf) / 1e6:.2f} MB, PNGs {sum(map(len, pngs)) / 1e6:.2f} MB; best of {args.rounds} rounds")

    with tempfile.TemporaryDirectory() as empty, RemoteServer(
            models_dir=Path(empty), env={"CHATVLM_LIMITS__PDF_DPI": str(args.dpi),
                                         "CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "600",
                                         "CHATVLM_LIMITS__MAX_FILE_MB": "100"}) as server:
        def pdf_once():
            r = requests.post(f"{server.url}/ocr", files={"file": ("doc.pdf", pdf)}, params=params, timeout=600)
            r.raise_for_status()
            assert r.json()["pages"] == args.pages

        def seq_once():
            for i, data in enumerate(pngs):
                requests.post(f"{server.url}/ocr", files={"file": (f"{i}.png", data)}, params=params,
                              timeout=600).raise_for_status()

        def batch_once():
            files = [("files", (f"{i}.png", d)) for i, d in enumerate(pngs)]
            r = requests.post(f"{server.url}/batch/ocr", files=files, params=params, timeout=600)
            r.raise_for_status()
            assert r.json()["successful"] == args.pages

        requests.post(f"{server.url}/ocr", files={"file": ("w.png", pngs[0])}, params=params,
                      timeout=600).raise_for_status()  # load the model outside the timings
        runs = {"PDF, one /ocr call": pdf_once, "PNG pages, sequential /ocr": seq_once,
                "PNG pages, one /batch/ocr": batch_once}
        times = {name: [] for name in runs}
        for _ in range(args.rounds):  # interleaved, so drift hits every variant alike
            for name, fn in runs.items():
                times[name].append(timed(fn))

    pdf_rate = args.pages / min(times["PDF, one /ocr call"])
    print(f"{'input':<28}{'best s':>9}{'median s':>10}{'pages/s':>9}{'vs PDF':>8}")
    for name, ts in times.items():
        rate = args.pages / min(ts)
        print(f"{name:<28}{min(ts):>9.2f}{statistics.median(ts):>10.2f}{rate:>9.2f}{rate / pdf_rate:>7.2f}x")


if __name__ == "__main__":
    main()
