"""Benchmark upload pre-processing: core.imaging's JPEG draft path vs a plain full decode.

Generates a 12-megapixel document-like JPEG in memory (text lines, boxes, photo-ish noise,
quality 90), then decodes it to a ~1280 px long side N times each way, in the same run:

  (a) decode_image(data, target_max_pixels=...)           libjpeg DCT-scaled decode + LANCZOS
  (b) Image.open(...).convert("RGB").resize(..., LANCZOS)  full-size decode, then resize

and prints ms per image, the speed-up, and peak memory (Python-heap peak via tracemalloc
plus the growth of peak RSS, measured in a fresh child per method).

    python scripts/bench_preprocess.py [-n 10] [--size 4000x3000] [--long-side 1280]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from core.imaging import decode_image  # noqa: E402


def make_jpeg(width: int, height: int, quality: int = 90, seed: int = 0) -> bytes:
    """A scanned-page lookalike: paper texture, lines of 'words', a table, a photo block."""
    rng = random.Random(seed)
    paper = Image.effect_noise((width // 4, height // 4), 12).resize((width, height)).convert("RGB")
    page = Image.blend(Image.new("RGB", (width, height), (246, 244, 238)), paper, 0.15)
    draw = ImageDraw.Draw(page)
    margin, line_h = width // 12, max(12, height // 90)
    y = margin
    while y < height * 0.62:
        x = margin
        while x < width - margin:
            word = rng.randint(line_h, line_h * 5)
            draw.rectangle((x, y, min(x + word, width - margin), y + line_h * 0.7), fill=(20, 20, 28))
            x += word + line_h // 2
        y += int(line_h * 1.6)
    top = int(height * 0.66)
    for r in range(6):  # table grid
        draw.line((margin, top + r * line_h * 2, width // 2, top + r * line_h * 2), fill=(0, 0, 0), width=3)
    for c in range(5):
        x = margin + c * (width // 2 - margin) // 4
        draw.line((x, top, x, top + 10 * line_h), fill=(0, 0, 0), width=3)
    photo = Image.effect_noise((width // 3, height // 4), 60).convert("RGB").filter(ImageFilter.GaussianBlur(2))
    page.paste(photo, (width // 2 + margin // 2, top))
    for _ in range(40):  # stamps / shapes
        cx, cy, rad = rng.randrange(width), rng.randrange(height), rng.randint(10, 60)
        draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), outline=(rng.randrange(256), 40, 160), width=4)
    buf = io.BytesIO()
    page.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def via_imaging(data: bytes, target: int) -> Image.Image:
    return decode_image(data, target_max_pixels=target).pages[0]


def via_plain(data: bytes, size: tuple[int, int]) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def time_it(fn, n: int) -> list[float]:
    fn()  # warm-up (plugin import, caches)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def child_memory(method: str, data: bytes, target: int, size: tuple[int, int]) -> dict:
    """Decode once in a fresh interpreter fed the JPEG on stdin; report peak-RSS growth and tracemalloc peak.

    Pillow's pixel buffers are malloc'd outside Python's allocator, so tracemalloc misses them;
    the peak RSS (VmHWM, Linux) sees them. ru_maxrss would not do: a child inherits its
    parent's. Returns {} where /proc is missing.
    """
    if not Path("/proc/self/status").exists():
        return {}
    call = f"via_imaging(data, {target})" if method == "imaging" else f"via_plain(data, {size!r})"
    code = "\n".join([
        "import json, sys, tracemalloc",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "from scripts.bench_preprocess import make_jpeg, via_imaging, via_plain",
        "def hwm(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))",
        "data = sys.stdin.buffer.read()",
        "via_imaging(make_jpeg(64, 48), 100); via_plain(make_jpeg(64, 48), (32, 24))  # imports, small",
        "before = hwm()",
        "tracemalloc.start()",
        call,
        "peak = tracemalloc.get_traced_memory()[1]",
        "print(json.dumps({'rss_mb': (hwm() - before) / 1024, 'py_peak_mb': peak / 2**20}))",
    ])
    run = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120)
    if run.returncode:
        return {}
    return json.loads(run.stdout.decode().strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10, help="timed iterations per method (default 10)")
    ap.add_argument("--size", default="4000x3000", help="generated image size, WxH")
    ap.add_argument("--long-side", type=int, default=1280, help="long side of the output (default 1280)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory runs")
    args = ap.parse_args(argv)

    width, height = map(int, args.size.lower().split("x"))
    t = time.perf_counter()
    data = make_jpeg(width, height)
    made_ms = (time.perf_counter() - t) * 1000
    short = round(args.long_side * min(width, height) / max(width, height))
    size = (args.long_side, short) if width >= height else (short, args.long_side)
    target = size[0] * size[1]

    a, b = via_imaging(data, target), via_plain(data, size)
    assert a.size == b.size == size, (a.size, b.size, size)

    ta = time_it(lambda: via_imaging(data, target), args.n)
    tb = time_it(lambda: via_plain(data, size), args.n)
    mem = {} if args.no_memory else {m: child_memory(m, data, target, size) for m in ("imaging", "plain")}

    print(f"input : {width}x{height} JPEG q90, {len(data) / 2**20:.2f} MiB ({made_ms:.0f} ms to generate)")
    print(f"output: {size[0]}x{size[1]} RGB ({target:,} px), {args.n} iterations each, Pillow {Image.__version__}")
    print()
    header = f"{'method':44} {'median ms':>10} {'min ms':>8} {'peak RSS +MB':>13} {'py peak MB':>11}"
    print(header)
    print("-" * len(header))
    rows = (("(a) decode_image (draft + LANCZOS)", ta, mem.get("imaging", {})),
            ("(b) open + convert('RGB') + resize LANCZOS", tb, mem.get("plain", {})))
    for name, times, m in rows:
        rss = f"{m['rss_mb']:.1f}" if m else "-"
        py = f"{m['py_peak_mb']:.2f}" if m else "-"
        print(f"{name:44} {statistics.median(times):10.1f} {min(times):8.1f} {rss:>13} {py:>11}")
    print()
    print(f"speed-up (b)/(a), medians: {statistics.median(tb) / statistics.median(ta):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
