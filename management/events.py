"""The management event hub: in-process fan-out of what the operator watches.

Producers (the lifecycle, the sampler, the alert evaluator, the live configuration) publish
events; consumers (``/ws/monitor`` connections, the alert evaluator) subscribe. A subscriber has
a bounded queue: when it falls behind, its oldest events are dropped and counted, so a slow
consumer never slows a producer. ``publish`` never blocks and may be called from any thread.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Event kinds. The payload of each is documented beside it.
MODEL_STATUS = "model_status"  # {"model_id", "model_name", "status", "previous_status", "health", "reason"}
SAMPLE = "sample"              # a Sample (below)
ALERT = "alert"                # {"alert_id", "rule", "severity", "state": "firing"|"resolved", "message", ...}
CONFIG = "config"              # {"changed": {key: new_value, ...}}
KINDS = frozenset({MODEL_STATUS, SAMPLE, ALERT, CONFIG})


@dataclass(frozen=True)
class SystemFigures:
    cpu_percent: float
    memory_percent: float
    disk_percent: float            # the disk that holds the data directory
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0


@dataclass(frozen=True)
class GpuFigures:
    index: int
    name: str
    utilization: float             # percent
    memory_used_bytes: int
    memory_total_bytes: int
    temperature: float | None      # Celsius
    power_watts: float | None = None

    @property
    def memory_percent(self) -> float:
        return 100.0 * self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes else 0.0


@dataclass(frozen=True)
class ModelFigures:
    """One model over the last sampling interval (counts are for that interval, not cumulative)."""

    status: str                    # the management status: running | stopped | error | ...
    requests: int = 0
    errors: int = 0
    avg_latency_s: float | None = None
    tokens_per_second: float | None = None
    queue_depth: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Sample:
    ts: datetime                   # aware UTC
    system: SystemFigures
    gpus: tuple[GpuFigures, ...] = ()
    models: dict[str, ModelFigures] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    kind: str
    data: Any


class Subscription:
    """One consumer's bounded queue. Iterate with ``await sub.get()``; close with ``sub.close()``."""

    def __init__(self, hub: EventHub, kinds: frozenset[str], maxsize: int) -> None:
        self._hub = hub
        self.kinds = kinds
        self._queue: deque[Event] = deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self.dropped = 0               # events lost to a full queue since the last take_dropped()
        self.closed = False

    def _offer(self, event: Event) -> None:  # on the hub's loop
        if self.closed or event.kind not in self.kinds:
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1          # deque(maxlen) drops the oldest on append
        self._queue.append(event)
        self._ready.set()

    async def get(self) -> Event:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n

    def set_kinds(self, kinds: Iterable[str]) -> None:
        self.kinds = frozenset(kinds) & KINDS

    def close(self) -> None:
        self.closed = True
        self._hub._subs.discard(self)


class EventHub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called once by the lifespan: events published from other threads are delivered on this loop."""
        self._loop = loop

    def subscribe(self, kinds: Iterable[str] = KINDS, maxsize: int = 256) -> Subscription:
        sub = Subscription(self, frozenset(kinds) & KINDS, maxsize)
        self._subs.add(sub)
        return sub

    def publish(self, kind: str, data: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = Event(kind, data)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _on_loop(loop):
            self._deliver(event)
        else:
            loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: Event) -> None:
        for sub in list(self._subs):
            sub._offer(event)

    @property
    def subscribers(self) -> int:
        return len(self._subs)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # a worker thread: no loop runs here
        return False
