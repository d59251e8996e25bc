"""Monitoring (issue 11, data half): the sampler's cost and the history's size and speed.

1. CPU time per sample (the whole process: psutil, the GPU reader, 10 models' figures, the
   database write on its worker thread), with 10 models registered, each with requests in every
   interval (the worst case: all 10 write a row each sample), beside a sample of an idle server.
2. The database size after 24 simulated hours at a 1 s interval (the samples written directly,
   as the sampler writes them): no GPU and one GPU, 10 models with rows every second; and the bytes
   per request record.
3. A 7-day metrics query at 1 h buckets (the route's own work, on the hourly rollups): p50/p95 per
   metric type, beside the same buckets grouped from every raw sample.

SQLite always; PostgreSQL too when it is installed (a throw-away cluster, like the tests').

    python scripts/bench_monitoring.py [--samples 200] [--queries 30] [--no-postgres] [--queries-only]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.request_context import RequestContext  # noqa: E402
from management.events import EventHub  # noqa: E402
from management.monitor import history  # noqa: E402
from management.monitor.gpu import NvmlReader  # noqa: E402
from management.monitor.host import HostReader  # noqa: E402
from management.monitor.recorder import RequestRecorder  # noqa: E402
from management.monitor.sampler import Sampler  # noqa: E402
from store import monitoring as repo  # noqa: E402
from store.db import Database  # noqa: E402

MODELS = [f"model_{i}" for i in range(10)]
DAY = 86400


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def sampler_cost(db: Database, n: int, busy: bool) -> float:
    """CPU seconds (all threads) per sample."""
    async def main() -> float:
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        rec = RequestRecorder()
        models = {m: ("running" if busy else "stopped", 0) for m in MODELS}
        sampler = Sampler(host=HostReader(Path(tempfile.gettempdir())), gpus=NvmlReader(), recorder=rec, hub=hub,
                          models=lambda: models, interval_s=1, retention_days=7)
        sampler.db = db
        await sampler.sample_once()  # warm: imports, the first statements
        started = time.process_time()
        for _ in range(n):
            if busy:
                for m in MODELS:
                    ctx = RequestContext(route="/v1/chat/completions", method="POST", started=time.monotonic() - 0.2)
                    ctx.model, ctx.completion_tokens = m, 20
                    rec.record(ctx, 200)
            await sampler.sample_once()
        return (time.process_time() - started) / n

    return asyncio.run(main())


def fill(db: Database, start: int, seconds: int, step: int, gpus: int, models: int) -> None:
    """Samples every ``step`` seconds from ``start``, written an hour per transaction."""
    for hour in range(start, start + seconds, 3600):
        ts_range = range(hour, min(hour + 3600, start + seconds), step)
        system = [repo.SystemRow(t, 20 + t % 50, 40 + t % 7, 35.0, 8 * 2**30) for t in ts_range]
        gpu_rows = [repo.GpuRow(t, g, float(t % 100), 4 * 2**30, 24 * 2**30, 60.0, 200.0)
                    for t in ts_range for g in range(gpus)]
        model_rows = [repo.ModelRow(t, MODELS[m], "running", 3, 0, 0.25, 40.0, 1) for t in ts_range
                      for m in range(models)]
        db.call(repo.add_samples, system, gpu_rows, model_rows)


def size_of(db: Database, path: Path | None) -> int:
    if db.backend == "sqlite":
        with db.engine.connect() as c:
            c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return path.stat().st_size
    from sqlalchemy import text
    with db.engine.connect() as c:
        return sum(c.execute(text("SELECT pg_total_relation_size(:t)"), {"t": t}).scalar() for t in
                   ("monitor_system", "monitor_gpu", "monitor_model", "request_records"))


def fresh(kind: str, tmp: Path, pg) -> tuple[Database, Path | None]:
    if kind == "sqlite":
        path = tmp / f"{time.monotonic_ns()}.db"
        db = Database(f"sqlite:///{path}")
    else:
        db, path = Database(pg.new_database()), None
    db.migrate()
    return db, path


def records_size(kind: str, tmp: Path, pg, n: int = 100_000) -> float:
    db, path = fresh(kind, tmp, pg)
    empty = size_of(db, path)
    now = time.time()
    rows = [repo.RequestRow(now + i * 0.01, "/v1/chat/completions", "POST", MODELS[i % 10], 200, 0.25, 12, 40)
            for i in range(n)]
    for i in range(0, n, 10_000):
        db.call(repo.add_requests, rows[i:i + 10_000])
    size = size_of(db, path)
    db.dispose()
    return (size - empty) / n


def query_times(db: Database, end: int, runs: int, kind: str | None) -> list[float]:
    """The route's own work for a 7-day query at 1 h buckets (SQL on the hourly rollups, and shaping)."""
    q = history.MetricsQuery(end - 7 * DAY, end, 3600, kind)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        body = history.metrics(db, q)
        times.append(time.perf_counter() - started)
        assert len(body["metrics"]) >= 7 * 24, len(body["metrics"])
    return times


def raw_times(db: Database, end: int, runs: int, kind: str) -> list[float]:
    """The same buckets grouped from every raw sample (what the rollups avoid), for the ratio."""
    fn = {"cpu": repo.system_buckets, "gpu": repo.gpu_buckets, "model": repo.model_buckets}[kind]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        db.call(fn, end - 7 * DAY, end, 3600)
        times.append(time.perf_counter() - started)
    return times


def run_backend(kind: str, args, tmp: Path, pg) -> None:
    print(f"\n=== {kind} ===")
    if args.queries_only:
        return queries(kind, args, tmp, pg)
    db, _ = fresh(kind, tmp, pg)
    idle = sampler_cost(db, args.samples, busy=False)
    busy = sampler_cost(db, args.samples, busy=True)
    db.dispose()
    print(f"sampler CPU per sample: idle models {idle * 1000:.2f} ms; 10 busy models {busy * 1000:.2f} ms "
          f"({busy / idle:.2f}x idle); at the default 60 s interval that is {busy / 60 * 100:.4f}% of one core")

    for gpus in (0, 1):
        db, path = fresh(kind, tmp, pg)
        empty = size_of(db, path)
        started = time.perf_counter()
        fill(db, 1_700_000_000, DAY, 1, gpus, 10)
        took = time.perf_counter() - started
        size = size_of(db, path) - empty
        db.dispose()
        print(f"24 h at 1 s, {gpus} GPU, 10 models: {size / 2**20:.1f} MB/day "
              f"({size / DAY:.0f} bytes per sample; written in {took:.1f} s); at 60 s: {size / 60 / 2**20:.2f} MB/day")
    print(f"request records: {records_size(kind, tmp, pg):.0f} bytes each")
    queries(kind, args, tmp, pg)


def queries(kind: str, args, tmp: Path, pg) -> None:
    end = 1_700_000_000 + 7 * DAY
    db, path = fresh(kind, tmp, pg)
    fill(db, 1_700_000_000, 7 * DAY, 60, 1, 10)
    if db.backend == "postgresql":
        with db.engine.begin() as c:
            c.exec_driver_sql("ANALYZE")
    print(f"7-day query at 1 h buckets, samples every 60 s (1 GPU, 10 models; {size_of(db, path) / 2**20:.1f} MB):")
    for metric in ("cpu", "memory", "gpu", "model", None):
        times = query_times(db, end, args.queries, metric)
        line = (f"  {metric or 'combined':>8}: p50 {statistics.median(times) * 1000:6.1f} ms, "
                f"p95 {pct(times, 95) * 1000:6.1f} ms")
        if metric in ("cpu", "gpu", "model"):
            raw = raw_times(db, end, max(3, args.queries // 5), metric)
            line += (f"   (grouped from the raw samples instead: p50 {statistics.median(raw) * 1000:6.1f} ms, "
                     f"{statistics.median(raw) / statistics.median(times):.1f}x)")
        print(line)
    db.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--queries-only", action="store_true", help="only part 3")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores (shared: figures are noisy)")
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as tmp:
        run_backend("sqlite", args, Path(tmp), None)
        if not args.no_postgres:
            from tests.postgres import PostgresCluster, pg_bin

            if pg_bin() is None:
                print("PostgreSQL is not installed: skipped")
                return 0
            pg = PostgresCluster(pg_bin())
            try:
                run_backend("postgresql", args, Path(tmp), pg)
            finally:
                pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
