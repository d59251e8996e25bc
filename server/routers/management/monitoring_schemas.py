"""Schemas of GET /api/monitoring/metrics and GET /api/monitoring/performance (seed 004)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class MetricsResponse(BaseModel):
    metric_type: str | None = Field(description="gpu, cpu, memory, model, or null for the combined view")
    interval_seconds: int
    start_time: str
    end_time: str
    metrics: list[dict[str, Any]] = Field(
        description="One item per bucket that holds samples, oldest first (per GPU for gpu, per model for model): "
                    "cpu: cpu_percent, cpu_percent_max; memory: memory_percent, memory_percent_max, memory_used (MB); "
                    "gpu: gpu_id, gpu_utilization(_max), gpu_memory_used(_max) (MB), gpu_memory_total, "
                    "gpu_temperature(_max), gpu_power; model: model_id, requests, errors, error_rate, "
                    "avg_response_time, tokens_per_second, queue_depth(_max); combined: cpu_percent, "
                    "memory_percent, disk_percent, gpu_utilization, gpu_memory_used. Each has timestamp and samples.")
    summary: dict[str, Any] = Field(description="Averages and maxima over the whole range (e.g. avg_gpu_utilization, "
                                                "max_gpu_utilization, avg_response_time)")


class ModelPerformance(BaseModel):
    model_id: str
    model_name: str
    total_requests: int
    successful_requests: int
    failed_requests: int
    avg_response_time: float | None = Field(description="seconds")
    max_response_time: float | None
    min_response_time: float | None
    requests_per_second: float = Field(description="requests over the whole time range")
    error_rate: float
    completion_tokens: int


class SystemAverages(BaseModel):
    avg_cpu_percent: float | None
    avg_memory_percent: float | None
    avg_gpu_utilization: float | None


class PerformanceResponse(BaseModel):
    time_range: str
    models: list[ModelPerformance]
    system: SystemAverages


class RequestRecordOut(BaseModel):
    timestamp: str = Field(description="When the request ended (ISO 8601, UTC)")
    route: str = Field(description="The route template, e.g. /api/models/{model_id}/generate; jobs: /jobs/ocr (job)")
    method: str
    model: str | None
    status: int = Field(description="HTTP status, or the error status a stream ended with")
    duration: float = Field(description="seconds, to the end of the response body")
    prompt_tokens: int | None
    completion_tokens: int | None


class RequestRecordList(BaseModel):
    items: list[RequestRecordOut]
