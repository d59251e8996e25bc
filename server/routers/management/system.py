"""The machine now (seed 004): GET /api/system/status and GET /api/system/gpu."""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict

from fastapi import APIRouter

from management.service import Management
from server.routers.management.common import CurrentUser, ManagementDep, error_responses
from server.routers.management.system_schemas import (GpuBrief, GpuList, GpuOut, ModelCounts, Resources,
                                                      SystemStatus)
from server.routers.system import VERSION

router = APIRouter(tags=["management: system"])


async def _gpus(mgmt: Management) -> list:
    if not getattr(mgmt.gpus, "available", True):
        return []  # no driver: answered at once, no thread hop
    return await asyncio.to_thread(mgmt.gpus.read)


@router.get("/system/status", response_model=SystemStatus, responses=error_responses())
async def system_status(_: CurrentUser, mgmt: ManagementDep) -> SystemStatus:
    """Status, version, uptime, models by status, CPU/memory/disk use and each GPU."""
    statuses = Counter(mgmt.lifecycle.status(e).status for e in mgmt.catalog.entries())
    host = await asyncio.to_thread(mgmt.host.read)
    devices = await _gpus(mgmt)
    return SystemStatus(
        status="degraded" if statuses["error"] else "healthy", version=VERSION,
        uptime=round(time.time() - mgmt.started_at, 1),
        models=ModelCounts(total=sum(statuses.values()), running=statuses["running"], stopped=statuses["stopped"],
                           error=statuses["error"]),
        resources=Resources(cpu_percent=host.cpu_percent, memory_percent=host.memory_percent,
                            disk_percent=host.disk_percent),
        gpu=[GpuBrief(id=d.id, name=d.name, utilization=d.utilization, memory_used=d.memory_used,
                      memory_total=d.memory_total, temperature=d.temperature) for d in devices])


@router.get("/system/gpu", response_model=GpuList, responses=error_responses())
async def system_gpu(_: CurrentUser, mgmt: ManagementDep) -> GpuList:
    """Each NVIDIA GPU: utilization, memory, temperature, power and its processes ({"gpus": []} without one)."""
    return GpuList(gpus=[GpuOut(**asdict(d)) for d in await _gpus(mgmt)])
