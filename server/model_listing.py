"""What the model lists of every surface say about each configured model, gathered once.

The vision core's ``GET /models``, spec v1's ``GET /api/v1/models`` (and the other model
lists) render these rows in their own shapes, so the facts and their wording cannot drift.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.system import gpu_info, human_bytes
from models.adapter import ModelSpec
from server.deps import Services

@dataclass(frozen=True)
class ModelRow:
    id: str
    name: str
    params: str
    kind: str
    format: str
    tasks: list[str]
    installed: bool
    loaded: bool
    status: str                # unloaded | loading | loaded | failed
    reason: str | None         # why it cannot serve, when it cannot
    size: str | None           # weights on disk, human-readable
    memory_usage: str | None   # while loaded, human-readable
    memory_bytes: int


def model_rows(services: Services) -> list[ModelRow]:
    """One row per configured model, in configuration order. Never loads anything."""
    rows = []
    for entry in services.registry.entries():
        state = services.manager.state(entry.id)
        install = entry.install_state()
        loaded = state.status == "loaded"
        reason = state.error if state.status == "failed" else (None if install.installed else install.reason)
        rows.append(ModelRow(
            id=entry.id, name=entry.spec.name, params=entry.spec.params, kind=entry.spec.kind,
            format=entry.weights_format(), tasks=sorted(c.value for c in entry.capabilities),
            installed=install.installed, loaded=loaded, status=state.status, reason=reason,
            size=human_bytes(entry.disk_bytes()), memory_usage=human_bytes(state.memory_bytes) if loaded else None,
            memory_bytes=state.memory_bytes if loaded else 0))
    return rows


def resolved_device(spec: ModelSpec) -> str:
    """The device a model runs on (or will, once loaded): its configured device, or for
    ``auto`` CUDA when a GPU is available and the CPU otherwise (as the adapters decide)."""
    if spec.device != "auto":
        return spec.device
    return "cuda" if gpu_info()[0] else "cpu"
