"""Do concurrent doc_cpu jobs use both cores? One job alone against four at once, side by side.

    python scripts/bench_doc_jobs.py [--pages 2] [--jobs 4] [--workers N]

Starts a real server (no weights: doc_cpu with RapidOCR), sends a scanned PDF of ``--pages``
English pages from scripts/make_doc_pages.py as one job, waits for it, then sends the same PDF
as ``--jobs`` jobs at once. For each phase it prints pages/s, the server's CPU (100% = one core)
and how many of its threads were runnable at once (state R in /proc, sampled every 0.1 s): the
work's own parallelism, which a busy machine does not hide the way it hides CPU time. It also
prints the machine's load average, since the cores are shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.make_doc_pages import draw_png, make_page, scanned_pdf  # noqa: E402
from tests.server_process import RemoteServer  # noqa: E402


def runnable_threads(pid: int) -> int:
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        n += state == "R"
    return n


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.runnable: list[int] = []
        self._stop = threading.Event()
        self._cpu0 = self.proc.cpu_times()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.runnable.append(runnable_threads(self.pid))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        cpu1, wall = self.proc.cpu_times(), time.perf_counter() - self._t0
        used = (cpu1.user - self._cpu0.user) + (cpu1.system - self._cpu0.system)
        r = self.runnable or [0]
        return {"cpu_pct": 100 * used / wall, "runnable_mean": statistics.mean(r),
                "runnable_2plus": sum(x >= 2 for x in r) / len(r)}


def wait(server, job_ids: list[str]) -> None:
    pending = set(job_ids)
    while pending:
        for j in list(pending):
            body = requests.get(f"{server.url}/jobs/{j}", timeout=30).json()
            if body["status"] in ("succeeded", "failed", "cancelled"):
                if body["status"] != "succeeded":
                    raise SystemExit(f"job {j} ended {body['status']}: {body.get('error')}")
                pending.discard(j)
        time.sleep(0.3)


def phase(server, pdf: bytes, jobs: int, pages: int) -> dict:
    sampler = Sampler(server.proc.pid)
    t = time.perf_counter()
    ids = [requests.post(f"{server.url}/jobs/ocr", files={"file": ("s.pdf", pdf)},
                         data={"format": "markdown", "model": "doc_cpu", "language": "English"},
                         timeout=60).json()["job_id"] for _ in range(jobs)]
    wait(server, ids)
    took = time.perf_counter() - t
    out = sampler.stop()
    out.update({"seconds": took, "pages_per_s": jobs * pages / took, "load": os.getloadavg()[0]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--workers", type=int, help="jobs.workers for the server (default: config.yaml's)")
    args = ap.parse_args()
    pdf = scanned_pdf([draw_png(make_page(i * 3, "en", two_column=False, seed=55)) for i in range(args.pages)])
    env = {"CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "600", "CHATVLM_JOBS__MAX_PER_CLIENT": str(args.jobs + 1)}
    if args.workers:
        env["CHATVLM_JOBS__WORKERS"] = str(args.workers)
    with tempfile.TemporaryDirectory() as nw, RemoteServer(models_dir=Path(nw), env=env, startup_timeout=180) as server:
        phase(server, pdf, 1, args.pages)  # loads the layout model and RapidOCR
        one = phase(server, pdf, 1, args.pages)
        many = phase(server, pdf, args.jobs, args.pages)
    for name, r in (("1 job", one), (f"{args.jobs} jobs", many)):
        print(f"{name:>8}: {r['pages_per_s']:.3f} pages/s ({r['seconds']:.1f} s), server CPU {r['cpu_pct']:.0f}% "
              f"(200% = both cores), runnable threads mean {r['runnable_mean']:.2f}, "
              f">= 2 runnable {100 * r['runnable_2plus']:.0f}% of samples, load average {r['load']:.1f}")
    print(f"throughput ratio {args.jobs} jobs / 1 job: {many['pages_per_s'] / one['pages_per_s']:.2f}; "
          f"CPU ratio {many['cpu_pct'] / max(1e-9, one['cpu_pct']):.2f}")


if __name__ == "__main__":
    main()
