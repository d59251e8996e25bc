"""The idle heap trimmer: one trim per busy period, after the quiet time, never while busy."""
from __future__ import annotations

import asyncio

import pytest

from core import memory


def test_trim_gives_stranded_heap_memory_back():
    """Freed blocks kept apart by survivors cannot be returned by free() alone: malloc_trim does."""
    if memory._LIBC is None:
        pytest.skip("not glibc")
    import gc

    import psutil

    proc = psutil.Process()
    blocks = [bytes(4000) for _ in range(20000)]  # ~80 MB through malloc (past obmalloc's 512 bytes)
    survivors = blocks[::10]  # every tenth block stays: the free runs between them are stranded
    del blocks
    gc.collect()
    before = proc.memory_info().rss
    assert memory.trim_heap() is True
    assert before - proc.memory_info().rss > 30 * 2**20
    assert len(survivors) == 2000
    assert memory.limit_arenas(0) is False  # 0 keeps glibc's default


def test_trims_once_after_a_busy_period(monkeypatch):
    if memory._LIBC is None:
        pytest.skip("not glibc")
    calls = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    state = {"busy": False}

    async def scenario():
        t = memory.IdleTrimmer(lambda: state["busy"], idle_s=0.1, poll_s=0.02)
        t.start()
        await asyncio.sleep(0.3)
        assert calls == []            # idle from the start: nothing to give back
        state["busy"] = True
        await asyncio.sleep(0.3)
        assert calls == []            # never while busy
        state["busy"] = False
        await asyncio.sleep(0.4)
        assert calls == [1]           # once, after the quiet time
        await asyncio.sleep(0.3)
        assert calls == [1]           # and not again until the next busy period
        await t.stop()
        assert t.trims == 1

    asyncio.run(scenario())


def test_disabled_with_zero():
    async def scenario():
        t = memory.IdleTrimmer(lambda: False, idle_s=0)
        t.start()
        assert t._task is None
        await t.stop()

    asyncio.run(scenario())
