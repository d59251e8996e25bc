"""The model runner's admission: a full queue, and a queue too long for the request's deadline,
answer Overloaded at once (with a Retry-After of the expected wait)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from core.errors import Overloaded
from core.types import CancelToken
from models.runner import ModelRunner


def test_refuses_what_cannot_finish_before_its_deadline():
    runner = ModelRunner("m", concurrency=1, max_queue=10)
    release = threading.Event()

    def work(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def blocked() -> str:
        release.wait(5)
        return "done"

    async def scenario():
        assert runner.expected_wait_s() == 0.0
        assert await runner.run(work, 0.3, cancel=CancelToken()) == 0.3  # learns ~0.3 s per job
        busy = asyncio.create_task(runner.run(blocked, cancel=CancelToken()))
        await asyncio.sleep(0.05)
        assert runner.pending == 1 and runner.expected_wait_s() == pytest.approx(0.3, abs=0.1)
        # It would wait ~0.3 s, then run ~0.3 s: a deadline 0.4 s away cannot be met.
        with pytest.raises(Overloaded) as refused:
            await runner.run(work, 0.0, cancel=CancelToken(deadline=time.monotonic() + 0.4))
        assert refused.value.headers["Retry-After"] == "1"
        assert runner.pending == 1  # refused before it was queued
        # A deadline far enough away is queued, and served once the worker frees up.
        queued = asyncio.create_task(runner.run(work, 0.0, cancel=CancelToken(deadline=time.monotonic() + 5)))
        await asyncio.sleep(0.05)
        assert runner.pending == 2
        release.set()
        assert await busy == "done" and await queued == 0.0
        # No deadline: only the queue bound applies.
        assert await runner.run(work, 0.0, cancel=CancelToken()) == 0.0

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        runner.shutdown()


def test_full_queue_refused():
    runner = ModelRunner("m", concurrency=1, max_queue=0)
    release = threading.Event()

    async def scenario():
        busy = asyncio.create_task(runner.run(lambda: release.wait(5), cancel=CancelToken()))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            runner.admit()
        release.set()
        await busy

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        runner.shutdown()
