"""A stand-in sample source, until the monitoring sampler (issue 11's data half) is merged.

Every ``monitoring.gpu_monitor_interval`` seconds it publishes a ``Sample`` of the machine
(psutil: CPU, memory, the data directory's disk) and of each model's management status, so that
the alert evaluator and ``/ws/monitor`` have samples to work on. It stays quiet whenever another
producer published a SAMPLE since its last tick: once the real sampler runs, it publishes
nothing. DELETE this module (and its two lines in management/alerts/__init__.py) when the
sampler is merged.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import psutil

from management.events import SAMPLE, EventHub, ModelFigures, Sample, SystemFigures

log = logging.getLogger("chatvlm.alerts")


class Heartbeat:
    def __init__(self, hub: EventHub, interval_s: float, data_dir: Path,
                 model_statuses: Callable[[], dict[str, str]]) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self.data_dir = data_dir
        self.model_statuses = model_statuses
        self._task: asyncio.Task | None = None
        self.published = 0
        self._mine: Sample | None = None
        self._others = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alerts-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def sample(self) -> Sample:
        vm = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self.data_dir if self.data_dir.exists() else Path.cwd()))
        system = SystemFigures(cpu_percent=psutil.cpu_percent(interval=None), memory_percent=vm.percent,
                               disk_percent=disk.percent, memory_used_bytes=vm.total - vm.available,
                               memory_total_bytes=vm.total)
        models = {name: ModelFigures(status=status) for name, status in self.model_statuses().items()}
        return Sample(ts=datetime.now(timezone.utc), system=system, models=models)

    async def _run(self) -> None:
        samples = self.hub.subscribe([SAMPLE], maxsize=64)
        watcher = asyncio.create_task(self._watch(samples), name="alerts-heartbeat-watch")
        psutil.cpu_percent(interval=None)  # the first reading only starts the measurement
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                if self._others:
                    self._others = False
                    continue  # a real sampler runs: stay quiet
                try:
                    self._mine = self.sample()
                except Exception:  # noqa: BLE001 - a psutil hiccup skips one tick
                    log.exception("heartbeat sample failed")
                    continue
                self.hub.publish(SAMPLE, self._mine)
                self.published += 1
        finally:
            watcher.cancel()
            samples.close()

    async def _watch(self, samples) -> None:
        """Notes any SAMPLE that is not this heartbeat's own."""
        while True:
            if (await samples.get()).data is not self._mine:
                self._others = True
