"""The running models' health probe: every ``health_check_interval`` seconds each loaded model is
checked, and the result shows as its ``health`` in the management API.

A model is healthy when its generation engine's thread is alive (models that generate) and its
worker threads answer a trivial call within the probe timeout (every model; skipped while the model
is busy: a model that is answering requests is making progress). A change of health is written to
the model's log and published on the event hub as a model status event.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from core.periodic import PeriodicTask
from core.types import CancelToken
from management.events import MODEL_STATUS, EventHub
from models.manager import ModelManager, ModelState

log = logging.getLogger("chatvlm.monitor")

PROBE_TIMEOUT_S = 10.0


def _noop(_cancel: CancelToken) -> bool:
    return True


class HealthProber:
    def __init__(self, manager: ModelManager, hub: EventHub, *, interval_s: float,
                 on_change: Callable[[str, str, str | None], None] | None = None) -> None:
        self.manager = manager
        self.hub = hub
        self.on_change = on_change      # (model id, health, reason)
        self.health: dict[str, tuple[str, str | None, float]] = {}  # model -> (health, reason, checked at)
        self.probes = 0
        self._periodic = PeriodicTask(self.probe_all, interval_s, name="model health probe", log=log)

    @property
    def interval_s(self) -> float:
        return self._periodic.interval_s

    def set_interval(self, seconds: float) -> None:
        self._periodic.set_interval(seconds)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def probe_all(self) -> None:
        loaded = set(self.manager.loaded_ids())
        for gone in set(self.health) - loaded:
            self.health.pop(gone, None)
        await asyncio.gather(*(self._probe(m) for m in loaded))
        self.probes += 1

    async def probe(self, model_id: str) -> tuple[str, str | None]:
        """Probe one loaded model now: ("healthy" | "unhealthy", reason)."""
        await self._probe(model_id)
        health, reason, _ = self.health.get(model_id, ("unknown", None, 0.0))
        return health, reason

    async def _probe(self, model_id: str) -> None:
        try:
            st = self.manager.state(model_id)
        except Exception:  # noqa: BLE001 - removed meanwhile
            return
        health, reason = await self._check(st)
        previous = self.health.get(model_id, (None, None, 0.0))[0]
        self.health[model_id] = (health, reason, time.time())
        if previous != health and (previous is not None or health != "healthy"):
            if health == "unhealthy":
                log.warning("model %s is unhealthy: %s", model_id, reason)
            if self.on_change is not None:
                self.on_change(model_id, health, reason)
            meta = st.entry.meta  # the seed's id (the API's model id) when the model has one, as the lifecycle says
            self.hub.publish(MODEL_STATUS, {"model_id": meta.id if meta else model_id, "model_name": model_id,
                                            "status": "running",
                                            "previous_status": "running", "health": health, "reason": reason})

    async def _check(self, st: ModelState) -> tuple[str, str | None]:
        if st.status != "loaded":
            return "unknown", None
        engine, runner = st.engine, st.runner
        thread = getattr(engine, "_thread", None)
        if engine is not None and thread is not None and not thread.is_alive():
            return "unhealthy", "the generation engine's thread has stopped"
        if runner is None or st.busy:
            return "healthy", None
        cancel = CancelToken(deadline=time.monotonic() + PROBE_TIMEOUT_S)
        try:
            await asyncio.wait_for(runner.run(_noop, cancel, cancel=cancel), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return "unhealthy", f"the model's worker did not answer within {PROBE_TIMEOUT_S:g} s"
        except Exception as exc:  # noqa: BLE001 - a worker that cannot run a no-op is not healthy
            return "unhealthy", f"the model's worker failed a probe ({type(exc).__name__})"
        return "healthy", None
