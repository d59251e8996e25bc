"""Start, stop and restart models as tasks (202 + task id), and read a task's outcome."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field

from server.routers.management.common import AdminUser, CurrentUser, ManagementDep, error_responses

router = APIRouter(tags=["management: lifecycle"])


class LifecycleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    force: bool = Field(False, description="stop: cancel in-flight requests at once instead of waiting for them")
    timeout: float | None = Field(None, gt=0, le=86400, description="Seconds: start = the load, stop = the wait "
                                  "for in-flight requests (then they are cancelled)")


class TaskAccepted(BaseModel):
    message: str
    task_id: str


class TaskOut(BaseModel):
    task_id: str
    model_id: str = Field(description="The model's name")
    action: str
    status: str = Field(description="pending, running, succeeded or failed")
    error: str | None = None
    error_code: str | None = Field(None, description="INSUFFICIENT_RESOURCES, OPERATION_TIMEOUT, "
                                   "MODEL_NOT_INSTALLED, MODEL_LOAD_FAILED, INTERRUPTED, ...")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


_MESSAGES = {"start": "model is starting", "stop": "model is stopping", "restart": "model is restarting"}


async def _submit(action: str, model_id: str, body: LifecycleRequest | None, mgmt) -> TaskAccepted:
    entry = mgmt.catalog.get(model_id)
    body = body or LifecycleRequest()
    task_id = await mgmt.lifecycle.submit(entry.id, action, force=body.force, timeout=body.timeout)
    return TaskAccepted(message=_MESSAGES[action], task_id=task_id)


_Body = Annotated[LifecycleRequest | None, Body()]


@router.post("/models/{model_id}/start", response_model=TaskAccepted, status_code=202,
             responses=error_responses(403, 404, 422))
async def start(model_id: str, _: AdminUser, mgmt: ManagementDep, body: _Body = None) -> TaskAccepted:
    """Load the model now and keep it running (also after a server restart)."""
    return await _submit("start", model_id, body, mgmt)


@router.post("/models/{model_id}/stop", response_model=TaskAccepted, status_code=202,
             responses=error_responses(403, 404, 422))
async def stop(model_id: str, _: AdminUser, mgmt: ManagementDep, body: _Body = None) -> TaskAccepted:
    """Stop the model: other surfaces answer 503 MODEL_NOT_RUNNING for it until it is started."""
    return await _submit("stop", model_id, body, mgmt)


@router.post("/models/{model_id}/restart", response_model=TaskAccepted, status_code=202,
             responses=error_responses(403, 404, 422))
async def restart(model_id: str, _: AdminUser, mgmt: ManagementDep, body: _Body = None) -> TaskAccepted:
    """Stop, then start the model (new settings and weights are read)."""
    return await _submit("restart", model_id, body, mgmt)


@router.get("/tasks/{task_id}", response_model=TaskOut, responses=error_responses(404))
async def get_task(task_id: str, _: CurrentUser, mgmt: ManagementDep) -> TaskOut:
    """A lifecycle task: its status, its error when it failed, and its timestamps."""
    t = await mgmt.lifecycle.task(task_id)
    return TaskOut(task_id=t.id, model_id=t.model_name, action=t.action, status=t.status, error=t.error,
                   error_code=t.error_code, created_at=t.created_at, started_at=t.started_at,
                   finished_at=t.finished_at)
