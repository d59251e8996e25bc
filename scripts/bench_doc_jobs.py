"""Do concurrent doc_cpu jobs use both cores? One job alone against four at once, side by side.

    python scripts/bench_doc_jobs.py [--pages 2] [--jobs 4] [--workers N]

Starts a real server (no weights: doc_cpu with RapidOCR), sends a scanned PDF of ``--pages``
English pages from scripts/make_doc_pages.py as one job, waits for it, then sends the same PDF
as ``--jobs`` jobs at once. For each phase it prints:
* pages/s;
* "cores used": the CPU time of the server process and of all its child processes (OCR worker
  processes included), over the phase's wall time (1.00 = one core busy all along);
* each core's utilisation, from psutil.cpu_percent(percpu=True) sampled during the phase (this is
  machine-wide: other processes on the machine count too);
* how many of the server's (and its children's) threads were runnable at once (state R in /proc,
  sampled every 0.1 s): the work's own parallelism, which a busy machine does not hide the way it
  hides CPU time;
* "cores wanted": the same CPU time plus the time the server's and children's threads spent
  runnable but waiting for a core (/proc/<pid>/task/<tid>/schedstat), over wall time: what the
  work would use if it had the machine to itself, which other processes' load cannot hide;
* the machine's load average, since the cores are shared.
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
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # a child that has just ended
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        n += state == "R"
    return n


def _waited_seconds(pid: int) -> dict[int, float]:
    """Per thread of the process: seconds spent runnable, waiting for a core (schedstat field 2)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()  # every thread of the process
    return t.user + t.system


class Sampler:
    """CPU of the server and its children, per-core use and runnable threads during one phase.

    Child processes (OCR workers) are found at every sample; each one counts from the first time
    it is seen (from zero when it was started during the phase) to the last, so a child that ends
    between two samples loses at most one interval of its CPU time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.runnable: list[int] = []
        self.percore: list[list[float]] = []
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._wait_first: dict[tuple[int, int], float] = {}  # (pid, tid) -> runqueue wait
        self._wait_last: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._look(initial=True)
        psutil.cpu_percent(percpu=True)  # starts the per-core interval
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _look(self, initial: bool = False) -> None:
        self._alive = [self.pid]
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                used = _cpu_seconds(p)
            except psutil.Error:
                continue
            self._first.setdefault(p.pid, used if initial or p.pid == self.pid else 0.0)
            self._last[p.pid] = used
            if p.pid != self.pid:
                self._alive.append(p.pid)
            try:
                waits = _waited_seconds(p.pid)
            except OSError:
                continue
            for tid, w in waits.items():
                self._wait_first.setdefault((p.pid, tid), w if initial else 0.0)
                self._wait_last[(p.pid, tid)] = w

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.1):
            self._look()
            self.runnable.append(sum(runnable_threads(pid) for pid in self._alive))
            n += 1
            if n % 5 == 0:  # every 0.5 s: the share of each core busy since the previous call
                self.percore.append(psutil.cpu_percent(percpu=True))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._look()
        wall = time.perf_counter() - self._t0
        server = self._last[self.pid] - self._first[self.pid]
        children = sum(self._last[p] - self._first[p] for p in self._last if p != self.pid)
        r = self.runnable or [0]
        cores = [statistics.mean(c) for c in zip(*self.percore)] if self.percore else []
        waited = sum(self._wait_last[k] - self._wait_first[k] for k in self._wait_last)
        return {"cores_used": (server + children) / wall, "cores_wanted": (server + children + waited) / wall, "children_share": children / max(1e-9, server + children),
                "n_children": len(self._last) - 1, "percore": cores,
                "runnable_mean": statistics.mean(r), "runnable_2plus": sum(x >= 2 for x in r) / len(r)}


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
    out.update({"seconds": took, "pages_per_s": jobs * pages / took, "load": os.getloadavg()})
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
    ncpu = psutil.cpu_count()
    for name, r in (("1 job", one), (f"{args.jobs} jobs", many)):
        per = " ".join(f"{c:.0f}%" for c in r["percore"])
        print(f"{name:>8}: {r['pages_per_s']:.3f} pages/s ({r['seconds']:.1f} s); cores used {r['cores_used']:.2f} "
              f"of {ncpu} (server + {r['n_children']} child processes, children {100 * r['children_share']:.0f}%), "
              f"cores wanted {r['cores_wanted']:.2f}; "
              f"per-core use (machine-wide) {per}; runnable threads mean {r['runnable_mean']:.2f}, "
              f">= 2 runnable {100 * r['runnable_2plus']:.0f}% of samples; "
              f"load average {' '.join(f'{x:.2f}' for x in r['load'])}")
    print(f"throughput ratio {args.jobs} jobs / 1 job: {many['pages_per_s'] / one['pages_per_s']:.2f}; "
          f"cores used {many['cores_used']:.2f} vs {one['cores_used']:.2f} "
          f"(ratio {many['cores_used'] / max(1e-9, one['cores_used']):.2f}), cores wanted {many['cores_wanted']:.2f} "
          f"vs {one['cores_wanted']:.2f}; target >= 1.7 of 2 with {args.jobs} jobs")


if __name__ == "__main__":
    main()
