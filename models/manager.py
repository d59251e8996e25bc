"""The model manager: lazy loading, one lock per model, unload on request, on idleness
or under a memory budget (least recently used first), and a real release of memory.

It is the only owner of loaded models: there is no second cache to drift apart.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from core.errors import (InsufficientResources, ModelLoadFailed, ModelNotFound, ModelNotInstalled, ModelNotRunning,
                         OperationTimeout, Overloaded)
from core.omp import released
from core.types import CancelToken
from models.adapter import ModelAdapter, adapter_class
from models.registry import ModelRegistry, RegistryEntry, not_installed_message
from models.runner import ModelRunner

if TYPE_CHECKING:  # the engine imports torch: only once a model that generates is loaded
    from engine.engine import Engine

log = logging.getLogger(__name__)

LOAD_RETRY_S = 10.0  # a failed load is not retried for this long; requests get 503 meanwhile


@dataclass
class ModelState:
    entry: RegistryEntry
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    adapter: ModelAdapter | None = None
    runner: ModelRunner | None = None
    engine: Engine | None = None  # the generation engine, for models that generate text
    load_task: asyncio.Task | None = None  # the load in progress, shared by everyone waiting for it
    status: str = "unloaded"  # unloaded | loading | loaded | failed
    error: str | None = None
    failed_at: float = 0.0
    last_used: float = 0.0
    inflight: int = 0
    memory_bytes: int = 0
    load_seconds: float = 0.0
    quantization: str | None = None  # a load request's choice (None: the registry entry's)

    @property
    def spec(self):
        """The entry's spec with this state's load-time choices applied."""
        if self.quantization is None:
            return self.entry.spec
        return dataclasses.replace(self.entry.spec, quantization=self.quantization)
    # Set from the operator's desired state (management API): a held model was stopped on purpose
    # and answers 503 MODEL_NOT_RUNNING instead of loading on demand; a pinned one was started on
    # purpose and is never unloaded for idleness or evicted for room.
    held: bool = False
    pinned: bool = False

    @property
    def busy(self) -> bool:
        """Work in flight or queued, on the runner or in the engine."""
        engine = self.engine
        return self.inflight > 0 or (engine is not None and (engine.active_count + engine.waiting_count) > 0)

    def touch(self) -> None:
        self.last_used = time.monotonic()


class ModelManager:
    def __init__(self, registry: ModelRegistry, *, memory_budget_mb: float = 0,
                 idle_unload_s: float = 0, idle_check_s: float = 30,
                 metrics: Any = None, max_loaded: int = 0) -> None:
        self.registry = registry
        self.memory_budget = int(memory_budget_mb * 1024 * 1024)
        self.idle_unload_s = idle_unload_s
        self.idle_check_s = idle_check_s
        self.metrics = metrics
        self.max_loaded = max_loaded  # models loaded at once (0: no limit); changed live by the management API
        self._states = {e.id: ModelState(e) for e in registry.entries()}
        self._idle_task: asyncio.Task | None = None
        # Called with a model's id whenever its status changes (loading, loaded, failed, unloaded),
        # whoever caused it: a request's lazy load, an idle or memory-pressure unload, the
        # management API. Listeners run on the event loop and must be quick.
        self.status_listeners: list[Callable[[str], None]] = []

    # ---- queries -------------------------------------------------------------
    def state(self, model_id: str) -> ModelState:
        try:
            return self._states[self.registry.canonical(model_id)]
        except KeyError:
            raise ModelNotFound(f"Model '{model_id}' not found", param="model") from None

    def loaded_ids(self) -> list[str]:
        return [m for m, s in self._states.items() if s.status == "loaded"]

    def any_busy(self) -> bool:
        """Any model with work in flight or queued."""
        return any(s.busy for s in self._states.values())

    def failed_ids(self) -> list[str]:
        return [m for m, s in self._states.items() if s.status == "failed"]

    def total_memory(self) -> int:
        return sum(s.memory_bytes for s in self._states.values() if s.status == "loaded")

    def _set_status(self, st: ModelState, status: str, error: str | None = None) -> None:
        st.status, st.error = status, error
        for listener in list(self.status_listeners):
            try:
                listener(st.entry.id)
            except Exception:  # noqa: BLE001 - a listener's bug never breaks a load or an unload
                log.exception("model status listener failed for %s", st.entry.id)

    # ---- loading ---------------------------------------------------------------
    async def ensure_loaded(self, model_id: str, quantization: str | None = None) -> ModelState:
        """Return the model's state once it is loaded, loading it first if needed.

        The load runs as its own task under the model's lock: a caller that gives up (client
        gone, deadline) stops waiting, but the load completes and the next request finds the
        model loaded instead of loading it a second time. ``quantization`` (a load request's)
        sticks to the model; a model loaded at another one is unloaded and loaded again."""
        st = self.state(model_id)
        running = getattr(getattr(st.adapter, "precision", None), "quantization", None)
        if quantization is not None and quantization == running:
            st.quantization = quantization  # already runs at it (e.g. "none" for auto): no reload
        elif quantization is not None and quantization != st.spec.quantization:
            await self.unload(model_id)
            if st.status == "failed":
                self._set_status(st, "unloaded")  # the failure was at the other quantization
            st.quantization = quantization
        if st.status == "loaded":
            return st
        if st.held:
            raise ModelNotRunning(f"Model '{st.entry.id}' is stopped; start it through the management API "
                                  f"(POST /api/models/{st.entry.id}/start)", param="model")
        async with st.lock:
            if st.status == "loaded":
                return st
            if st.status == "failed" and time.monotonic() - st.failed_at < LOAD_RETRY_S:
                raise ModelLoadFailed(f"Model '{model_id}' failed to load: {st.error}",
                                      param="model", headers={"Retry-After": str(int(LOAD_RETRY_S))})
            if st.load_task is None or st.load_task.done():
                st.load_task = asyncio.create_task(self._load(st))
                st.load_task.add_done_callback(_retrieve)
            load = st.load_task
        await asyncio.shield(load)
        return st

    async def _load(self, st: ModelState) -> None:
        model_id = st.entry.id
        install = await asyncio.to_thread(st.entry.install_state)
        if not install.installed:
            raise ModelNotInstalled(not_installed_message(st.entry, install.reason), param="model")
        await self._make_room(st)
        self._set_status(st, "loading")
        started = time.monotonic()
        adapter = adapter_class(st.entry.spec.kind)(st.spec)
        try:
            await asyncio.to_thread(released(adapter.load))  # no OpenMP pool left on the executor's thread
        except Exception as exc:  # noqa: BLE001 - any load failure isolates this model only
            st.failed_at = time.monotonic()
            self._set_status(st, "failed", exc.message if isinstance(exc, ModelLoadFailed)
                             else "the model could not be loaded")
            log.exception("loading model %s failed", model_id)
            raise ModelLoadFailed(f"Model '{model_id}' failed to load: {st.error}", param="model",
                                  headers={"Retry-After": str(int(LOAD_RETRY_S))}) from None
        st.adapter = adapter
        st.runner = ModelRunner(model_id, st.entry.spec.concurrency, st.entry.spec.max_queue,
                                cpu_threads=getattr(adapter, "cpu_threads", None))  # see ModelAdapter
        backend = getattr(adapter, "engine_backend", None)
        make_engine = getattr(adapter, "make_engine", None)  # an adapter that brings its own (a remote engine)
        if make_engine is not None:
            st.engine = make_engine(self.metrics)
            st.engine.start()
            await st.engine.ready()
        elif backend is not None:
            from engine.engine import Engine

            spec = st.entry.spec
            # Off the event loop: a backend prepares its weights (e.g. packs them, ~1-2 s).
            made = await asyncio.to_thread(released(backend))
            st.engine = Engine(made, name=model_id, max_batch=spec.max_batch_size,
                               max_queue=spec.max_queue, stream_interval=spec.stream_interval_ms / 1000,
                               metrics=self.metrics)
            st.engine.start()
        st.memory_bytes = adapter.memory_bytes()
        st.load_seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.observe_load(model_id, st.load_seconds)
        st.last_used = time.monotonic()
        self._set_status(st, "loaded")
        log.info("loaded model %s in %.2fs (%.1f MB)", model_id, st.load_seconds, st.memory_bytes / 2**20)

    async def _make_room(self, incoming: ModelState) -> None:
        """Evict least recently used idle models until the incoming one fits the budget and the
        limit on loaded models."""
        await self._make_slot(incoming)
        if not self.memory_budget:
            return
        need = _estimate_bytes(incoming.entry)
        for victim in sorted((s for s in self._states.values()
                              if s.status == "loaded" and s is not incoming and not s.pinned),
                             key=lambda s: s.last_used):
            if self.total_memory() + need <= self.memory_budget:
                return
            if not victim.busy:
                log.info("evicting %s to make room for %s", victim.entry.id, incoming.entry.id)
                await self.unload(victim.entry.id)

    async def _make_slot(self, incoming: ModelState) -> None:
        limit = self.max_loaded
        if not limit:
            return
        others = lambda: [s for s in self._states.values()  # noqa: E731
                          if s is not incoming and s.status in ("loaded", "loading")]
        for victim in sorted((s for s in others() if s.status == "loaded" and not s.pinned and not s.busy),
                             key=lambda s: s.last_used):
            if len(others()) < limit:
                return
            log.info("unloading %s: at most %d models may be loaded at once", victim.entry.id, limit)
            await self.unload(victim.entry.id)
        if len(others()) >= limit:
            raise InsufficientResources(f"{limit} model(s) are loaded, the most allowed at once (max_concurrent_models), "
                                        f"and none of them can be unloaded now", param="model")

    async def unload(self, model_id: str) -> bool:
        """Unload and free the model. Returns False when it was not loaded."""
        st = self.state(model_id)
        async with st.lock:
            if st.status != "loaded":
                if st.status == "failed":
                    self._set_status(st, "unloaded")
                return False
            self._set_status(st, "unloaded")
            handles = [st.runner, st.engine, st.adapter]
            st.runner = st.engine = st.adapter = None
            st.memory_bytes = 0
            await asyncio.to_thread(_release, handles)
            log.info("unloaded model %s", model_id)
            return True

    def check_capacity(self, model_id: str, deadline: float | None = None) -> None:
        """Refuse at once (503 + Retry-After) when the model's queue is already full, or too long
        to finish before ``deadline``, before the request spends time on decoding or tokenizing."""
        st = self.state(model_id)
        runner, engine = st.runner, st.engine
        if engine is not None and engine.waiting_count >= engine.max_queue:
            raise Overloaded(f"model '{model_id}' is at capacity; retry shortly", headers={"Retry-After": "1"})
        if runner is not None:
            runner.admit(deadline)

    # ---- running ---------------------------------------------------------------
    async def run(self, model_id: str, method: str, *args: Any, cancel: CancelToken) -> Any:
        """Call ``adapter.<method>(*args, cancel)`` on the model's worker thread."""
        st = await self.ensure_loaded(model_id)
        st.inflight += 1
        try:
            fn = getattr(st.adapter, method)
            started = time.monotonic()
            result = await st.runner.run(fn, *args, cancel, cancel=cancel)
            if self.metrics is not None:
                self.metrics.observe_inference(model_id, time.monotonic() - started)
            return result
        finally:
            st.inflight -= 1
            st.touch()

    # ---- run-time registry changes and operator lifecycle (the management API) -----------------
    def add_model(self, entry: RegistryEntry) -> ModelState:
        """Register a new model in the one registry and give it a state."""
        self.registry.add(entry)
        st = self._states[entry.id] = ModelState(entry)
        return st

    def replace_entry(self, entry: RegistryEntry) -> None:
        """New settings for a model; a loaded model keeps its weights until it is restarted."""
        self.registry.replace(entry)
        self._states[entry.id].entry = entry

    async def remove_model(self, model_id: str) -> None:
        """Unload (cancelling what is in flight) and forget a model."""
        st = self.state(model_id)
        await self.stop_model(st.entry.id, 0, force=True)  # waits for a load in progress, then unloads
        self.registry.remove(st.entry.id)
        self._states.pop(st.entry.id, None)

    def fits_budget(self, model_id: str) -> bool:
        """Whether the model alone fits the memory budget (others can be evicted to make room)."""
        st = self.state(model_id)
        return not self.memory_budget or _estimate_bytes(st.entry) <= self.memory_budget

    async def start_model(self, model_id: str, timeout: float) -> ModelState:
        """Operator start: lift the hold, pin, and load now (a failed load is retried at once)."""
        st = self.state(model_id)
        if not self.fits_budget(model_id):
            raise InsufficientResources(
                f"Model '{st.entry.id}' needs about {_estimate_bytes(st.entry) / 2**20:.0f} MB, more than the "
                f"memory budget of {self.memory_budget / 2**20:.0f} MB (manager.memory_budget_mb)")
        st.held, st.pinned = False, True
        if st.status == "failed":
            self._set_status(st, "unloaded")
        try:
            await asyncio.wait_for(asyncio.shield(self.ensure_loaded(model_id)), timeout)
        except TimeoutError:
            raise OperationTimeout(f"Model '{st.entry.id}' did not load within {timeout:g} s; the load goes on "
                                   "in the background") from None
        return st

    async def stop_model(self, model_id: str, timeout: float, force: bool = False) -> int:
        """Operator stop: new requests get 503 at once; in-flight ones may finish for ``timeout``
        seconds (none with ``force``), then whatever is left is cancelled and the model unloaded.
        Returns how many requests were still in flight when it unloaded."""
        st = self.state(model_id)
        st.held, st.pinned = True, False
        deadline = time.monotonic() + (0 if force else timeout)
        while st.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if st.load_task is not None and not st.load_task.done():  # a load in progress would finish after us
            await asyncio.wait([st.load_task])
        left = st.inflight + (st.engine.active_count + st.engine.waiting_count if st.engine else 0)
        await self.unload(st.entry.id)
        return left

    # ---- lifecycle -------------------------------------------------------------
    async def start(self, preload: list[str]) -> None:
        for model_id in preload:
            try:
                await self.ensure_loaded(model_id)
            except (ModelNotInstalled, ModelLoadFailed) as exc:
                log.warning("preload of %s skipped: %s", model_id, exc.message)
        if self.idle_unload_s:
            self._idle_task = asyncio.create_task(self._idle_loop())

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.idle_check_s)
            now = time.monotonic()
            for model_id, st in list(self._states.items()):
                if (st.status == "loaded" and not st.busy and not st.pinned
                        and now - st.last_used >= self.idle_unload_s):
                    log.info("unloading %s after %.0fs idle", model_id, now - st.last_used)
                    await self.unload(model_id)

    async def shutdown(self) -> None:
        if self._idle_task:
            self._idle_task.cancel()
        for model_id in self.loaded_ids():
            await self.unload(model_id)


def _retrieve(task: asyncio.Task) -> None:
    """A load whose callers all left still reports its failure (logged in _load), not as 'never retrieved'."""
    if not task.cancelled():
        task.exception()


def _estimate_bytes(entry: RegistryEntry) -> int:
    """Weights on disk are a fair estimate of the memory a model takes once loaded."""
    return entry.disk_bytes() or 0


def _release(handles: list) -> None:
    """Let queued work finish, unload, and drop the last references before collecting."""
    runner, engine, adapter = handles
    handles.clear()
    if engine is not None:
        engine.stop()
    if runner is not None:
        runner.shutdown()
    if adapter is not None:
        adapter.unload()
    del runner, engine, adapter
    gc.collect()
    try:  # hand freed heap pages back to the OS so RSS really drops
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
