"""The model registry (seed 004): list, create, read, change and delete models. One registry:
what is created here is served at once by every surface under its name."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Query

from core.errors import BadRequest
from management.catalog import ModelDraft
from management.service import Management
from models.registry import ModelMeta, RegistryEntry, masked_config
from server.routers.management.common import (AdminUser, CurrentUser, ManagementDep, MessageResponse,
                                              error_responses)
from server.routers.management.models_schemas import (STATUSES, CreatedModel, CreateModelRequest, ModelDetail,
                                                      ModelItem, ModelPage, UpdateModelRequest)

router = APIRouter(tags=["management: models"])


def model_item(mgmt: Management, entry: RegistryEntry, cls=ModelItem, **extra) -> ModelItem:
    meta = entry.meta or ModelMeta(id=entry.id, display_name=entry.spec.name)
    observed = mgmt.lifecycle.status(entry)
    state = mgmt.lifecycle.manager.state(entry.id)
    install = mgmt.catalog.install_state(entry)
    reason = observed.reason or (None if install.installed else install.reason)
    memory_mb = round(state.memory_bytes / 2**20, 1) if state.status == "loaded" else 0
    on_gpu = entry.spec.device.startswith("cuda")
    probed = mgmt.health.health.get(entry.id) if state.status == "loaded" else None
    checked = datetime.fromtimestamp(probed[2], timezone.utc) if probed else None
    return cls(id=meta.id, name=entry.id, display_name=meta.display_name or entry.spec.name,
               description=meta.description, framework=meta.framework, kind=entry.spec.kind, source=meta.source,
               status=observed.status, health=observed.health, health_checked_at=checked, reason=reason, installed=install.installed,
               tasks=sorted(c.value for c in entry.capabilities), priority=meta.priority,
               created_at=meta.created_at, updated_at=meta.updated_at, config=masked_config(meta.config),
               resource_requirements=meta.resource_requirements,
               resource_usage={"memory": memory_mb, "gpu_memory": memory_mb if on_gpu else 0,
                               "inflight": state.inflight}, tags=list(meta.tags), **extra)


@router.get("/models", response_model=ModelPage, responses=error_responses(422))
async def list_models(_: CurrentUser, mgmt: ManagementDep,
                      page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
                      size: Annotated[int, Query(ge=1, le=100)] = 20,
                      status: Annotated[str | None, Query(max_length=16, description=", ".join(STATUSES))] = None,
                      framework: Annotated[str | None, Query(max_length=32)] = None) -> ModelPage:
    """Every model (config.yaml's and those created here), paged, optionally filtered by status or framework."""
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of: {', '.join(STATUSES)}", param="status", code="INVALID_REQUEST")
    entries = mgmt.catalog.entries()
    if framework is not None:
        entries = [e for e in entries if e.meta is not None and e.meta.framework == framework]
    if status is not None:
        entries = [e for e in entries if mgmt.lifecycle.status(e).status == status]
    total = len(entries)
    chosen = entries[(page - 1) * size: page * size]
    return ModelPage(items=[model_item(mgmt, e) for e in chosen], total=total, page=page, size=size,
                     pages=math.ceil(total / size) if total else 0)


@router.post("/models", response_model=CreatedModel, status_code=201,
             responses=error_responses(400, 403, 409, 422))
async def create_model(req: CreateModelRequest, _: AdminUser, mgmt: ManagementDep) -> CreatedModel:
    """Register a model: a Hugging Face folder (kind detected from its files), a .gguf file, or an OCR engine."""
    rr = req.resource_requirements.model_dump() if req.resource_requirements else {}
    entry = await mgmt.create_model(ModelDraft(
        name=req.name, framework=req.framework, display_name=req.display_name, description=req.description or "",
        priority=req.priority if req.priority is not None else 0, config=req.config or {}, resource_requirements=rr,
        tags=tuple(req.tags or ())))
    return CreatedModel(id=entry.meta.id, name=entry.id, message=f"model '{entry.id}' created")


@router.get("/models/{model_id}", response_model=ModelDetail, responses=error_responses(404))
async def get_model(model_id: str, _: CurrentUser, mgmt: ManagementDep) -> ModelDetail:
    """One model by id or name, with its request statistics."""
    entry = mgmt.catalog.get(model_id)
    return model_item(mgmt, entry, ModelDetail, performance_stats=await mgmt.performance(entry.id))


@router.put("/models/{model_id}", response_model=ModelDetail, responses=error_responses(400, 403, 404, 409, 422))
async def update_model(model_id: str, req: UpdateModelRequest, _: AdminUser, mgmt: ManagementDep) -> ModelDetail:
    """Change a model created here (config.yaml's models: 409 MODEL_READ_ONLY). Serving keys of config
    apply to the next request; a new model_path needs the model stopped."""
    changes = req.model_dump(exclude_unset=True)
    if "resource_requirements" in changes and changes["resource_requirements"] is None:
        changes["resource_requirements"] = {}
    for key in ("display_name", "description", "priority", "tags"):
        if key in changes and changes[key] is None:
            raise BadRequest(f"{key} cannot be null", param=key, code="INVALID_REQUEST")
    entry = await mgmt.catalog.update(model_id, changes)
    return model_item(mgmt, entry, ModelDetail, performance_stats=await mgmt.performance(entry.id))


@router.delete("/models/{model_id}", response_model=MessageResponse, responses=error_responses(403, 404, 409))
async def delete_model(model_id: str, _: AdminUser, mgmt: ManagementDep) -> MessageResponse:
    """Delete a model created here; a running model is stopped first (its in-flight requests are cancelled)."""
    entry = await mgmt.delete_model(model_id)
    return MessageResponse(message=f"model '{entry.id}' deleted")
