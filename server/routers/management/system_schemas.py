"""Schemas of GET /api/system/status and GET /api/system/gpu (seed 004; memory in MB, power in W)."""
from __future__ import annotations

from pydantic import BaseModel, Field


class GpuProcessOut(BaseModel):
    pid: int
    name: str | None
    memory_usage: float | None = Field(description="MB")


class GpuOut(BaseModel):
    id: int
    name: str
    driver_version: str | None
    cuda_version: str | None
    utilization: float = Field(description="percent")
    memory_used: float = Field(description="MB")
    memory_total: float = Field(description="MB")
    memory_free: float = Field(description="MB")
    temperature: float | None = Field(description="Celsius")
    power_usage: float | None = Field(description="W")
    power_limit: float | None = Field(description="W")
    processes: list[GpuProcessOut]


class GpuList(BaseModel):
    gpus: list[GpuOut] = Field(description="Empty when there is no NVIDIA GPU or driver")


class GpuBrief(BaseModel):
    id: int
    name: str
    utilization: float
    memory_used: float
    memory_total: float
    temperature: float | None


class ModelCounts(BaseModel):
    total: int
    running: int
    stopped: int
    error: int


class Resources(BaseModel):
    cpu_percent: float
    memory_percent: float
    disk_percent: float = Field(description="The disk that holds the data directory")


class SystemStatus(BaseModel):
    status: str = Field(description="healthy, or degraded when a model is in error")
    version: str
    uptime: float = Field(description="Seconds since the server started")
    models: ModelCounts
    resources: Resources
    gpu: list[GpuBrief]
