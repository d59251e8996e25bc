"""Runs a loaded model's blocking calls on its own worker threads, never on the event loop.

Each model gets a small thread pool (its ``concurrency``) and a bounded queue in front
of it. Past the bound the caller gets ``Overloaded`` at once instead of waiting. The queue
is also bounded in time: the runner keeps a moving average of how long a job takes, and a
request that must queue and would not finish before its deadline is refused at once (503 with a
Retry-After of the expected wait) rather than queued to end in a 504.

A model whose calls keep CPU threads busy outside any engine (the OCR engines: ONNX Runtime in
RapidOCR's workers and the layout model, Tesseract) names how many (``cpu_threads``): each job
holds them in the CPU share while it runs (core/cores.py), so an engine decoding at the same
time runs on its part instead of every thread beside it.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable, TypeVar

from core.cores import SHARE
from core.errors import Cancelled, Overloaded
from core.omp import release_threads
from core.types import CancelToken

T = TypeVar("T")


class ModelRunner:
    def __init__(self, name: str, concurrency: int = 1, max_queue: int = 64, cpu_threads: int | None = None) -> None:
        self.name = name
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.cpu_threads = cpu_threads  # CPU threads one job keeps busy (None: it takes no part in the share)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"model-{name}")
        self._lock = threading.Lock()
        self._pending = 0  # queued + running, counted until the thread really finishes
        self._job_s = 0.0  # moving average of one job's run time (0 until a job has run)

    @property
    def pending(self) -> int:
        return self._pending

    def expected_wait_s(self) -> float:
        """Seconds a job submitted now would wait before a worker starts it."""
        ahead = self._pending - self.concurrency + 1  # jobs that must finish first, its own slot included
        return 0.0 if ahead <= 0 else math.ceil(ahead / self.concurrency) * self._job_s

    def admit(self, deadline: float | None = None) -> None:
        """Raise ``Overloaded`` when the queue is full, or when a job submitted now would have to
        queue and could not finish before ``deadline`` (a ``time.monotonic()`` value)."""
        if self._pending >= self.concurrency + self.max_queue:
            raise Overloaded(f"model '{self.name}' is at capacity; retry shortly", headers={"Retry-After": "1"})
        if deadline is not None:
            wait = self.expected_wait_s()
            if wait > 0 and time.monotonic() + wait + self._job_s >= deadline:
                raise Overloaded(f"model '{self.name}' is busy: the request would not start before its deadline",
                                 headers={"Retry-After": str(max(1, math.ceil(wait)))})

    async def run(self, fn: Callable[..., T], *args: Any, cancel: CancelToken) -> T:
        """Run ``fn(*args)`` on a worker thread; if the awaiting task is cancelled, signal ``cancel``."""
        with self._lock:
            self.admit(cancel.deadline)
            self._pending += 1

        def job() -> T:
            if cancel.cancelled:  # the client left while the job waited in the queue
                raise Cancelled("request cancelled before it started")
            started = time.monotonic()
            try:
                with SHARE.holding(self.cpu_threads) if self.cpu_threads else nullcontext():
                    return fn(*args)
            finally:
                took = time.monotonic() - started
                self._job_s = took if self._job_s == 0 else 0.8 * self._job_s + 0.2 * took
                if self._pending <= 1:  # nothing queued behind it: let its OpenMP pool go (core/omp.py)
                    release_threads()

        future = self._executor.submit(job)
        future.add_done_callback(self._done)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.cancel()
            raise

    def _done(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        """Let queued and running jobs finish, then stop the threads (call off the event loop)."""
        self._executor.shutdown(wait=True)
