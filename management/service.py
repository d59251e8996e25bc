"""The management service container: opens the store, migrates it, and wires identity, catalog,
lifecycle and logs to the one registry and manager. Started and stopped by the app's lifespan."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from core.config import Settings
from management.alerts import Alerts
from management.catalog import ModelCatalog, ModelDraft
from management.events import EventHub
from management.identity import Identity
from management.lifecycle import Lifecycle
from management.logbook import ModelLogBook
from models.manager import ModelManager
from models.registry import RegistryEntry
from store.db import Database, sqlite_url

log = logging.getLogger("chatvlm.management")


@dataclass
class RequestStats:
    """Counters of one model's requests through this process (reset by a restart of the server)."""

    since: float
    requests: int = 0
    failed: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0


class Management:
    def __init__(self, settings: Settings, manager: ModelManager) -> None:
        cfg = settings.management
        self.settings = settings
        self.identity = Identity(cfg, settings.data_dir, settings.rate_limit.storage_url)
        self.logbook = ModelLogBook(cfg.log_lines)
        self.catalog = ModelCatalog(settings, manager)
        self.events = EventHub()  # lifecycle, sampler, alerts and config publish; /ws/monitor subscribes
        self.lifecycle = Lifecycle(manager, self.logbook, start_timeout_s=cfg.start_timeout_s,
                                   stop_timeout_s=cfg.stop_timeout_s, events=self.events)
        # Alert rules, their evaluator and channels; the built-in thresholds are read through the callable.
        self.alerts = Alerts(settings, self.events, self.model_statuses, thresholds=lambda: settings.alerts.thresholds)
        self.db: Database | None = None
        self.stats: dict[str, RequestStats] = {}
        self._refresh_task: asyncio.Task | None = None

    async def start(self) -> None:
        self.events.bind(asyncio.get_running_loop())
        self.db = Database(self.settings.database.url or sqlite_url(self.settings.data_dir))
        await asyncio.to_thread(self._open)
        self.logbook.start()
        await self.lifecycle.reconcile()
        self.alerts.start(self.db)
        if self.settings.management.registry_refresh_s:
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="registry-refresh")

    async def _refresh_loop(self) -> None:
        """Models and users created, changed or deleted through other replicas sharing the database show up here."""
        while True:
            await asyncio.sleep(self.settings.management.registry_refresh_s)
            try:
                await self.identity.refresh()  # a user deleted elsewhere loses its tokens here too
                for name in await self.catalog.refresh():
                    self.lifecycle.forget(name)
                    self.stats.pop(name, None)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup: retried at the next turn
                log.warning("refreshing the model registry from the database failed", exc_info=True)

    def _open(self) -> None:
        self.db.migrate()
        self.identity.start(self.db)
        for name in self.catalog.load(self.db):
            log.warning("model '%s' created through the API is shadowed by config.yaml's model of that name", name)
        self.logbook.load(self.db)
        self.alerts.load(self.db)
        if interrupted := self.lifecycle.load(self.db):
            log.warning("%d lifecycle task(s) were cut short by the last shutdown: marked failed", interrupted)

    async def stop(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.gather(self._refresh_task, return_exceptions=True)
            self._refresh_task = None
        await self.alerts.stop()
        await self.lifecycle.stop()
        await self.logbook.stop()
        if self.db is not None:
            self.db.dispose()

    def model_statuses(self) -> dict[str, str]:
        """Each registered model's management status (running, stopped, error, ...)."""
        return {e.id: self.lifecycle.status(e).status for e in self.catalog.entries()}

    # ---- operations that span the parts ----------------------------------------------------------
    async def create_model(self, draft: ModelDraft) -> RegistryEntry:
        entry = await self.catalog.create(draft)
        self.logbook.info(entry.id, f"created (framework {entry.meta.framework}, kind {entry.spec.kind})")
        return entry

    async def delete_model(self, ident: str) -> RegistryEntry:
        entry = await self.catalog.delete(ident)
        self.lifecycle.forget(entry.id)
        self.stats.pop(entry.id, None)
        await asyncio.to_thread(self.logbook.forget, entry.id)
        return entry

    def request_summary(self, model: str, route: str, status: int, tokens: int | None, seconds: float) -> None:
        """One log line per inference request: never its prompt or its reply."""
        tok = f", {tokens} tokens" if tokens is not None else ""
        level = "INFO" if status < 400 else ("WARNING" if status < 500 else "ERROR")
        self.logbook.write(model, level, f"{route} -> {status}{tok} in {seconds * 1000:.0f} ms")
        st = self.stats.setdefault(model, RequestStats(time.monotonic()))
        st.requests += 1
        st.failed += status >= 400
        st.seconds += seconds
        st.max_seconds = max(st.max_seconds, seconds)

    def performance(self, model: str) -> dict:
        """Seed 004's performance_stats of a model, over the requests this process served."""
        st = self.stats.get(model)
        if st is None or not st.requests:
            return {"total_requests": 0, "avg_response_time": None, "max_response_time": None,
                    "requests_per_second": 0.0, "error_rate": 0.0}
        elapsed = max(time.monotonic() - st.since, 1e-3)
        return {"total_requests": st.requests, "avg_response_time": round(st.seconds / st.requests, 4),
                "max_response_time": round(st.max_seconds, 4),
                "requests_per_second": round(st.requests / elapsed, 4), "error_rate": round(st.failed / st.requests, 4)}
