"""A lifespan-owned task that runs an async callable every ``interval_s`` seconds.

The interval can change while it runs (``set_interval``): the wait in progress is cut and the
next run is re-planned from the start of the last one, so a shorter interval applies at once
and a longer one does not skip ahead. Runs keep a fixed rate (no drift from the run's own
duration); a run that overran its slot is followed by the next one after a short pause, never
by a burst. One failed run is logged and never stops the task.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable


class PeriodicTask:
    def __init__(self, run: Callable[[], Awaitable[object]], interval_s: float, *, name: str,
                 log: logging.Logger) -> None:
        self.run = run
        self.interval_s = float(interval_s)
        self.name = name
        self.log = log
        self.last_run = time.monotonic()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def set_interval(self, seconds: float) -> None:
        """Applies at once: the wait in progress is cut to the new interval."""
        self.interval_s = float(seconds)
        self._wake.set()

    def start(self) -> None:
        self.last_run = time.monotonic()
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        next_at = self.last_run + self.interval_s
        while True:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_at - time.monotonic()))
                next_at = self.last_run + self.interval_s  # the interval changed: re-plan
                if next_at > time.monotonic():
                    continue
            except asyncio.TimeoutError:
                pass
            self.last_run = time.monotonic()
            try:
                await self.run()
            except Exception:  # noqa: BLE001 - one failed run never stops the task
                self.log.exception("%s failed", self.name)
            next_at = max(next_at + self.interval_s, time.monotonic() + 0.05)
