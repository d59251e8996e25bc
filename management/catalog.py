"""The model catalog: create, change, delete and list models over the one live registry.

Models of config.yaml are read-only here (they can be started and stopped). Models created
through the API are persisted in the store and put in the same registry every surface reads,
under their name: a created model is served at once by /ocr, /v1/chat/completions, ...
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from core.config import ModelConfig, Settings
from core.errors import BadRequest, Conflict, InvalidParameter, ModelAlreadyExists, ModelNotFound
from management.detect import REMOTE_FRAMEWORKS, check_framework, check_gguf, confine, detect_kind
from models.adapter import ADAPTER_KINDS, InstallState
from models.manager import ModelManager
from models.registry import MASK, ModelMeta, RegistryEntry, capabilities_of, spec_from_config
from store import models as models_repo
from store.db import Database
from store.records import ModelRecord
from store.tables import utcnow

log = logging.getLogger("chatvlm.management")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Listing pages of 100 models asks each for its install state; the adapters' checks look for
# packages and files (about 0.5 ms each), so a page reuses answers younger than this.
INSTALL_TTL_S = 5.0

# config keys of the API that set a serving parameter: key -> (ModelConfig field, generation field)
_GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens",
                    "repetition_penalty": "repetition_penalty"}
_MODEL_KEYS = ("dtype", "device", "concurrency", "max_batch_size", "max_queue", "threads", "max_pixels",
               "min_pixels", "stream_interval_ms")
# A remote engine's settings (framework openai, vllm, sglang or llama.cpp): core.config.RemoteEngineConfig.
_REMOTE_KEYS = ("base_url", "api_key", "remote_model", "max_concurrency", "timeout_s", "connect_timeout_s", "vision",
                "health_interval_s", "failure_threshold", "open_s")
# Engine options the API may set (paths, such as tessdata, stay in config.yaml's hands).
_OPTION_KEYS = {"rapidocr": {"intra_op_threads", "limit_side_len", "use_cls"},
                "tesseract": {"psm", "default_language"}}


@dataclass(frozen=True)
class ModelDraft:
    name: str
    framework: str
    display_name: str | None = None
    description: str = ""
    priority: int = 0
    config: dict[str, Any] | None = None
    resource_requirements: dict[str, Any] | None = None
    tags: tuple[str, ...] = ()


class ModelCatalog:
    def __init__(self, settings: Settings, manager: ModelManager) -> None:
        self.settings = settings
        self.manager = manager
        self.registry = manager.registry
        self.db: Database | None = None
        self._lock = asyncio.Lock()  # one registry change at a time (name checks, then the write)
        self._installed: dict[str, tuple[float, object, InstallState]] = {}
        self._signature: tuple | None = None  # of the models table when refresh() last caught up

    @property
    def roots(self) -> list[Path]:
        return [self.settings.models_dir, *self.settings.management.model_roots]

    # ---- start-up ------------------------------------------------------------------------------
    def load(self, db: Database) -> list[str]:
        """Put the persisted API models into the registry (blocking). Returns names it had to skip."""
        self.db = db
        skipped = []
        for rec in db.call(models_repo.list_all):
            if rec.name in self.registry:  # config.yaml took the name since: config.yaml wins
                skipped.append(rec.name)
                continue
            self.manager.add_model(self._entry(rec))
        return skipped

    async def refresh(self) -> list[str]:
        """Catch up with the models other replicas created, changed or deleted in the shared database
        (one cheap query when nothing changed). Returns the names it removed."""
        signature = await self.db.run(models_repo.signature)
        if signature == self._signature:
            return []
        removed = []
        async with self._lock:
            # Read under the lock that this replica's own create, update and delete hold: a snapshot
            # read before a local delete finished would bring the deleted model back.
            signature = await self.db.run(models_repo.signature)
            records = await self.db.run(models_repo.list_all)
            wanted = {rec.name: rec for rec in records}
            for entry in list(self.registry.entries()):
                rec = wanted.get(entry.id)
                if entry.meta is not None and entry.meta.source == "api" and (rec is None or rec.id != entry.meta.id):
                    await self.manager.remove_model(entry.id)
                    removed.append(entry.id)
            for rec in records:
                current = self.registry.get(rec.name)
                if current is not None and (current.meta is None or current.meta.source != "api"
                                            or current.meta.updated_at == rec.updated_at):
                    continue  # config.yaml's model of that name, or already current
                try:
                    entry = self._entry(rec)
                except (BadRequest, InvalidParameter):
                    log.warning("model '%s' in the database cannot be served by this replica", rec.name)
                    continue
                if current is None:
                    self.manager.add_model(entry)
                else:
                    self.manager.replace_entry(entry)
            self._signature = signature
        return removed

    # ---- reading -------------------------------------------------------------------------------
    def get(self, ident: str) -> RegistryEntry:
        """A model by name or by id."""
        entry = self.registry.get(ident)
        if entry is None:
            entry = next((e for e in self.registry.entries() if e.meta is not None and e.meta.id == ident), None)
        if entry is None:
            raise ModelNotFound(f"Model '{ident[:80]}' not found", param="model_id", details={"model_id": ident[:80]})
        return entry

    def entries(self) -> list[RegistryEntry]:
        return self.registry.entries()

    def install_state(self, entry: RegistryEntry) -> InstallState:
        """The entry's install state, at most INSTALL_TTL_S old (new settings are checked at once)."""
        now = time.monotonic()
        hit = self._installed.get(entry.id)
        if hit is not None and hit[1] is entry.spec and now - hit[0] < INSTALL_TTL_S:
            return hit[2]
        state = entry.install_state()
        self._installed[entry.id] = (now, entry.spec, state)
        return state

    # ---- writing -------------------------------------------------------------------------------
    async def create(self, draft: ModelDraft) -> RegistryEntry:
        check_framework(draft.framework)
        if not NAME.fullmatch(draft.name):
            raise BadRequest("name must match ^[a-z0-9][a-z0-9._-]{0,63}$", param="name", code="INVALID_REQUEST")
        config = dict(draft.config or {})
        kind, path = await asyncio.to_thread(self._kind_and_path, draft.framework, config)
        now = utcnow()
        rec = ModelRecord(id=f"model-{uuid.uuid4().hex[:12]}", name=draft.name,
                          display_name=draft.display_name or draft.name, description=draft.description,
                          framework=draft.framework, kind=kind, path=str(path) if path else None,
                          priority=draft.priority, config=config,
                          resource_requirements=dict(draft.resource_requirements or {}), tags=list(draft.tags),
                          created_at=now, updated_at=now)
        entry = self._entry(rec)  # checks the serving parameters before anything is written
        async with self._lock:
            if draft.name in self.registry:
                raise ModelAlreadyExists(f"Model '{draft.name}' already exists", param="name",
                                         details={"name": draft.name})
            try:
                await self.db.run(models_repo.add, rec)
            except IntegrityError:
                raise ModelAlreadyExists(f"Model '{draft.name}' already exists", param="name",
                                         details={"name": draft.name}) from None
            self.manager.add_model(entry)
        return entry

    async def update(self, ident: str, changes: dict[str, Any]) -> RegistryEntry:
        entry = self._writable(ident)
        meta = entry.meta
        rec = self._record(entry)
        fields = {k: v for k, v in changes.items() if k in ("display_name", "description", "priority",
                                                           "resource_requirements")}
        if "tags" in changes:
            fields["tags"] = list(changes["tags"])
        if "config" in changes:
            config = dict(changes["config"] or {})
            if config.get("api_key") == MASK and "api_key" in meta.config:  # GET's masked key sent back
                config["api_key"] = meta.config["api_key"]
            kind, path = rec.kind, rec.path
            if config.get("model_path") != meta.config.get("model_path"):
                if self.manager.state(entry.id).status in ("loaded", "loading"):
                    raise Conflict("stop the model before changing config.model_path", param="config.model_path",
                                   code="MODEL_RUNNING")
                kind, new_path = await asyncio.to_thread(self._kind_and_path, meta.framework, config)
                path = str(new_path) if new_path else None
            fields.update(config=config, kind=kind, path=path)
        rec = replace(rec, **fields, updated_at=utcnow())
        new_entry = self._entry(rec)
        async with self._lock:
            await self.db.run(models_repo.update, rec)
            self.manager.replace_entry(new_entry)
        return new_entry

    async def delete(self, ident: str) -> RegistryEntry:
        """Stop (cancelling in-flight work), then forget the model everywhere."""
        entry = self._writable(ident)
        async with self._lock:
            await self.manager.remove_model(entry.id)
            await self.db.run(models_repo.remove, entry.meta.id)
        return entry

    def _writable(self, ident: str) -> RegistryEntry:
        entry = self.get(ident)
        if entry.meta is None or entry.meta.source != "api":
            raise Conflict(f"Model '{entry.id}' is defined in config.yaml: change it there (it can be started "
                           "and stopped here)", param="model_id", code="MODEL_READ_ONLY",
                           details={"model_id": entry.id})
        return entry

    # ---- building entries ----------------------------------------------------------------------
    def _kind_and_path(self, framework: str, config: dict[str, Any]) -> tuple[str, Path | None]:
        if framework in REMOTE_FRAMEWORKS:
            if "model_path" in config:
                raise BadRequest(f"framework '{framework}' (a remote engine) takes base_url, not model_path",
                                 param="config.model_path", code="INVALID_REQUEST")
            return "remote", None
        if framework in ("rapidocr", "tesseract"):
            if "model_path" in config:
                raise BadRequest(f"framework '{framework}' takes no model_path (its models ship with it)",
                                 param="config.model_path", code="INVALID_REQUEST")
            return framework, None
        path = confine(config.get("model_path"), self.roots)
        if framework == "gguf":
            check_gguf(path)
            return "causal_lm", path
        kind = detect_kind(path)
        if kind not in ADAPTER_KINDS:
            raise BadRequest(f"models of kind '{kind}' cannot be served by this build yet", param="config.model_path",
                             code="UNSUPPORTED_MODEL")
        return kind, path

    def _entry(self, rec: ModelRecord) -> RegistryEntry:
        cfg = _model_config(rec)
        spec = spec_from_config(rec.name, cfg, Path(rec.path) if rec.path else None, self.settings.data_dir,
                                self.settings.cache_path)
        meta = ModelMeta(id=rec.id, source="api", display_name=rec.display_name, description=rec.description,
                         framework=rec.framework, priority=rec.priority, config=dict(rec.config),
                         resource_requirements=dict(rec.resource_requirements), tags=tuple(rec.tags),
                         created_at=rec.created_at, updated_at=rec.updated_at)
        return RegistryEntry(spec, capabilities_of(spec), meta)

    @staticmethod
    def _record(entry: RegistryEntry) -> ModelRecord:
        meta = entry.meta
        return ModelRecord(id=meta.id, name=entry.id, display_name=meta.display_name, description=meta.description,
                           framework=meta.framework, kind=entry.spec.kind,
                           path=str(entry.spec.path) if entry.spec.path else None, priority=meta.priority,
                           config=dict(meta.config), resource_requirements=dict(meta.resource_requirements),
                           tags=list(meta.tags), created_at=meta.created_at, updated_at=meta.updated_at)


def _model_config(rec: ModelRecord) -> ModelConfig:
    """The serving settings a model's API config asks for (400/422 naming the key when wrong).
    Keys this server has no use for (a llama.cpp n_ctx, ...) are kept as given and ignored."""
    data: dict[str, Any] = {"name": rec.display_name or rec.name, "kind": rec.kind}
    generation: dict[str, Any] = {}
    remote: dict[str, Any] = {}
    if rec.kind == "remote":
        data.update(framework=rec.framework, remote=remote)
    for key, value in rec.config.items():
        if rec.kind == "remote" and key in _REMOTE_KEYS:
            remote[key] = value
        elif key in _GENERATION_KEYS:
            generation[_GENERATION_KEYS[key]] = value
        elif key in _MODEL_KEYS:
            data[key] = value
        elif key == "options":
            allowed = _OPTION_KEYS.get(rec.kind, set())
            if not isinstance(value, dict) or set(value) - allowed:
                raise BadRequest(f"config.options may set only: {', '.join(sorted(allowed)) or 'nothing'} "
                                 f"for framework '{rec.framework}'", param="config.options", code="INVALID_REQUEST")
            data["options"] = value
    if generation:
        data["generation"] = generation
    try:
        return ModelConfig(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] == "remote":
            loc = loc[1:2]
        if rec.kind == "remote" and not loc and "base_url" not in remote:
            loc = ["base_url"]
        if loc and loc[0] == "generation":
            loc = loc[1:]
            loc = [next((k for k, v in _GENERATION_KEYS.items() if v == loc[0]), loc[0])] if loc else loc
        param = "config." + ".".join(loc) if loc else "config"
        raise InvalidParameter(f"{param}: {err.get('msg', 'invalid value')}", param=param,
                               code="INVALID_REQUEST") from None
