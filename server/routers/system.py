"""Vision core surface (seed 003): service info, health, the model list, load and unload."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from core.system import gpu_info, human_bytes, memory_usage
from core.types import Capability
from server.deps import ServicesDep
from server.model_listing import model_rows
from server.schemas.vision import (AvailableModel, HealthResponse, ModelActionResponse, ModelsResponse,
                                   ProbeResponse, RootResponse, SpecModel, error_responses)

router = APIRouter(tags=["system"])
VERSION = "1.0.0"


@router.get("/", response_model=RootResponse)
async def root() -> RootResponse:
    """Service name, version and where the docs are."""
    return RootResponse(message="ChatVLMLLM API", version=VERSION, docs="/docs", health="/health")


@router.get("/health", response_model=HealthResponse)
async def health(services: ServicesDep) -> HealthResponse:
    """Process health, loaded models and GPU. Never touches a model, so it answers while they work."""
    manager = services.manager
    loaded = manager.loaded_ids()
    preload_failed = any(m in manager.failed_ids() for m in services.settings.manager.preload)
    available, name = gpu_info()
    return HealthResponse(status="degraded" if preload_failed else "healthy", model_loaded=bool(loaded),
                          models_loaded=len(loaded), loaded_models=loaded, gpu_available=available,
                          gpu_name=name, device="cuda" if available else "cpu", memory_usage=memory_usage(),
                          active_connections=services.connections.active)


@router.get("/healthz", response_model=ProbeResponse)
async def liveness() -> ProbeResponse:
    """Liveness: the process serves HTTP. Never touches a model."""
    return ProbeResponse(status="ok")


@router.get("/readyz", response_model=ProbeResponse, responses={503: {"model": ProbeResponse,
            "description": "Draining, or no OCR model can serve"}})
async def readiness(services: ServicesDep) -> JSONResponse:
    """Readiness: 503 while the server drains for shutdown or when no installed OCR model can serve."""
    if services.draining:
        return JSONResponse({"status": "draining", "reason": "the server is shutting down"}, status_code=503)
    ocr_ready = any(Capability.OCR in e.capabilities and e.install_state().installed
                    for e in services.registry.entries())
    if not ocr_ready:
        return JSONResponse({"status": "not_ready", "reason": "no OCR model is installed"}, status_code=503)
    return JSONResponse({"status": "ok", "reason": None})


@router.get("/models", response_model=ModelsResponse)
async def list_models(services: ServicesDep) -> ModelsResponse:
    """Every configured model: whether it is installed and loaded, and why not when it cannot serve."""
    rows = model_rows(services)
    available = [AvailableModel(id=r.id, name=r.name, params=r.params, kind=r.kind, tasks=r.tasks,
                                installed=r.installed, loaded=r.loaded, status=r.status, reason=r.reason) for r in rows]
    spec_list = [SpecModel(name=r.id, format=r.format, size=r.size, loaded=r.loaded, memory_usage=r.memory_usage)
                 for r in rows]
    return ModelsResponse(available=available, loaded=services.manager.loaded_ids(), models=spec_list)


@router.post("/models/{model_name}/load", response_model=ModelActionResponse,
             responses=error_responses(404, 503))
async def load_model(model_name: str, services: ServicesDep) -> ModelActionResponse:
    """Load a model now instead of on its first request."""
    state = await services.manager.ensure_loaded(model_name)
    return ModelActionResponse(status="success", message=f"Model {model_name} loaded",
                               load_time=round(state.load_seconds, 3),
                               memory_usage=human_bytes(state.memory_bytes))


@router.delete("/models/{model_name}", response_model=ModelActionResponse, responses=error_responses(404))
async def unload_model(model_name: str, services: ServicesDep) -> ModelActionResponse:
    """Unload a model and free its memory; the next request that needs it loads it again."""
    was_loaded = await services.manager.unload(model_name)
    message = f"Model {model_name} unloaded" if was_loaded else f"Model {model_name} was not loaded"
    return ModelActionResponse(status="success", message=message)
