"""``chatvlm ocr`` over N sample images with RapidOCR: in-process against --server (HTTP), and
--concurrency 2 against 1, measured side by side in one run.

Builds N distinct images from samples/ (each sample cycled, with a border whose shade differs per
copy, so every file has its own content hash and nothing is skipped as done), starts the real
server once (CPU engines only, warmed up, as a running server is), then times each command as a
user runs it. For every configuration it reports the whole command (process start, in-process
model load) and the run itself (the CLI's own "in X s", from the first file to the last).

    .venv/bin/python scripts/bench_cli.py [--images 50] [--rounds 1] [--workers process|thread]

``--workers`` sets RapidOCR's ``options.workers`` (config.yaml's value when omitted) for the
server and the in-process CLI alike, through a copy of config.yaml.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.server_process import RemoteServer  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    samples = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".png", ".jpg"))
    for i in range(n):
        src = samples[i % len(samples)]
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            shade = 255 - (i // len(samples)) % 40  # a near-white border: new bytes, same text
            ImageOps.expand(im, border=4, fill=(shade, shade, shade)).save(folder / f"{i:03d}_{src.stem}.png")


def write_config(path: Path, workers: str) -> None:
    """config.yaml with RapidOCR's ``options.workers`` set."""
    import yaml

    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    data["models"]["rapidocr"].setdefault("options", {})["workers"] = workers
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_cli(folder: Path, out: Path, extra: list[str], env: dict) -> tuple[float, float]:
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "chatvlm", "ocr", str(folder), "--out", str(out),
                           "--model", "rapidocr", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"chatvlm failed ({proc.returncode}):\n{proc.stderr}")
    m = re.search(r"in ([0-9.]+) s", proc.stderr)
    return wall, float(m.group(1)) if m else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--rounds", type=int, default=1, help="repeat every configuration, keep the median")
    p.add_argument("--workers", choices=("process", "thread"), help="RapidOCR's options.workers")
    args = p.parse_args(argv)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        folder.mkdir()
        make_images(folder, args.images)
        weights = tmp / "weights"  # none: RapidOCR and Tesseract only, as `make run` on a fresh machine
        env = {**os.environ, "CHATVLM_DATA_DIR": str(tmp / "data"), "CHATVLM_SERVER__LOG_LEVEL": "warning"}
        config = ROOT / "config.yaml"
        if args.workers:
            config = tmp / "config.yaml"
            write_config(config, args.workers)
        with RemoteServer(models_dir=weights, config=config, env={"CHATVLM_DATA_DIR": str(tmp / "data")}) as server:
            import requests

            with open(folder / os.listdir(folder)[0], "rb") as f:  # warm: the server is already running
                requests.post(server.url + "/ocr", files={"file": f}, params={"model": "rapidocr"}, timeout=120)
            configs = {
                "in-process, concurrency 1": ["--config", str(config), "--models-dir", str(weights), "--concurrency", "1"],
                "in-process, concurrency 2": ["--config", str(config), "--models-dir", str(weights), "--concurrency", "2"],
                "--server,   concurrency 1": ["--server", server.url, "--concurrency", "1"],
                "--server,   concurrency 2": ["--server", server.url, "--concurrency", "2"],
            }
            results: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
            for _ in range(args.rounds):  # interleaved, so a busy moment hits every configuration
                for name, extra in configs.items():
                    results[name].append(run_cli(folder, tmp / "out.jsonl", extra, env))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    n = args.images
    print(f"chatvlm ocr over {n} images, RapidOCR (workers: {args.workers or 'as config.yaml'}), "
          f"{os.cpu_count()} cores, {args.rounds} round(s), median")
    print(f"{'configuration':28} {'command s':>10} {'run s':>8} {'images/s (run)':>15}")
    for name, (wall, run) in med.items():
        print(f"{name:28} {wall:10.2f} {run:8.2f} {n / run:15.2f}")
    ip1, ip2 = med["in-process, concurrency 1"], med["in-process, concurrency 2"]
    sv1, sv2 = med["--server,   concurrency 1"], med["--server,   concurrency 2"]
    print(f"in-process vs --server (concurrency 1): run {sv1[1] / ip1[1]:.2f}x, command {sv1[0] / ip1[0]:.2f}x "
          "(>1: in-process faster)")
    print(f"in-process vs --server (concurrency 2): run {sv2[1] / ip2[1]:.2f}x, command {sv2[0] / ip2[0]:.2f}x")
    print(f"concurrency 2 vs 1, in-process: run {ip1[1] / ip2[1]:.2f}x   --server: run {sv1[1] / sv2[1]:.2f}x "
          "(target >= 1.6x)")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
