"""The management service container: opens the store, migrates it, and wires identity, catalog,
lifecycle and logs to the one registry and manager. Started and stopped by the app's lifespan."""
from __future__ import annotations

import asyncio
import logging
import time

from core.config import Settings
from management.alerts import Alerts
from management.catalog import ModelCatalog, ModelDraft
from management.events import EventHub
from management.identity import Identity
from management.lifecycle import Lifecycle
from management.logbook import ModelLogBook
from management.monitor import history
from management.monitor.gpu import GpuReader, NvmlReader
from management.monitor.health import HealthProber
from management.monitor.host import HostReader
from management.monitor.live_config import LiveConfig
from management.monitor.recorder import RequestRecorder
from management.monitor.sampler import Sampler
from models.manager import ModelManager
from models.registry import RegistryEntry
from store.db import Database, sqlite_url

log = logging.getLogger("chatvlm.management")


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
        self.alerts = Alerts(settings, self.events, thresholds=lambda: self.live.alert_thresholds())
        self.db: Database | None = None
        self._refresh_task: asyncio.Task | None = None
        # Monitoring (issue 11, data half): request records, the sampler, live configuration, health probe.
        self.manager = manager
        self.started_at = time.time()
        self.host = HostReader(settings.data_dir)
        self.gpus: GpuReader = NvmlReader()
        self.recorder = RequestRecorder()
        self.live = LiveConfig(settings, self.events)
        self.sampler = Sampler(host=self.host, gpus=self.gpus, recorder=self.recorder, hub=self.events,
                               models=self._model_figures, interval_s=self.live.get("gpu_monitor_interval"),
                               retention_days=settings.monitoring.retention_days)
        self.health = HealthProber(manager, self.events, interval_s=self.live.get("health_check_interval"),
                                   on_change=self._health_changed)
        self.lifecycle.probed_health = self._probed_health
        self.live.on_change("gpu_monitor_interval", self.sampler.set_interval, now=False)
        self.live.on_change("health_check_interval", self.health.set_interval, now=False)
        self.live.on_change("max_concurrent_models", self._set_max_loaded)
        self.live.on_change("default_model_timeout", self._set_start_timeout)
        self.live.on_change("log_level", _set_log_level, now=False)

    async def start(self) -> None:
        self.events.bind(asyncio.get_running_loop())
        self.db = Database(self.settings.database.url or sqlite_url(self.settings.data_dir))
        await asyncio.to_thread(self._open)
        self.logbook.start()
        self.recorder.start(self.db)
        self.sampler.start(self.db)
        self.health.start()
        await self.lifecycle.reconcile()
        self.alerts.start(self.db)
        if self.settings.management.registry_refresh_s:
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="registry-refresh")

    async def _refresh_loop(self) -> None:
        """Models and users created, changed or deleted through other replicas sharing the database show up
        here, and the models they started or stopped are started or stopped here too."""
        while True:
            await asyncio.sleep(self.settings.management.registry_refresh_s)
            try:
                await self.identity.refresh()  # a user deleted elsewhere loses its tokens here too
                for name in await self.catalog.refresh():
                    self.lifecycle.forget(name)
                await self.lifecycle.follow()  # starts and stops accepted by other replicas
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
        self.live.load(self.db)   # stored changes win over config.yaml, applied before anything runs
        self.gpus.read()          # the first read finds the driver (or its absence) now, not in a request

    async def stop(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.gather(self._refresh_task, return_exceptions=True)
            self._refresh_task = None
        await self.alerts.stop()
        await self.sampler.stop()
        await self.health.stop()
        await self.lifecycle.stop()
        await self.logbook.stop()
        await self.recorder.stop()  # the last records are written before the store closes
        if self.db is not None:
            self.db.dispose()

    # ---- operations that span the parts ----------------------------------------------------------
    async def create_model(self, draft: ModelDraft) -> RegistryEntry:
        entry = await self.catalog.create(draft)
        self.logbook.info(entry.id, f"created (framework {entry.meta.framework}, kind {entry.spec.kind})")
        return entry

    async def delete_model(self, ident: str) -> RegistryEntry:
        entry = await self.catalog.delete(ident)
        self.lifecycle.forget(entry.id)
        await asyncio.to_thread(self.logbook.forget, entry.id)
        return entry

    def request_summary(self, model: str, route: str, status: int, tokens: int | None, seconds: float) -> None:
        """One log line per inference request: never its prompt or its reply."""
        tok = f", {tokens} tokens" if tokens is not None else ""
        level = "INFO" if status < 400 else ("WARNING" if status < 500 else "ERROR")
        self.logbook.write(model, level, f"{route} -> {status}{tok} in {seconds * 1000:.0f} ms")

    async def performance(self, model: str) -> dict:
        """Seed 004's performance_stats of a model over the last 24 h, from the request records (every
        surface's requests; kept across restarts)."""
        await self.recorder.flush()
        return await asyncio.to_thread(history.model_performance, self.db, model)

    # ---- monitoring -----------------------------------------------------------------------------
    def _model_figures(self) -> dict[str, tuple[str, int]]:
        """Every registered model: (management status, requests waiting)."""
        out = {}
        for entry in self.catalog.entries():
            st = self.manager.state(entry.id)
            engine, runner = st.engine, st.runner
            queue = (engine.waiting_count if engine is not None else 0) + (
                max(0, runner.pending - runner.concurrency) if runner is not None else 0)
            out[entry.id] = (self.lifecycle.status(entry).status, queue)
        return out

    def _probed_health(self, name: str) -> tuple[str, str | None] | None:
        found = self.health.health.get(name)
        return (found[0], found[1]) if found is not None else None

    def _health_changed(self, name: str, health: str, reason: str | None) -> None:
        if health == "unhealthy":
            self.logbook.warning(name, f"health probe: unhealthy ({reason})")
        else:
            self.logbook.info(name, f"health probe: {health}")

    def _set_max_loaded(self, n: int) -> None:
        self.manager.max_loaded = int(n)

    def _set_start_timeout(self, seconds: float) -> None:
        self.lifecycle.start_timeout_s = float(seconds)


def _set_log_level(level: str) -> None:
    """The server's log level, at once (the root logger, which every chatvlm logger inherits from)."""
    logging.getLogger().setLevel(level)
    logging.getLogger("chatvlm").setLevel(level)
