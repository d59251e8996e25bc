"""A thread lets its OpenMP pool go (core/omp.py): after a parallel region on a thread its
worker threads exist, after release_threads() on that thread they exit, and another thread's
pool is untouched. A model runner's last job releases its pool too (so do a model load, an idle
engine or vision worker: the call sites), so no pool is left behind to throttle the engine's."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from core import omp

pytestmark = pytest.mark.skipif(not omp._pauses(), reason="torch's OpenMP runtime (libgomp) is not in use here")


def threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def some_exit(new: set[str], seconds: float = 5.0) -> bool:
    """Whether some of the ``new`` threads exit within ``seconds`` (a released pool's workers
    leave just after the release returns)."""
    deadline = time.monotonic() + seconds
    while len(new & threads()) == len(new):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def parallel_work() -> None:
    torch.set_num_threads(2)
    a = torch.randn(700, 700)
    for _ in range(3):
        (a @ a).sum()
        torch.nn.functional.silu(a.repeat(40, 1))  # element-wise: ATen's own parallel_for


class PoolThread:
    """A thread that runs parallel_work and records the threads that exist meanwhile; on
    ``release()`` it frees its pool and stays alive until ``finish()``."""

    def __init__(self) -> None:
        self.base = threads()
        self.new: set[str] = set()
        self.ready, self.go, self.released, self.end = (threading.Event() for _ in range(4))
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.ready.wait(60)

    def _run(self) -> None:
        parallel_work()
        self.new = threads() - self.base  # this thread and its pool's workers (and lazy ones of torch's)
        self.ready.set()
        if self.go.wait(60):
            omp.release_threads()
            self.released.set()
        self.end.wait(60)

    def release(self) -> None:
        self.go.set()
        assert self.released.wait(60)

    def finish(self) -> None:
        self.go.set()
        self.end.set()
        self.thread.join(60)


def test_a_threads_pool_is_released_and_only_its_own():
    keeper = PoolThread()  # a second thread with a pool of its own, alive meanwhile
    releaser = PoolThread()
    try:
        assert len(releaser.new) >= 2, "a parallel region started no worker thread"
        releaser.release()
        assert some_exit(releaser.new)  # its pool's workers exit; the thread itself is still there
        assert str(releaser.thread.native_id) in threads()
        assert keeper.new <= threads()  # the other thread's pool stays
    finally:
        releaser.end.set()  # (keeps its pool: the keeper never releases)
        keeper.end.set()
        releaser.finish()
        keeper.finish()


def test_released_runs_the_function_and_lets_the_pool_go():
    base, during = threads(), set()
    returned, done = threading.Event(), threading.Event()
    results = []

    def fn(x: int) -> int:
        parallel_work()
        during.update(threads() - base)  # this thread and its pool's workers
        return x * 2

    def body() -> None:
        results.append(omp.released(fn)(21))
        returned.set()
        done.wait(60)

    t = threading.Thread(target=body)
    t.start()
    try:
        assert returned.wait(60) and results == [42]
        assert len(during) >= 2 and some_exit(during)  # the thread lives on, its pool does not
        assert str(t.native_id) in threads()
    finally:
        done.set()
        t.join(60)


def test_a_model_runners_last_job_releases_its_pool():
    from core.types import CancelToken
    from models.runner import ModelRunner

    runner = ModelRunner("omp-test")
    base, during = threads(), set()

    def job() -> None:
        parallel_work()
        during.update(threads() - base)  # the runner's thread and its pool's workers

    try:
        asyncio.run(runner.run(job, cancel=CancelToken()))
        assert len(during) >= 2 and some_exit(during)  # the runner's thread lives on, its pool does not
    finally:
        runner.shutdown()
