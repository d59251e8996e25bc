"""The lifecycle of models: start, stop and restart as tasks, and the desired state.

The desired state (what the operator asked to run, persisted) is kept apart from the observed
state (the manager's: loaded, loading, failed). At start-up the two are reconciled: models that
were running are started again, stopped ones are held. Replicas on one database follow each
other: a start or stop accepted by one is stored, and the others read it at their next registry
refresh (``follow``) and start or stop their own copy. A failure shows as ``error`` with its
reason, never as a crash. Tasks run on the event loop, owned by the app's lifespan.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from core.errors import ChatVLMError, InsufficientResources, NotFound
from core.system import gpu_info
from management.events import MODEL_STATUS, EventHub
from management.logbook import ModelLogBook
from models.manager import ModelManager
from models.registry import RegistryEntry
from store import models as models_repo
from store import tasks as tasks_repo
from store.db import Database
from store.records import TaskRecord

log = logging.getLogger("chatvlm.management")

ACTIONS = ("start", "stop", "restart")


@dataclass(frozen=True)
class ObservedStatus:
    status: str        # created | starting | running | stopping | stopped | error
    health: str        # healthy | unhealthy | unknown
    reason: str | None


class Lifecycle:
    def __init__(self, manager: ModelManager, logbook: ModelLogBook, *, start_timeout_s: float,
                 stop_timeout_s: float, events: EventHub | None = None) -> None:
        self.manager = manager
        self.logbook = logbook
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.db: Database | None = None
        self.desired: dict[str, str] = {}
        self._errors: dict[str, str] = {}        # why the last start failed, until the next start or stop
        self._transition: dict[str, str] = {}    # name -> "starting" | "stopping" while a task runs
        self._pending: dict[str, int] = {}       # tasks queued or running per model
        self._locks: dict[str, asyncio.Lock] = {}
        self._accepting: dict[str, int] = {}     # our own desired-state writes in flight (follow skips them)
        self._tasks: set[asyncio.Task] = set()
        self.events = events                      # MODEL_STATUS is published on every status change
        self._announced: dict[str, str] = {}
        # The health probe's verdict on a running model: name -> (health, reason), or None (not probed yet).
        self.probed_health = lambda name: None
        # Loads and unloads the manager does on its own (a request's lazy load, idle or memory
        # unloads, a failed load) are announced too, not only the ones this lifecycle runs.
        manager.status_listeners.append(self._announce)

    # ---- start-up and shutdown -----------------------------------------------------------------
    def load(self, db: Database) -> int:
        """Read the desired states and fail the tasks a previous process left unfinished (blocking)."""
        self.db = db
        with db.session() as s:
            interrupted = tasks_repo.fail_unfinished(s, "the server stopped before the task finished")
            self.desired = models_repo.desired_states(s)
        return interrupted

    async def reconcile(self) -> list[str]:
        """Hold the models the operator stopped; start again the ones that were running."""
        started = []
        for name, desired in self.desired.items():
            if name not in self.manager.registry:
                continue
            state = self.manager.state(name)
            if desired == "stopped":
                state.held = True
            elif desired == "running":
                self.logbook.info(name, "was running when the server stopped: starting it again")
                await self.submit(name, "start")
                started.append(name)
        return started

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- status --------------------------------------------------------------------------------
    def status(self, entry: RegistryEntry) -> ObservedStatus:
        name = entry.id
        st = self.manager.state(name)
        transition = self._transition.get(name)
        if transition:
            return ObservedStatus(transition, "unknown", None)
        if st.status == "loaded":
            available = getattr(getattr(st.engine, "pool", None), "available", None)  # a remote engine's URLs
            if available is not None and not available():
                return ObservedStatus("running", "unhealthy", "no URL of the remote engine is healthy")
            health, reason = self.probed_health(name) or ("healthy", None)
            return ObservedStatus("running", health, reason)
        if st.status == "loading":
            return ObservedStatus("starting", "unknown", None)
        if st.status == "failed":
            return ObservedStatus("error", "unhealthy", st.error)
        if name in self._errors:
            return ObservedStatus("error", "unhealthy", self._errors[name])
        desired = self.desired.get(name)
        if desired is None and entry.meta is not None and entry.meta.source == "api":
            return ObservedStatus("created", "unknown", None)
        return ObservedStatus("stopped", "unknown", None)

    # ---- tasks ---------------------------------------------------------------------------------
    async def submit(self, name: str, action: str, *, force: bool = False, timeout: float | None = None) -> str:
        """Queue a start, stop or restart of a model; returns the task id at once."""
        task_id = f"task-{uuid.uuid4().hex[:16]}"
        # The desired state is committed with the task, before the 202: a kill right after it still
        # restarts (or keeps stopped) the model as the last accepted request asked.
        desired = "stopped" if action == "stop" else "running"
        self._accepting[name] = self._accepting.get(name, 0) + 1
        try:
            await self.db.run(_accept, task_id, name, action, desired)
            self.desired[name] = desired
        finally:
            self._accepting[name] -= 1
            if not self._accepting[name]:
                del self._accepting[name]
        self._queue(task_id, name, action, force, timeout)
        return task_id

    async def follow(self) -> list[str]:
        """Start or stop here what another replica sharing the database was asked to start or stop
        (its desired state, stored with its task). Returns the models acted on. Called by the
        registry refresh; an action of ours still being written or run is never undone here."""
        stored = await self.db.run(models_repo.desired_states)
        acted = []
        for name, desired in stored.items():
            if (self.desired.get(name) == desired or name not in self.manager.registry
                    or name in self._accepting or name in self._pending):
                continue
            self.desired[name] = desired
            action = "stop" if desired == "stopped" else "start"
            self.logbook.info(name, f"{'stopped' if action == 'stop' else 'started'} through another replica: "
                                    f"{'stopping' if action == 'stop' else 'starting'} here too")
            self._queue(None, name, action, False, None)
            acted.append(name)
        return acted

    def _queue(self, task_id: str | None, name: str, action: str, force: bool, timeout: float | None) -> None:
        self._pending[name] = self._pending.get(name, 0) + 1
        self._transition[name] = "stopping" if action in ("stop", "restart") else "starting"
        self._announce(name)
        task = asyncio.create_task(self._run(task_id, name, action, force, timeout), name=f"{action}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # e.g. the store failed to record the outcome
            log.error("lifecycle task %s failed", task.get_name(), exc_info=task.exception())

    async def task(self, task_id: str) -> TaskRecord:
        rec = await self.db.run(tasks_repo.get, task_id)
        if rec is None:
            raise NotFound(f"task '{task_id[:64]}' not found", param="task_id", code="TASK_NOT_FOUND")
        return rec

    async def _run(self, task_id: str | None, name: str, action: str, force: bool, timeout: float | None) -> None:
        """One action under the model's lock; ``task_id`` None: following another replica (no task record)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        mark = self._mark if task_id is not None else _no_mark
        try:
            async with lock:
                await mark(task_id, "running")
                try:
                    if action in ("stop", "restart"):
                        self._transition[name] = "stopping"
                        self._announce(name)
                        await self._stop(name, timeout or self.stop_timeout_s, force)
                    if action in ("start", "restart"):
                        self._transition[name] = "starting"
                        self._announce(name)
                        await self._start(name, timeout or self.start_timeout_s)
                except ChatVLMError as exc:
                    self._errors[name] = exc.message
                    self.logbook.error(name, f"{action} failed ({exc.code}): {exc.message}")
                    await mark(task_id, "failed", error=exc.message, error_code=exc.code)
                    return
                except Exception:  # noqa: BLE001 - a bug fails this task only, logged with its traceback
                    log.exception("%s of %s failed", action, name)
                    self._errors[name] = "internal error (see the server log)"
                    self.logbook.error(name, f"{action} failed: internal error")
                    await mark(task_id, "failed", error="internal error", error_code="INTERNAL_ERROR")
                    return
                await mark(task_id, "succeeded")
        finally:
            self._pending[name] -= 1
            if not self._pending[name]:
                self._pending.pop(name, None)
                self._transition.pop(name, None)
            self._announce(name)

    async def _mark(self, task_id: str, status: str, **fields) -> None:
        await self.db.run(tasks_repo.mark, task_id, status, **fields)

    async def _start(self, name: str, timeout: float) -> None:
        entry = self.manager.state(name).entry
        self._errors.pop(name, None)
        need = (entry.meta.resource_requirements.get("gpu_count") or 0) if entry.meta else 0
        if isinstance(need, (int, float)) and need > 0:
            available, _ = gpu_info()
            if not available:
                raise InsufficientResources(f"Model '{name}' asks for {need:g} GPU(s) and this machine has none")
        self.logbook.info(name, "starting")
        started = time.monotonic()
        st = await self.manager.start_model(name, timeout)
        self.logbook.info(name, f"running: loaded in {time.monotonic() - started:.2f} s, "
                                f"{st.memory_bytes / 2**20:.1f} MB")

    async def _stop(self, name: str, timeout: float, force: bool) -> None:
        self._errors.pop(name, None)
        self.logbook.info(name, "stopping" + (" (force: in-flight requests are cancelled)" if force else ""))
        left = await self.manager.stop_model(name, timeout, force)
        if left:
            self.logbook.warning(name, f"{left} request(s) still in flight were cancelled")
        self.logbook.info(name, "stopped")

    def forget(self, name: str) -> None:
        self.desired.pop(name, None)
        self._errors.pop(name, None)
        self._announced.pop(name, None)

    def _announce(self, name: str) -> None:
        """Publish the model's status (MODEL_STATUS) when it differs from the last one published."""
        if self.events is None or name not in self.manager.registry:
            return
        entry = self.manager.state(name).entry
        st = self.status(entry)
        previous = self._announced.get(name)
        if previous == st.status:
            return
        self._announced[name] = st.status
        self.events.publish(MODEL_STATUS, {"model_id": entry.meta.id if entry.meta else entry.id, "model_name": name,
                                           "status": st.status, "previous_status": previous, "health": st.health,
                                           "reason": st.reason})


async def _no_mark(task_id: None, status: str, **fields) -> None:
    """Following another replica: its task is the record; this replica's action only logs."""


def _accept(s, task_id: str, name: str, action: str, desired: str) -> None:
    """One transaction: the task and the desired state it implies."""
    tasks_repo.add(s, task_id, name, action)
    models_repo.set_desired(s, name, desired)
