"""RapidOCR's adapter with ``workers: thread`` against ``workers: process``, 1 caller against 2,
measured side by side in one run (rounds interleaved, so a busy moment hits every configuration).

Both adapters are loaded at once (concurrency 2, 1 onnxruntime thread per call, as config.yaml)
and read the same images (samples/, cycled). Prints the images per second of each configuration,
the ratios that matter (2 callers against 1 in each mode; process against thread at 2 callers),
the resident memory of each worker process, and how one call's CPU time splits between
onnxruntime's ``run`` (which releases the GIL) and the rest (Python, numpy, OpenCV), measured
in thread CPU time so that other processes on the machine do not change it.

    .venv/bin/python scripts/bench_rapid_workers.py [--images 28] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.types import CancelToken  # noqa: E402
from models.adapter import ModelSpec, OcrOptions  # noqa: E402
from ocr.rapid import RapidOcrAdapter  # noqa: E402


def load_images() -> list[Image.Image]:
    images = []
    for p in sorted((ROOT / "samples").iterdir()):
        if p.suffix in (".png", ".jpg"):
            with Image.open(p) as im:
                images.append(ImageOps.exif_transpose(im).convert("RGB"))
    return images


def read_all(adapter: RapidOcrAdapter, images: list[Image.Image], n: int, callers: int) -> float:
    """Seconds to read ``n`` images with ``callers`` threads calling the adapter at once."""
    def one(i: int) -> int:
        return len(adapter.ocr(images[i % len(images)], OcrOptions(), CancelToken()).blocks)

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - started


class _OrtClock:
    """Thread CPU time spent inside ``onnxruntime.InferenceSession.run`` (patched while it counts)."""

    def __init__(self) -> None:
        import onnxruntime

        self.seconds = 0.0
        self._cls = onnxruntime.InferenceSession
        self._orig = self._cls.run

    def __enter__(self) -> "_OrtClock":
        orig, clock = self._orig, self

        def run(session, *a, **k):
            t = time.thread_time()
            try:
                return orig(session, *a, **k)
            finally:
                clock.seconds += time.thread_time() - t

        self._cls.run = run
        return self

    def __exit__(self, *exc) -> None:
        self._cls.run = self._orig


def onnx_share(adapter: RapidOcrAdapter, images: list[Image.Image]) -> tuple[float, float]:
    """(CPU s in onnxruntime, CPU s in all) over one pass of the images, in this thread."""
    with _OrtClock() as clock:
        started = time.thread_time()
        for image in images:
            adapter.ocr(image, OcrOptions(), CancelToken())
        return clock.seconds, time.thread_time() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=28)
    p.add_argument("--rounds", type=int, default=3, help="repeat every configuration, keep the median")
    args = p.parse_args(argv)
    images = load_images()
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench-rapid-") as tmp:
        adapters = {}
        for mode in ("thread", "process"):
            spec = ModelSpec(id=f"rapidocr-{mode}", name="RapidOCR", kind="rapidocr", data_dir=Path(tmp),
                             concurrency=2, options={"workers": mode, "intra_op_threads": 1})
            adapters[mode] = RapidOcrAdapter(spec)
            adapters[mode].load()
        try:
            for a in adapters.values():  # warm: every worker and both threads have read a page
                read_all(a, images, 4, 2)
            configs = [(mode, callers) for mode in ("thread", "process") for callers in (1, 2)]
            times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
            for _ in range(args.rounds):
                for mode, callers in configs:
                    times[(mode, callers)].append(read_all(adapters[mode], images, args.images, callers))
            rate = {c: args.images / statistics.median(t) for c, t in times.items()}
            print(f"{args.images} images x {args.rounds} rounds (median), load average at end: {os.getloadavg()}")
            for (mode, callers), r in rate.items():
                print(f"  workers={mode:7s} callers={callers}: {r:.2f} images/s   "
                      f"(runs: {', '.join(f'{t:.1f}' for t in times[(mode, callers)])} s)")
            print(f"2 callers against 1: thread {rate[('thread', 2)] / rate[('thread', 1)]:.2f}x, "
                  f"process {rate[('process', 2)] / rate[('process', 1)]:.2f}x")
            print(f"process against thread, 2 callers: {rate[('process', 2)] / rate[('thread', 2)]:.2f}x; "
                  f"1 caller: {rate[('process', 1)] / rate[('thread', 1)]:.2f}x")
            in_ort, total = onnx_share(adapters["thread"], images * 2)
            print(f"one call's CPU time (thread mode, {2 * len(images)} calls): {total:.2f} s, of which "
                  f"onnxruntime run {in_ort / total:.0%}, the rest (Python, numpy, OpenCV) {1 - in_ort / total:.0%}")
            pool = adapters["process"].worker_pool
            assert pool is not None
            print("worker RSS: " + ", ".join(f"pid {pid} {rss / 2**20:.0f} MB" for pid, rss in pool.rss_bytes().items()))
        finally:
            for a in adapters.values():
                a.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
