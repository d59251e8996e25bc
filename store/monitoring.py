"""Repository functions for the monitoring history: samples, request records, their pruning, and the
per-bucket aggregates the metrics and performance routes answer with (computed in SQL on both backends:
a bucket is ``ts - ts % width`` over integer epoch seconds)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, case, cast, delete, func, insert, select
from sqlalchemy.orm import Session

from store import rollup
from store.tables import GpuSampleRow, ModelSampleRow, RequestRecordRow, SystemSampleRow


@dataclass(frozen=True)
class SystemRow:
    ts: int
    cpu_percent: float
    memory_percent: float
    disk_percent: float
    memory_used: int


@dataclass(frozen=True)
class GpuRow:
    ts: int
    gpu_index: int
    utilization: float
    memory_used: int
    memory_total: int
    temperature: float | None
    power: float | None


@dataclass(frozen=True)
class ModelRow:
    ts: int
    model: str
    status: str
    requests: int
    errors: int
    avg_latency: float | None
    tokens_per_second: float | None
    queue_depth: int


@dataclass(frozen=True)
class RequestRow:
    ts: float
    route: str
    method: str
    model: str | None
    status: int
    duration: float
    prompt_tokens: int | None
    completion_tokens: int | None


# ---- writing ------------------------------------------------------------------------------------------
def add_samples(s: Session, system: Sequence[SystemRow], gpus: Sequence[GpuRow], models: Sequence[ModelRow]) -> None:
    """Bulk inserts (executemany): one round trip per table, and the hourly rollups' upserts."""
    for table, rows in ((SystemSampleRow, system), (GpuSampleRow, gpus), (ModelSampleRow, models)):
        if rows:
            s.execute(insert(table), [r.__dict__ for r in rows])
    rollup.add(s, system, gpus, models)  # the same transaction: the hourly rollups never drift from the rows


def add_requests(s: Session, rows: Iterable[RequestRow]) -> int:
    rows = [r.__dict__ for r in rows]
    if rows:
        s.execute(insert(RequestRecordRow), rows)
    return len(rows)


def prune(s: Session, before: float) -> int:
    """Delete samples and request records older than ``before`` (epoch seconds); returns rows deleted."""
    gone = 0
    for table in (SystemSampleRow, GpuSampleRow, ModelSampleRow):
        gone += s.execute(delete(table).where(table.ts < int(before))).rowcount or 0
    gone += s.execute(delete(RequestRecordRow).where(RequestRecordRow.ts < before)).rowcount or 0
    return gone + rollup.prune(s, int(before))


def counts(s: Session) -> dict[str, int]:
    return {t.__tablename__: s.scalar(select(func.count()).select_from(t)) or 0
            for t in (SystemSampleRow, GpuSampleRow, ModelSampleRow, RequestRecordRow)}


# ---- per-bucket aggregates ----------------------------------------------------------------------------
def _bucket(col, width: int):
    return (col - col % width).label("bucket")


def _rows(result) -> list[dict[str, Any]]:
    keys = list(result.keys())
    return [dict(zip(keys, row)) for row in result]


def system_buckets(s: Session, start: int, end: int, width: int) -> list[dict[str, Any]]:
    t = SystemSampleRow
    b = _bucket(t.ts, width)
    q = (select(b, func.count().label("samples"), func.avg(t.cpu_percent).label("cpu_percent"),
                func.max(t.cpu_percent).label("cpu_percent_max"), func.avg(t.memory_percent).label("memory_percent"),
                func.max(t.memory_percent).label("memory_percent_max"),
                func.avg(t.memory_used).label("memory_used"), func.avg(t.disk_percent).label("disk_percent"))
         .where(t.ts >= start, t.ts < end).group_by(b).order_by(b))
    return _rows(s.execute(q))


def system_summary(s: Session, start: int, end: int) -> dict[str, Any]:
    t = SystemSampleRow
    q = select(func.count().label("samples"), func.avg(t.cpu_percent).label("avg_cpu_percent"),
               func.max(t.cpu_percent).label("max_cpu_percent"),
               func.avg(t.memory_percent).label("avg_memory_percent"),
               func.max(t.memory_percent).label("max_memory_percent"),
               func.avg(t.disk_percent).label("avg_disk_percent")).where(t.ts >= start, t.ts < end)
    return dict(s.execute(q).one()._mapping)


def gpu_buckets(s: Session, start: int, end: int, width: int, *, per_gpu: bool = True) -> list[dict[str, Any]]:
    t = GpuSampleRow
    b = _bucket(t.ts, width)
    keys = (b, t.gpu_index) if per_gpu else (b,)
    q = (select(*keys, func.count().label("samples"), func.avg(t.utilization).label("gpu_utilization"),
                func.max(t.utilization).label("gpu_utilization_max"), func.avg(t.memory_used).label("gpu_memory_used"),
                func.max(t.memory_used).label("gpu_memory_used_max"), func.max(t.memory_total).label("gpu_memory_total"),
                func.avg(t.temperature).label("gpu_temperature"), func.max(t.temperature).label("gpu_temperature_max"),
                func.avg(t.power).label("gpu_power"))
         .where(t.ts >= start, t.ts < end).group_by(*keys).order_by(*keys))
    return _rows(s.execute(q))


def gpu_summary(s: Session, start: int, end: int) -> dict[str, Any]:
    t = GpuSampleRow
    q = select(func.count().label("samples"), func.avg(t.utilization).label("avg_gpu_utilization"),
               func.max(t.utilization).label("max_gpu_utilization"),
               func.avg(t.memory_used).label("avg_gpu_memory_used"), func.max(t.memory_used).label("max_gpu_memory_used"),
               func.max(t.temperature).label("max_gpu_temperature")).where(t.ts >= start, t.ts < end)
    return dict(s.execute(q).one()._mapping)


def _latency_weighted(t):
    """Mean latency of the requests behind the samples (each sample's mean weighted by its requests)."""
    weighted = func.sum(case((t.avg_latency.is_not(None), t.avg_latency * t.requests), else_=0.0))
    timed = func.sum(case((t.avg_latency.is_not(None), t.requests), else_=0))
    return case((timed > 0, weighted / cast(timed, t.avg_latency.type)), else_=None)


def model_buckets(s: Session, start: int, end: int, width: int, model: str | None = None) -> list[dict[str, Any]]:
    t = ModelSampleRow
    b = _bucket(t.ts, width)
    q = (select(b, t.model, func.count().label("samples"), func.sum(t.requests).label("requests"),
                func.sum(t.errors).label("errors"), _latency_weighted(t).label("avg_response_time"),
                func.avg(t.tokens_per_second).label("tokens_per_second"),
                func.avg(t.queue_depth).label("queue_depth"), func.max(t.queue_depth).label("queue_depth_max"))
         .where(t.ts >= start, t.ts < end).group_by(b, t.model).order_by(b, t.model))
    if model is not None:
        q = q.where(t.model == model)
    return _rows(s.execute(q))


def model_summary(s: Session, start: int, end: int, model: str | None = None) -> dict[str, Any]:
    t = ModelSampleRow
    q = select(func.count().label("samples"), func.coalesce(func.sum(t.requests), 0).label("total_requests"),
               func.coalesce(func.sum(t.errors), 0).label("total_errors"),
               _latency_weighted(t).label("avg_response_time"),
               func.max(t.queue_depth).label("max_queue_depth")).where(t.ts >= start, t.ts < end)
    if model is not None:
        q = q.where(t.model == model)
    return dict(s.execute(q).one()._mapping)


# ---- request statistics -------------------------------------------------------------------------------
def request_stats(s: Session, since: float, model: str | None = None) -> list[dict[str, Any]]:
    """Per model (requests that named none are left out): totals, failures and response times since ``since``."""
    t = RequestRecordRow
    failed = func.sum(case((t.status >= 400, 1), else_=0))
    q = (select(t.model, func.count().label("total_requests"), cast(failed, Integer).label("failed_requests"),
                func.avg(t.duration).label("avg_response_time"), func.min(t.duration).label("min_response_time"),
                func.max(t.duration).label("max_response_time"),
                func.sum(t.completion_tokens).label("completion_tokens"))
         .where(t.ts >= since, t.model.is_not(None)).group_by(t.model).order_by(t.model))
    if model is not None:
        q = q.where(t.model == model)
    return _rows(s.execute(q))


def recent_requests(s: Session, limit: int = 100, model: str | None = None) -> list[RequestRow]:
    t = RequestRecordRow
    q = select(t.ts, t.route, t.method, t.model, t.status, t.duration, t.prompt_tokens,
               t.completion_tokens).order_by(t.id.desc()).limit(limit)
    if model is not None:
        q = q.where(t.model == model)
    return [RequestRow(*r) for r in s.execute(q)]
