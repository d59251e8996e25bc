"""The sampler: a lifespan-owned task that every ``gpu_monitor_interval`` seconds records the
machine's figures, each GPU's and each model's into the database, prunes what is older than
``monitoring.retention_days``, and publishes the sample on the event hub (alerts and /ws/monitor
read it there).

A model gets a row when it is running, had requests in the interval, or changed status since its
last row: an idle stopped model costs nothing per sample. A failure to read or write is logged and
the next sample still comes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from core.periodic import PeriodicTask
from management.events import SAMPLE, EventHub, GpuFigures, ModelFigures, Sample
from management.monitor.gpu import MB, GpuDevice, GpuReader
from management.monitor.host import HostReader
from management.monitor.recorder import RequestRecorder
from store import monitoring as repo
from store.db import Database

log = logging.getLogger("chatvlm.monitor")

PRUNE_EVERY_S = 300.0


class Sampler:
    def __init__(self, *, host: HostReader, gpus: GpuReader, recorder: RequestRecorder, hub: EventHub,
                 models: Callable[[], dict[str, tuple[str, int]]], interval_s: float, retention_days: float) -> None:
        """``models()`` -> {model id: (management status, queue depth)} for every registered model."""
        self.host = host
        self.gpus = gpus
        self.recorder = recorder
        self.hub = hub
        self.models = models
        self.retention_days = retention_days
        self.db: Database | None = None
        self.samples = 0
        self.last: Sample | None = None
        self._last_status: dict[str, str] = {}
        self._last_at = time.monotonic()
        self._last_prune = 0.0
        self._periodic = PeriodicTask(self.sample_once, interval_s, name="monitor-sampler", log=log)

    @property
    def interval_s(self) -> float:
        return self._periodic.interval_s

    def set_interval(self, seconds: float) -> None:
        """Applies at once: the wait in progress is cut to the new interval."""
        self._periodic.set_interval(seconds)

    def start(self, db: Database) -> None:
        self.db = db
        self._last_at = time.monotonic()
        self.recorder.take_interval()  # what came before the first interval belongs to none
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def sample_once(self) -> Sample:
        """Take, store and publish one sample now."""
        now_mono = time.monotonic()
        elapsed = max(now_mono - self._last_at, 1e-3)
        self._last_at = now_mono
        system = self.host.read()
        devices: list[GpuDevice] = await asyncio.to_thread(self.gpus.read) if getattr(
            self.gpus, "available", True) else []
        intervals = self.recorder.take_interval()
        ts = datetime.now(timezone.utc).replace(microsecond=0)
        epoch = int(ts.timestamp())
        figures: dict[str, ModelFigures] = {}
        model_rows = []
        for model_id, (status, queue) in self.models().items():
            fig = intervals.get(model_id)
            tps = round(fig.completion_tokens / elapsed, 3) if fig and fig.completion_tokens else (0.0 if fig else None)
            mf = ModelFigures(status=status, requests=fig.requests if fig else 0, errors=fig.errors if fig else 0,
                              avg_latency_s=fig.avg_latency if fig else None, tokens_per_second=tps,
                              queue_depth=queue)
            figures[model_id] = mf
            if status == "running" or fig is not None or queue or self._last_status.get(model_id) != status:
                model_rows.append(repo.ModelRow(ts=epoch, model=model_id, status=status, requests=mf.requests,
                                                errors=mf.errors, avg_latency=mf.avg_latency_s,
                                                tokens_per_second=mf.tokens_per_second, queue_depth=queue))
            self._last_status[model_id] = status
        gpus = tuple(GpuFigures(index=d.id, name=d.name, utilization=d.utilization,
                                memory_used_bytes=int(d.memory_used * MB), memory_total_bytes=int(d.memory_total * MB),
                                temperature=d.temperature, power_watts=d.power_usage) for d in devices)
        sample = Sample(ts=ts, system=system, gpus=gpus, models=figures)
        if self.db is not None:
            sys_row = repo.SystemRow(ts=epoch, cpu_percent=system.cpu_percent, memory_percent=system.memory_percent,
                                     disk_percent=system.disk_percent, memory_used=system.memory_used_bytes)
            gpu_rows = [repo.GpuRow(ts=epoch, gpu_index=g.index, utilization=g.utilization,
                                    memory_used=g.memory_used_bytes, memory_total=g.memory_total_bytes,
                                    temperature=g.temperature, power=g.power_watts) for g in gpus]
            await self.db.run(repo.add_samples, [sys_row], gpu_rows, model_rows)
            if now_mono - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = now_mono
                await self.prune()
        self.samples += 1
        self.last = sample
        self.hub.publish(SAMPLE, sample)
        return sample

    async def prune(self, now: float | None = None) -> int:
        before = (time.time() if now is None else now) - self.retention_days * 86400
        gone = await self.db.run(repo.prune, before)
        if gone:
            log.info("pruned %d monitoring rows older than %g days", gone, self.retention_days)
        return gone
