"""The per-request records' writer: every surface's requests (and every job run) end here as one
record (route template, method, model, status, duration, tokens).

``record`` never touches the database: it appends to a bounded buffer and returns. A background task
owned by the app's lifespan writes the buffer in batches on a worker thread. When the database falls
behind and the buffer is full, the oldest records are dropped and counted (a request never waits on
the store). ``record`` also adds up each model's figures for the sampler's current interval.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from core.request_context import RequestContext
from store import monitoring as repo
from store.db import Database

log = logging.getLogger("chatvlm.monitor")

FLUSH_S = 1.0
BATCH = 2000


@dataclass
class IntervalFigures:
    """One model's requests since the sampler last took them."""

    requests: int = 0
    errors: int = 0
    timed: int = 0
    seconds: float = 0.0
    completion_tokens: int = 0

    @property
    def avg_latency(self) -> float | None:
        return self.seconds / self.timed if self.timed else None


class RequestRecorder:
    def __init__(self, max_pending: int = 20_000, flush_s: float = FLUSH_S) -> None:
        self.flush_s = flush_s
        self._pending: deque[repo.RequestRow] = deque(maxlen=max_pending)
        self._interval: dict[str, IntervalFigures] = {}
        self._lock = threading.Lock()   # jobs and requests record from the loop; tests from threads
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.db: Database | None = None
        self.dropped = 0
        self.written = 0

    # ---- recording (cheap, never blocks) ----------------------------------------------------------
    def record(self, ctx: RequestContext, status: int) -> None:
        """One finished request: ``status`` is the HTTP status (or the failure a stream ended with)."""
        duration = max(0.0, time.monotonic() - ctx.started)
        row = repo.RequestRow(ts=time.time(), route=ctx.route[:200], method=ctx.method[:8], model=ctx.model,
                              status=int(status), duration=round(duration, 6), prompt_tokens=ctx.prompt_tokens,
                              completion_tokens=ctx.completion_tokens)
        with self._lock:
            if len(self._pending) == self._pending.maxlen:
                self.dropped += 1
            self._pending.append(row)
            if ctx.model is not None:
                fig = self._interval.setdefault(ctx.model, IntervalFigures())
                fig.requests += 1
                fig.errors += status >= 400
                if status < 400:
                    fig.timed += 1
                    fig.seconds += duration
                fig.completion_tokens += ctx.completion_tokens or 0
        if len(self._pending) >= BATCH:
            self._wake.set()

    def take_interval(self) -> dict[str, IntervalFigures]:
        """Each model's figures since the last call (the sampler's interval), reset."""
        with self._lock:
            figures, self._interval = self._interval, {}
        return figures

    # ---- the writer task ---------------------------------------------------------------------------
    def start(self, db: Database) -> None:
        self.db = db
        self._task = asyncio.create_task(self._writer(), name="request-record-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()

    async def flush(self) -> int:
        """Write what is buffered now (off the event loop); returns how many records were written."""
        with self._lock:
            rows = list(self._pending)
            self._pending.clear()
        if not rows or self.db is None:
            return 0
        try:
            for i in range(0, len(rows), BATCH):
                await self.db.run(repo.add_requests, rows[i:i + BATCH])
        except Exception:  # noqa: BLE001 - a store failure loses these records, never the requests
            log.exception("writing %d request records failed", len(rows))
            self.dropped += len(rows)
            return 0
        self.written += len(rows)
        return len(rows)

    async def _writer(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()
