"""Hourly rollups of the monitoring samples: kept up to date as samples are written (one upsert per
series and hour of a batch), read by the metrics queries at 1 h and 1 d buckets. A bucket's mean is
its sums over its counts, its maximum the maximum of maxima, so a 1 d bucket built from 24 hourly
rows equals one built from the raw samples. Same SQL on SQLite and PostgreSQL (ON CONFLICT upsert)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from store.tables import GpuHourRow, ModelHourRow, SystemHourRow

HOUR = 3600

# column -> how two partial rollups of one hour combine
_SYSTEM = {"samples": "sum", "cpu_sum": "sum", "cpu_max": "max", "mem_sum": "sum", "mem_max": "max",
           "mem_used_sum": "sum", "disk_sum": "sum"}
_GPU = {"samples": "sum", "util_sum": "sum", "util_max": "max", "mem_used_sum": "sum", "mem_used_max": "max",
        "mem_total_max": "max", "temp_sum": "sum", "temp_n": "sum", "temp_max": "max", "power_sum": "sum",
        "power_n": "sum"}
_MODEL = {"samples": "sum", "requests": "sum", "errors": "sum", "lat_sum": "sum", "lat_n": "sum", "tps_sum": "sum",
          "tps_n": "sum", "queue_sum": "sum", "queue_max": "max"}


def _max(a, b):
    if a is None:
        return b
    return a if b is None or a >= b else b


def _fold(acc: dict, key: tuple, values: dict, how: dict) -> None:
    cur = acc.get(key)
    if cur is None:
        acc[key] = dict(values)
        return
    for col, kind in how.items():
        cur[col] = cur[col] + values[col] if kind == "sum" else _max(cur[col], values[col])


def add(s: Session, system: Sequence, gpus: Sequence, models: Sequence) -> None:
    """Fold raw samples (store.monitoring's SystemRow, GpuRow, ModelRow) into their hours."""
    sys_acc: dict = {}
    for r in system:
        _fold(sys_acc, (r.ts - r.ts % HOUR,), {"samples": 1, "cpu_sum": r.cpu_percent, "cpu_max": r.cpu_percent,
                                               "mem_sum": r.memory_percent, "mem_max": r.memory_percent,
                                               "mem_used_sum": float(r.memory_used), "disk_sum": r.disk_percent}, _SYSTEM)
    gpu_acc: dict = {}
    for r in gpus:
        _fold(gpu_acc, (r.ts - r.ts % HOUR, r.gpu_index), {
            "samples": 1, "util_sum": r.utilization, "util_max": r.utilization, "mem_used_sum": float(r.memory_used),
            "mem_used_max": float(r.memory_used), "mem_total_max": float(r.memory_total),
            "temp_sum": r.temperature or 0.0, "temp_n": int(r.temperature is not None), "temp_max": r.temperature,
            "power_sum": r.power or 0.0, "power_n": int(r.power is not None)}, _GPU)
    model_acc: dict = {}
    for r in models:
        timed = r.requests if r.avg_latency is not None else 0
        _fold(model_acc, (r.ts - r.ts % HOUR, r.model), {
            "samples": 1, "requests": r.requests, "errors": r.errors, "lat_sum": (r.avg_latency or 0.0) * timed,
            "lat_n": timed, "tps_sum": r.tokens_per_second or 0.0, "tps_n": int(r.tokens_per_second is not None),
            "queue_sum": float(r.queue_depth), "queue_max": r.queue_depth}, _MODEL)
    for table, keys, acc, how in ((SystemHourRow, ("bucket",), sys_acc, _SYSTEM),
                                  (GpuHourRow, ("bucket", "gpu_index"), gpu_acc, _GPU),
                                  (ModelHourRow, ("bucket", "model"), model_acc, _MODEL)):
        if acc:
            _upsert(s, table, keys, [{**dict(zip(keys, k)), **v} for k, v in acc.items()], how)


def _upsert(s: Session, table, keys: tuple[str, ...], rows: list[dict], how: dict) -> None:
    dialect = s.get_bind().dialect.name
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    greatest = func.greatest if dialect == "postgresql" else func.max  # SQLite's two-argument max()
    cols = table.__table__.c
    sets = {}
    for col, kind in how.items():
        old, new = cols[col], ins.excluded[col]
        sets[col] = old + new if kind == "sum" else greatest(func.coalesce(old, new), func.coalesce(new, old))
    s.execute(ins.on_conflict_do_update(index_elements=list(keys), set_=sets), rows)


def prune(s: Session, before: int) -> int:
    """Drop hours that ended before ``before``."""
    gone = 0
    for table in (SystemHourRow, GpuHourRow, ModelHourRow):
        gone += s.execute(delete(table).where(table.bucket < before - HOUR)).rowcount or 0
    return gone


# ---- queries (the same keys as store.monitoring's raw-sample queries) ---------------------------------
def _rows(result) -> list[dict[str, Any]]:
    keys = list(result.keys())
    return [dict(zip(keys, row)) for row in result]


def _same(x):
    return x


def _aggs(agg: bool):
    """(sum, max, ratio) over the rows of a bucket, or over one hourly row as it is."""
    total, top = (func.sum, func.max) if agg else (_same, _same)
    return total, top, lambda num, den: total(num) / func.nullif(total(den), 0)


def _range(t, start: int, end: int):
    return (t.bucket >= start - start % HOUR, t.bucket < end)


def _system_cols(t, agg: bool = True):
    total, top, _ratio = _aggs(agg)
    return (total(t.samples).label("samples"), _ratio(t.cpu_sum, t.samples).label("cpu_percent"),
            top(t.cpu_max).label("cpu_percent_max"), _ratio(t.mem_sum, t.samples).label("memory_percent"),
            top(t.mem_max).label("memory_percent_max"), _ratio(t.mem_used_sum, t.samples).label("memory_used"),
            _ratio(t.disk_sum, t.samples).label("disk_percent"))


def system_buckets(s: Session, start: int, end: int, width: int) -> list[dict[str, Any]]:
    t = SystemHourRow
    if width == HOUR:
        return _rows(s.execute(select(t.bucket, *_system_cols(t, False)).where(*_range(t, start, end))
                               .order_by(t.bucket)))
    b = (t.bucket - t.bucket % width).label("bucket")
    return _rows(s.execute(select(b, *_system_cols(t)).where(*_range(t, start, end)).group_by(b).order_by(b)))


def system_summary(s: Session, start: int, end: int) -> dict[str, Any]:
    r = dict(s.execute(select(*_system_cols(SystemHourRow)).where(*_range(SystemHourRow, start, end))).one()._mapping)
    return {"samples": r["samples"] or 0, "avg_cpu_percent": r["cpu_percent"], "max_cpu_percent": r["cpu_percent_max"],
            "avg_memory_percent": r["memory_percent"], "max_memory_percent": r["memory_percent_max"],
            "avg_disk_percent": r["disk_percent"]}


def _gpu_cols(t, agg: bool = True):
    total, top, _ratio = _aggs(agg)
    return (total(t.samples).label("samples"), _ratio(t.util_sum, t.samples).label("gpu_utilization"),
            top(t.util_max).label("gpu_utilization_max"), _ratio(t.mem_used_sum, t.samples).label("gpu_memory_used"),
            top(t.mem_used_max).label("gpu_memory_used_max"), top(t.mem_total_max).label("gpu_memory_total"),
            _ratio(t.temp_sum, t.temp_n).label("gpu_temperature"), top(t.temp_max).label("gpu_temperature_max"),
            _ratio(t.power_sum, t.power_n).label("gpu_power"))


def gpu_buckets(s: Session, start: int, end: int, width: int, *, per_gpu: bool = True) -> list[dict[str, Any]]:
    t = GpuHourRow
    if width == HOUR and per_gpu:
        return _rows(s.execute(select(t.bucket, t.gpu_index, *_gpu_cols(t, False)).where(*_range(t, start, end))
                               .order_by(t.bucket, t.gpu_index)))
    b = (t.bucket - t.bucket % width).label("bucket")
    keys = (b, t.gpu_index) if per_gpu else (b,)
    return _rows(s.execute(select(*keys, *_gpu_cols(t)).where(*_range(t, start, end)).group_by(*keys).order_by(*keys)))


def gpu_summary(s: Session, start: int, end: int) -> dict[str, Any]:
    r = dict(s.execute(select(*_gpu_cols(GpuHourRow)).where(*_range(GpuHourRow, start, end))).one()._mapping)
    return {"samples": r["samples"] or 0, "avg_gpu_utilization": r["gpu_utilization"],
            "max_gpu_utilization": r["gpu_utilization_max"], "avg_gpu_memory_used": r["gpu_memory_used"],
            "max_gpu_memory_used": r["gpu_memory_used_max"], "max_gpu_temperature": r["gpu_temperature_max"]}


def _model_cols(t, agg: bool = True):
    total, top, _ratio = _aggs(agg)
    return (total(t.samples).label("samples"), total(t.requests).label("requests"),
            total(t.errors).label("errors"), _ratio(t.lat_sum, t.lat_n).label("avg_response_time"),
            _ratio(t.tps_sum, t.tps_n).label("tokens_per_second"), _ratio(t.queue_sum, t.samples).label("queue_depth"),
            top(t.queue_max).label("queue_depth_max"))


def model_buckets(s: Session, start: int, end: int, width: int, model: str | None = None) -> list[dict[str, Any]]:
    t = ModelHourRow
    if width == HOUR:
        q = select(t.bucket, t.model, *_model_cols(t, False)).where(*_range(t, start, end)).order_by(t.bucket, t.model)
        return _rows(s.execute(q if model is None else q.where(t.model == model)))
    b = (t.bucket - t.bucket % width).label("bucket")
    q = select(b, t.model, *_model_cols(t)).where(*_range(t, start, end)).group_by(b, t.model).order_by(b, t.model)
    if model is not None:
        q = q.where(t.model == model)
    return _rows(s.execute(q))


def model_summary(s: Session, start: int, end: int, model: str | None = None) -> dict[str, Any]:
    t = ModelHourRow
    q = select(*_model_cols(t)).where(*_range(t, start, end))
    if model is not None:
        q = q.where(t.model == model)
    r = dict(s.execute(q).one()._mapping)
    return {"samples": r["samples"] or 0, "total_requests": r["requests"] or 0, "total_errors": r["errors"] or 0,
            "avg_response_time": r["avg_response_time"], "max_queue_depth": r["queue_depth_max"]}
