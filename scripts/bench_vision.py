"""Vision-core benchmarks, each measured side by side in one run:

1. start-up: `make run` (venv present) to the first 200 from /health; torch not imported; idle RSS;
2. HTTP overhead: /ocr throughput over HTTP against the same engine called in-process;
3. batching: one /batch/ocr of 10 images against 10 sequential /ocr calls.

    .venv/bin/python scripts/bench_vision.py [--rounds 3]

Traffic goes to 127.0.0.1 only; every loop is bounded.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import requests  # noqa: E402

from tests.server_process import RemoteServer, free_port  # noqa: E402

SAMPLES = ROOT / "samples"
IMAGES = ["receipt_en.png", "doc_zh.png", "line_zh.png", "exif_rotated_en.jpg", "receipt_en.png"]


def bench_startup(rounds: int) -> dict:
    times, rss, torch_loaded = [], [], []
    empty = Path(tempfile.mkdtemp(prefix="bench-empty-"))
    for _ in range(rounds):
        port = free_port()
        proc = subprocess.Popen(["make", "--no-print-directory", "run", f"PORT={port}", f"MODELS_DIR={empty}"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        started = time.perf_counter()
        try:
            while time.perf_counter() - started < 30:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.02)
            times.append(time.perf_counter() - started)
            time.sleep(1.0)  # settle, then measure idle memory of the server process
            server = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "api.py" in " ".join(p.cmdline()))
            rss.append(server.memory_info().rss / 2**20)
            maps = Path(f"/proc/{server.pid}/maps").read_text()
            torch_loaded.append("libtorch" in maps)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
    shutil.rmtree(empty, ignore_errors=True)
    return {"startup_s": statistics.median(times), "startup_max_s": max(times),
            "idle_rss_mb": max(rss), "torch_imported": any(torch_loaded)}


def bench_http_overhead(url: str, rounds: int) -> dict:
    from ocr.rapid import RapidOcrAdapter
    from core.config import load_settings
    from core.imaging import decode_image
    from models.registry import ModelRegistry
    from models.adapter import OcrOptions
    from core.types import CancelToken

    spec = ModelRegistry(load_settings()).get("rapidocr").spec
    adapter = RapidOcrAdapter(spec)
    adapter.load()
    blobs = [(SAMPLES / n).read_bytes() for n in IMAGES]

    def in_process() -> float:
        t = time.perf_counter()
        for data in blobs:  # what a script embedding the engine does: decode, then OCR
            image = decode_image(data, target_max_pixels=spec.max_pixels)
            adapter.ocr(image.pages[0], OcrOptions(), CancelToken())
        return len(blobs) / (time.perf_counter() - t)

    session = requests.Session()

    def over_http() -> float:
        t = time.perf_counter()
        for name, data in zip(IMAGES, blobs):
            r = session.post(f"{url}/ocr", files={"file": (name, data)}, data={"model": "rapidocr"})
            r.raise_for_status()
        return len(blobs) / (time.perf_counter() - t)

    over_http(), in_process()  # warm both
    local, remote = [], []
    for _ in range(rounds):  # interleaved so that drift hits both alike
        local.append(in_process())
        remote.append(over_http())
    adapter.unload()
    return {"inproc_img_s": statistics.median(local), "http_img_s": statistics.median(remote),
            "ratio": statistics.median(remote) / statistics.median(local)}


def bench_batch(url: str, rounds: int) -> dict:
    blobs = [(SAMPLES / IMAGES[i % len(IMAGES)]).read_bytes() for i in range(10)]
    session = requests.Session()

    def sequential() -> float:
        t = time.perf_counter()
        for i, data in enumerate(blobs):
            session.post(f"{url}/ocr", files={"file": (f"{i}.png", data)}, data={"model": "rapidocr"}).raise_for_status()
        return time.perf_counter() - t

    def batched() -> float:
        t = time.perf_counter()
        r = session.post(f"{url}/batch/ocr", files=[("files", (f"{i}.png", d)) for i, d in enumerate(blobs)],
                         data={"model": "rapidocr"})
        r.raise_for_status()
        assert r.json()["successful"] == 10, r.json()
        return time.perf_counter() - t

    sequential(), batched()
    seq, bat = [], []
    for _ in range(rounds):
        seq.append(sequential())
        bat.append(batched())
    return {"sequential_s": statistics.median(seq), "batch_s": statistics.median(bat),
            "speedup": statistics.median(seq) / statistics.median(bat)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GB RAM, no GPU")
    s = bench_startup(args.rounds)
    print("\n## start-up (make run -> first 200 from /health)")
    print(f"median {s['startup_s']:.2f} s, max {s['startup_max_s']:.2f} s (target <= 3 s); "
          f"idle RSS {s['idle_rss_mb']:.0f} MB (target <= 300 MB); torch imported at start: {s['torch_imported']}")
    empty = Path(tempfile.mkdtemp(prefix="bench-empty-"))
    with RemoteServer(models_dir=empty) as server:
        h = bench_http_overhead(server.url, args.rounds)
        print("\n## HTTP overhead (rapidocr, 5 sample images, sequential)")
        print(f"in-process {h['inproc_img_s']:.2f} img/s | over HTTP {h['http_img_s']:.2f} img/s | "
              f"ratio {h['ratio']:.2f} (target >= 0.9)")
        b = bench_batch(server.url, args.rounds)
        print("\n## batching (10 images, rapidocr)")
        print(f"10 sequential /ocr {b['sequential_s']:.2f} s | one /batch/ocr {b['batch_s']:.2f} s | "
              f"speed-up {b['speedup']:.2f}x")
    shutil.rmtree(empty, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
