"""The history (seed 004): metrics per time bucket, and request statistics per model."""
from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from core.errors import ModelNotFound
from management.monitor import history
from server.routers.management.common import CurrentUser, ManagementDep, error_responses
from server.routers.management.monitoring_schemas import (MetricsResponse, PerformanceResponse, RequestRecordList,
                                                          RequestRecordOut)
from store import monitoring as store_monitoring

router = APIRouter(tags=["management: monitoring"])


@router.get("/monitoring/metrics", response_model=MetricsResponse, responses=error_responses(400, 422))
async def metrics(_: CurrentUser, mgmt: ManagementDep,
                  start_time: Annotated[datetime | None, Query(description="ISO 8601 (no zone: UTC); "
                                                                            "default end_time - 24 h")] = None,
                  end_time: Annotated[datetime | None, Query(description="ISO 8601 (no zone: UTC); default now")] = None,
                  metric_type: Annotated[Literal["gpu", "cpu", "memory", "model"] | None,
                                         Query(description="default: the combined view")] = None,
                  interval: Annotated[Literal["1m", "5m", "1h", "1d"], Query()] = "5m") -> MetricsResponse:
    """Samples aggregated per time bucket (in the database) with a summary of the range; at most 10,000 buckets."""
    query = history.MetricsQuery.build(start_time, end_time, metric_type, interval)
    return MetricsResponse(**await asyncio.to_thread(history.metrics, mgmt.db, query))


@router.get("/monitoring/performance", response_model=PerformanceResponse, responses=error_responses(404, 422))
async def performance(_: CurrentUser, mgmt: ManagementDep,
                      model_id: Annotated[str | None, Query(max_length=64, description="id or name")] = None,
                      time_range: Annotated[Literal["1h", "24h", "7d", "30d"], Query()] = "24h") -> PerformanceResponse:
    """Per model: requests, successes, failures, response times, requests per second and error rate, from
    every surface's request records; and the machine's averages over the range."""
    name = mgmt.catalog.get(model_id).id if model_id is not None else None
    await mgmt.recorder.flush()  # what is still buffered counts too
    found = await asyncio.to_thread(history.performance, mgmt.db, time_range, name)
    models = []
    for row in found["models"]:
        try:
            entry = mgmt.catalog.get(row["model_id"])
            ident = entry.meta.id if entry.meta is not None else entry.id
        except ModelNotFound:  # deleted since: its records remain
            ident = row["model_id"]
        models.append({**row, "model_id": ident, "model_name": row["model_id"]})
    return PerformanceResponse(time_range=time_range, models=models, system=found["system"])


@router.get("/monitoring/requests", response_model=RequestRecordList, responses=error_responses(404, 422))
async def requests(_: CurrentUser, mgmt: ManagementDep,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                   model_id: Annotated[str | None, Query(max_length=64, description="id or name")] = None
                   ) -> RequestRecordList:
    """The newest request records of every surface (route template, model, status, duration, tokens)."""
    name = mgmt.catalog.get(model_id).id if model_id is not None else None
    await mgmt.recorder.flush()
    rows = await mgmt.db.run(store_monitoring.recent_requests, limit, name)
    return RequestRecordList(items=[RequestRecordOut(timestamp=history.iso(r.ts), **{
        k: getattr(r, k) for k in ("route", "method", "model", "status", "duration", "prompt_tokens",
                                   "completion_tokens")}) for r in rows])
