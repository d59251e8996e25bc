"""The live configuration (seed 004's GET/PUT /api/config): each key is mapped onto a real setting
that takes effect at once, and changes are stored in the database, where they win over config.yaml.

Precedence, lowest first: the built-in default < config.yaml < environment (CHATVLM_...) < CLI flags
< a change made through PUT /api/config (stored in the database, kept across restarts). Putting
``null`` for a key drops its stored change: the key goes back to the file's (or default) value.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.config import AlertThresholds, Settings
from core.errors import InvalidParameter
from management.events import CONFIG, EventHub
from store import config as repo
from store.db import Database

log = logging.getLogger("chatvlm.monitor")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class LiveValues(BaseModel):
    """The seed's keys, their types and ranges (checked again here, whoever calls)."""

    model_config = ConfigDict(extra="forbid")

    gpu_monitor_interval: float = Field(ge=1, le=86400, description="Seconds between monitoring samples")
    max_concurrent_models: int = Field(ge=0, le=1000, description="Models loaded at once (0: no limit)")
    default_model_timeout: float = Field(gt=0, le=86400, description="Seconds a model start (load) may take")
    health_check_interval: float = Field(ge=1, le=86400, description="Seconds between health probes of a "
                                                                     "running model")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    alert_thresholds: AlertThresholds


# key -> (where it lives in Settings, read from Settings)
_SETTINGS: dict[str, tuple[str, Callable[[Settings], Any]]] = {
    "gpu_monitor_interval": ("monitoring.gpu_monitor_interval", lambda s: s.monitoring.gpu_monitor_interval),
    "max_concurrent_models": ("manager.max_loaded_models", lambda s: s.manager.max_loaded_models),
    "default_model_timeout": ("management.start_timeout_s", lambda s: s.management.start_timeout_s),
    "health_check_interval": ("monitoring.health_check_interval", lambda s: s.monitoring.health_check_interval),
    "log_level": ("server.log_level", lambda s: s.server.log_level.upper()),
    "alert_thresholds": ("alerts.thresholds", lambda s: s.alerts.thresholds),
}
KEYS = tuple(_SETTINGS)


def _file_source(settings: Settings, path: str) -> str:
    """"config" when config.yaml, the environment or a flag set the key; else "default"."""
    obj: Any = settings
    parts = path.split(".")
    for part in parts[:-1]:
        if part not in obj.model_fields_set:
            return "default"
        obj = getattr(obj, part)
    return "config" if parts[-1] in obj.model_fields_set else "default"


class LiveConfig:
    def __init__(self, settings: Settings, hub: EventHub) -> None:
        self.settings = settings
        self.hub = hub
        self.db: Database | None = None
        self._stored: dict[str, Any] = {}
        self._hooks: dict[str, list[Callable[[Any], None]]] = {}
        self._values = self._compute({})

    # ---- reading -------------------------------------------------------------------------------
    def _base(self) -> dict[str, Any]:
        return {k: read(self.settings) for k, (_, read) in _SETTINGS.items()}

    def _compute(self, stored: dict[str, Any]) -> LiveValues:
        values = self._base()
        for key, value in stored.items():
            if key == "alert_thresholds":
                values[key] = AlertThresholds(**{**values[key].model_dump(), **value})
            elif key in values:
                values[key] = value
        return LiveValues(**values)

    @property
    def values(self) -> LiveValues:
        return self._values

    def get(self, key: str) -> Any:
        return getattr(self._values, key)

    def alert_thresholds(self) -> AlertThresholds:
        """The effective built-in thresholds (the alert evaluator calls this on every sample)."""
        return self._values.alert_thresholds

    def sources(self) -> dict[str, Any]:
        """Where each value comes from: "database" (PUT /api/config), "config" (config.yaml, the
        environment or a flag) or "default"; per threshold for alert_thresholds."""
        out: dict[str, Any] = {}
        for key, (path, _) in _SETTINGS.items():
            if key == "alert_thresholds":
                stored = self._stored.get(key, {})
                out[key] = {name: "database" if name in stored else _file_source(self.settings, f"{path}.{name}")
                            for name in AlertThresholds.model_fields}
            else:
                out[key] = "database" if key in self._stored else _file_source(self.settings, path)
        return out

    # ---- hooks: who applies each key -----------------------------------------------------------
    def on_change(self, key: str, apply: Callable[[Any], None], *, now: bool = True) -> None:
        """Register ``apply(value)`` for a key (called with the current value at once when ``now``)."""
        self._hooks.setdefault(key, []).append(apply)
        if now:
            apply(self.get(key))

    def _apply(self, old: LiveValues, new: LiveValues) -> dict[str, Any]:
        changed = {}
        for key in KEYS:
            before, after = getattr(old, key), getattr(new, key)
            if before != after:
                changed[key] = after.model_dump() if isinstance(after, BaseModel) else after
                for hook in self._hooks.get(key, ()):
                    hook(after)
        return changed

    # ---- start-up and changes ------------------------------------------------------------------
    def load(self, db: Database) -> None:
        """Read the stored changes (blocking: off the event loop). A stored value that no longer
        validates (e.g. a range tightened by an upgrade) is ignored with a warning."""
        self.db = db
        stored = db.call(repo.overrides)
        good: dict[str, Any] = {}
        for key, value in stored.items():
            try:
                self._compute({**good, key: value})
            except (ValidationError, TypeError):
                log.warning("ignoring the stored config value of %s: it is no longer valid", key)
                continue
            if key in _SETTINGS:
                good[key] = value
        self._stored = good
        old, self._values = self._values, self._compute(good)
        self._apply(old, self._values)

    async def update(self, patch: dict[str, Any], by: str) -> dict[str, Any]:
        """Validate a partial change, store it, apply it and announce it; returns what changed."""
        unknown = sorted(set(patch) - set(KEYS))
        if unknown:
            raise InvalidParameter(f"unknown configuration key(s): {', '.join(unknown)}", param=unknown[0])
        stored = dict(self._stored)
        for key, value in patch.items():
            if value is None:
                stored.pop(key, None)
            elif key == "alert_thresholds":
                if not isinstance(value, dict):
                    raise InvalidParameter("alert_thresholds must be an object", param=key)
                merged = {**stored.get(key, {}), **value}
                stored[key] = {k: v for k, v in merged.items() if v is not None}
                if not stored[key]:
                    stored.pop(key)
            else:
                stored[key] = value.upper() if key == "log_level" and isinstance(value, str) else value
        try:
            new = self._compute(stored)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise InvalidParameter(f"{where}: {err['msg']}", param=where) from None
        # Store the normalized values (e.g. "info" -> "INFO"), only the keys this change touched.
        for key in patch:
            if key in stored and key != "alert_thresholds":
                stored[key] = getattr(new, key)
        await self.db.run(repo.save, {k: stored.get(k) for k in patch}, by)
        self._stored = stored
        old, self._values = self._values, new
        changed = self._apply(old, new)
        if changed:
            self.hub.publish(CONFIG, {"changed": changed})
            log.info("configuration changed by %s: %s", by, ", ".join(sorted(changed)))
        return changed
