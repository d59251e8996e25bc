"""A thread lets its OpenMP pool go (core/omp.py): after a parallel region on a thread its
worker threads exist, after release_threads() on that thread they are gone, and another thread's
pool is untouched. An engine going idle, a model load on the executor and a model runner's last
job release theirs, so no pool is left behind to slow the engine's kernels."""
from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from core import omp

pytestmark = pytest.mark.skipif(omp._pause() is None, reason="torch's OpenMP runtime (libgomp) is not in use here")


def threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def parallel_work() -> None:
    torch.set_num_threads(2)
    a = torch.randn(700, 700)
    for _ in range(3):
        (a @ a).sum()
        torch.nn.functional.silu(a.repeat(40, 1))  # element-wise: ATen's own parallel_for


def on_thread(steps) -> list:
    """Run ``steps`` (callables) in order on one new thread, each result after the last one ran."""
    out: list = []
    t = threading.Thread(target=lambda: out.extend(step() for step in steps))
    t.start()
    t.join(60)
    return out


def test_a_threads_pool_is_released_and_only_its_own():
    other_ready, other_done = threading.Event(), threading.Event()
    other_pool: dict = {}

    def other() -> None:  # a second thread with a pool of its own, kept alive meanwhile
        before = threads()
        parallel_work()
        other_pool["workers"] = threads() - before
        other_ready.set()
        other_done.wait(60)

    keeper = threading.Thread(target=other)
    keeper.start()
    assert other_ready.wait(60)
    try:
        assert other_pool["workers"], "a parallel region started no worker thread"
        base = threads()
        after_work, after_release = on_thread([lambda: (parallel_work(), threads())[1],
                                               lambda: (omp.release_threads(), threads())[1]])
        workers = after_work - base
        assert len(workers) >= 2  # the thread itself and its pool's worker(s)
        assert workers - after_release  # some of them left...
        assert other_pool["workers"] <= after_release  # ...not the other thread's
    finally:
        other_done.set()
        keeper.join(60)


def test_released_runs_the_function_and_lets_the_pool_go():
    base = threads()
    result, left = on_thread([lambda: omp.released(lambda x: (parallel_work(), x * 2)[1])(21),
                              lambda: threads() - base])
    assert result == 42
    assert len(left) == 1  # only the thread itself


def test_a_model_runners_last_job_releases_its_pool():
    from core.types import CancelToken
    from models.runner import ModelRunner

    runner = ModelRunner("omp-test")
    try:
        base = threads()

        async def go():
            await runner.run(parallel_work, cancel=CancelToken())
            return threads() - base

        left = asyncio.run(go())
        assert len(left) == 1  # the runner's worker thread, without a pool
    finally:
        runner.shutdown()
