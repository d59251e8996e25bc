"""Vision core surface (seed 003): service info, health, the model list, load and unload."""
from __future__ import annotations

from fastapi import APIRouter

from core.system import gpu_info, human_bytes, memory_usage
from server.deps import ServicesDep
from server.schemas.vision import (AvailableModel, HealthResponse, ModelActionResponse, ModelsResponse,
                                   RootResponse, SpecModel, error_responses)

router = APIRouter(tags=["system"])
VERSION = "1.0.0"

_FORMATS = {"qwen_vl": "safetensors", "causal_lm": "safetensors", "got_ocr": "safetensors", "dots_ocr": "safetensors",
            "rapidocr": "onnx", "tesseract": "traineddata"}


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


@router.get("/models", response_model=ModelsResponse)
async def list_models(services: ServicesDep) -> ModelsResponse:
    """Every configured model: whether it is installed and loaded, and why not when it cannot serve."""
    available, spec_list = [], []
    for entry in services.registry.entries():
        state = services.manager.state(entry.id)
        install = entry.install_state()
        loaded = state.status == "loaded"
        reason = state.error if state.status == "failed" else (None if install.installed else install.reason)
        available.append(AvailableModel(
            id=entry.id, name=entry.spec.name, params=entry.spec.params, kind=entry.spec.kind,
            tasks=sorted(c.value for c in entry.capabilities), installed=install.installed, loaded=loaded,
            status=state.status, reason=reason))
        spec_list.append(SpecModel(name=entry.id, format=_FORMATS.get(entry.spec.kind, entry.spec.kind),
                                   size=human_bytes(entry.disk_bytes()), loaded=loaded,
                                   memory_usage=human_bytes(state.memory_bytes) if loaded else None))
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
