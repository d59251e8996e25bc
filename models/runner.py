"""Runs a loaded model's blocking calls on its own worker threads, never on the event loop.

Each model gets a small thread pool (its ``concurrency``) and a bounded queue in front
of it. Past the bound the caller gets ``Overloaded`` at once instead of waiting.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from core.errors import Cancelled, Overloaded
from core.types import CancelToken

T = TypeVar("T")


class ModelRunner:
    def __init__(self, name: str, concurrency: int = 1, max_queue: int = 64) -> None:
        self.name = name
        self.concurrency = concurrency
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"model-{name}")
        self._lock = threading.Lock()
        self._pending = 0  # queued + running, counted until the thread really finishes

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[..., T], *args: Any, cancel: CancelToken) -> T:
        """Run ``fn(*args)`` on a worker thread; if the awaiting task is cancelled, signal ``cancel``."""
        with self._lock:
            if self._pending >= self.concurrency + self.max_queue:
                raise Overloaded(f"model '{self.name}' is at capacity; retry shortly",
                                 headers={"Retry-After": "1"})
            self._pending += 1

        def job() -> T:
            if cancel.cancelled:  # the client left while the job waited in the queue
                raise Cancelled("request cancelled before it started")
            return fn(*args)

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
