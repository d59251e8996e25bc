"""The monitoring history's questions, answered from the database: metrics per time bucket (seed
004's GET /api/monitoring/metrics) and request statistics per model (GET /api/monitoring/performance).
Every aggregate is computed in SQL; Python only shapes the rows."""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from core.errors import BadRequest
from store import monitoring as raw
from store import rollup
from store.db import Database

INTERVALS = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
METRIC_TYPES = ("gpu", "cpu", "memory", "model")
TIME_RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
MAX_BUCKETS = 10_000
MB = 2**20


@dataclass(frozen=True)
class MetricsQuery:
    start: int           # epoch seconds, inclusive
    end: int             # epoch seconds, exclusive
    width: int           # bucket width in seconds
    metric_type: str | None

    @classmethod
    def build(cls, start: datetime | None, end: datetime | None, metric_type: str | None,
              interval: str | None) -> "MetricsQuery":
        """Check a request: 400 for end before start or too many buckets (the route's schema already
        refused unknown types, intervals and malformed times with 422). Naive times are UTC."""
        width = INTERVALS[interval or "5m"]
        end_s = _epoch(end) if end is not None else math.ceil(time.time())
        start_s = _epoch(start) if start is not None else end_s - 86400
        if end_s < start_s:
            raise BadRequest("end_time is before start_time", param="end_time", code="INVALID_TIME_RANGE")
        first = start_s - start_s % width
        buckets = math.ceil((end_s - first) / width) if end_s > first else 0
        if buckets > MAX_BUCKETS:
            raise BadRequest(f"the range holds {buckets} buckets of {interval or '5m'}; at most {MAX_BUCKETS} "
                             "may be asked for at once (widen the interval or narrow the range)",
                             param="interval", code="TOO_MANY_BUCKETS")
        return cls(start_s, end_s, width, metric_type)


def _epoch(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return math.floor(t.timestamp())


@functools.lru_cache(maxsize=8192)  # a week of hourly buckets repeats each bucket per series
def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def _r(v: Any, digits: int = 3) -> Any:
    return round(float(v), digits) if v is not None else None


def _mb(v: Any) -> Any:
    return round(float(v) / MB, 1) if v is not None else None


def metrics(db: Database, q: MetricsQuery) -> dict[str, Any]:
    """``{"metrics": [...], "summary": {...}, ...}`` over the query's buckets (only buckets that hold samples)."""
    return db.call(_metrics, q)


def _metrics(s, q: MetricsQuery) -> dict[str, Any]:
    a, b, w = q.start, q.end, q.width
    # 1 h and 1 d buckets come from the hourly rollups (the range is taken in whole hours); 1 m and 5 m
    # buckets from the raw samples.
    repo = rollup if w >= rollup.HOUR else raw
    items: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    if q.metric_type == "cpu":
        for r in repo.system_buckets(s, a, b, w):
            items.append({"timestamp": iso(r["bucket"]), "samples": r["samples"], "cpu_percent": _r(r["cpu_percent"]),
                          "cpu_percent_max": _r(r["cpu_percent_max"])})
        sm = repo.system_summary(s, a, b)
        summary = {"samples": sm["samples"], "avg_cpu_percent": _r(sm["avg_cpu_percent"]),
                   "max_cpu_percent": _r(sm["max_cpu_percent"])}
    elif q.metric_type == "memory":
        for r in repo.system_buckets(s, a, b, w):
            items.append({"timestamp": iso(r["bucket"]), "samples": r["samples"],
                          "memory_percent": _r(r["memory_percent"]), "memory_percent_max": _r(r["memory_percent_max"]),
                          "memory_used": _mb(r["memory_used"])})
        sm = repo.system_summary(s, a, b)
        summary = {"samples": sm["samples"], "avg_memory_percent": _r(sm["avg_memory_percent"]),
                   "max_memory_percent": _r(sm["max_memory_percent"])}
    elif q.metric_type == "gpu":
        for r in repo.gpu_buckets(s, a, b, w):
            items.append({"timestamp": iso(r["bucket"]), "gpu_id": r["gpu_index"], "samples": r["samples"],
                          "gpu_utilization": _r(r["gpu_utilization"]),
                          "gpu_utilization_max": _r(r["gpu_utilization_max"]),
                          "gpu_memory_used": _mb(r["gpu_memory_used"]),
                          "gpu_memory_used_max": _mb(r["gpu_memory_used_max"]),
                          "gpu_memory_total": _mb(r["gpu_memory_total"]),
                          "gpu_temperature": _r(r["gpu_temperature"]),
                          "gpu_temperature_max": _r(r["gpu_temperature_max"]), "gpu_power": _r(r["gpu_power"])})
        sm = repo.gpu_summary(s, a, b)
        summary = {"samples": sm["samples"], "avg_gpu_utilization": _r(sm["avg_gpu_utilization"]),
                   "max_gpu_utilization": _r(sm["max_gpu_utilization"]),
                   "avg_gpu_memory_used": _mb(sm["avg_gpu_memory_used"]),
                   "max_gpu_memory_used": _mb(sm["max_gpu_memory_used"]),
                   "max_gpu_temperature": _r(sm["max_gpu_temperature"])}
    elif q.metric_type == "model":
        for r in repo.model_buckets(s, a, b, w):
            requests = int(r["requests"] or 0)
            items.append({"timestamp": iso(r["bucket"]), "model_id": r["model"], "samples": r["samples"],
                          "requests": requests, "errors": int(r["errors"] or 0),
                          "error_rate": _r((r["errors"] or 0) / requests, 4) if requests else 0.0,
                          "avg_response_time": _r(r["avg_response_time"], 4),
                          "tokens_per_second": _r(r["tokens_per_second"]), "queue_depth": _r(r["queue_depth"]),
                          "queue_depth_max": r["queue_depth_max"]})
        summary = _model_summary(repo.model_summary(s, a, b))
    else:  # the seed's combined view: the machine, the GPUs' mean, and the models' response time
        gpus = {r["bucket"]: r for r in repo.gpu_buckets(s, a, b, w, per_gpu=False)}
        for r in repo.system_buckets(s, a, b, w):
            g = gpus.get(r["bucket"], {})
            items.append({"timestamp": iso(r["bucket"]), "samples": r["samples"],
                          "gpu_utilization": _r(g.get("gpu_utilization")), "gpu_memory_used": _mb(g.get("gpu_memory_used")),
                          "cpu_percent": _r(r["cpu_percent"]), "memory_percent": _r(r["memory_percent"]),
                          "disk_percent": _r(r["disk_percent"])})
        sm, gm = repo.system_summary(s, a, b), repo.gpu_summary(s, a, b)
        mm = repo.model_summary(s, a, b)
        summary = {"samples": sm["samples"], "avg_cpu_percent": _r(sm["avg_cpu_percent"]),
                   "max_cpu_percent": _r(sm["max_cpu_percent"]), "avg_memory_percent": _r(sm["avg_memory_percent"]),
                   "avg_gpu_utilization": _r(gm["avg_gpu_utilization"]),
                   "max_gpu_utilization": _r(gm["max_gpu_utilization"]),
                   "avg_response_time": _r(mm["avg_response_time"], 4)}
    return {"metric_type": q.metric_type, "interval_seconds": q.width, "start_time": iso(q.start),
            "end_time": iso(q.end), "metrics": items, "summary": summary}


def _model_summary(mm: dict[str, Any]) -> dict[str, Any]:
    total = int(mm["total_requests"] or 0)
    return {"samples": mm["samples"], "total_requests": total, "total_errors": int(mm["total_errors"] or 0),
            "error_rate": _r(int(mm["total_errors"] or 0) / total, 4) if total else 0.0,
            "avg_response_time": _r(mm["avg_response_time"], 4), "max_queue_depth": mm["max_queue_depth"]}


# ---- request statistics ----------------------------------------------------------------------------
def model_stats(row: dict[str, Any], window_s: float) -> dict[str, Any]:
    total = int(row["total_requests"])
    failed = int(row["failed_requests"] or 0)
    return {"total_requests": total, "successful_requests": total - failed, "failed_requests": failed,
            "avg_response_time": _r(row["avg_response_time"], 4), "max_response_time": _r(row["max_response_time"], 4),
            "min_response_time": _r(row["min_response_time"], 4),
            "requests_per_second": _r(total / window_s, 6), "error_rate": _r(failed / total, 4) if total else 0.0,
            "completion_tokens": int(row["completion_tokens"] or 0)}


def performance(db: Database, time_range: str, model: str | None = None) -> dict[str, Any]:
    """Per model (or one model) over the range: totals, response times, requests per second (over the
    whole range) and error rate, from the request records; and the machine's averages from the samples."""
    window = TIME_RANGES[time_range]
    now = time.time()
    return db.call(_performance, now - window, now, window, model)


def _performance(s, since: float, now: float, window: int, model: str | None) -> dict[str, Any]:
    rows = raw.request_stats(s, since, model)
    # the machine's averages from the hourly rollups (whole hours: cheap over 30 days of 1 s samples)
    sm, gm = rollup.system_summary(s, int(since), math.ceil(now) + 1), rollup.gpu_summary(s, int(since), math.ceil(now) + 1)
    return {"models": [{"model_id": r["model"], **model_stats(r, window)} for r in rows],
            "system": {"avg_cpu_percent": _r(sm["avg_cpu_percent"]), "avg_memory_percent": _r(sm["avg_memory_percent"]),
                       "avg_gpu_utilization": _r(gm["avg_gpu_utilization"])}}


def model_performance(db: Database, model: str, window_s: float = 86400) -> dict[str, Any]:
    """Seed 004's ``performance_stats`` of one model over the last day."""
    rows = db.call(raw.request_stats, time.time() - window_s, model)
    if not rows:
        return {"total_requests": 0, "avg_response_time": None, "max_response_time": None,
                "requests_per_second": 0.0, "error_rate": 0.0}
    st = model_stats(rows[0], window_s)
    return {k: st[k] for k in ("total_requests", "avg_response_time", "max_response_time", "requests_per_second",
                               "error_rate")}
