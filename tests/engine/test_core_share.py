"""Models generating at the same time split the CPU's threads (core/cores.py): each engine's
steps run on its part while another engine has work, and on all its threads again once that
one is idle. Two real engines over the tiny Qwen2, each set to 2 threads."""
from __future__ import annotations

import asyncio

import pytest
import torch

from core.cores import SHARE, CoreShare
from core.types import CancelToken
from llm.types import ChatMessage
from models.adapter import ModelSpec
from tests.engine.test_engine import collect, greedy, wait_until

pytestmark = pytest.mark.timeout(180)


def test_parts_are_in_proportion_to_what_each_asks_and_at_least_one():
    share = CoreShare(cpus=8)
    a, b, c = object(), object(), object()
    assert share.threads(a, 8) == 8  # holding nothing: what it asks
    share.hold(a, 8)
    assert share.threads(a, 8) == 8  # alone
    share.hold(b, 8)
    assert share.threads(a, 8) == share.threads(b, 8) == 4
    share.hold(c, 1)  # a toy model on one thread counts too: 17 asked of 8
    assert (share.threads(a, 8), share.threads(c, 1)) == (3, 1)
    share.drop(b), share.drop(c)
    assert share.threads(a, 8) == 8 and share.busy == 1
    share.drop(a), share.drop(a)  # dropping twice is harmless
    assert share.busy == 0
    small = CoreShare(cpus=2)
    small.hold(a, 2), small.hold(b, 2), small.hold(c, 2)
    assert [small.threads(w, 2) for w in (a, b, c)] == [1, 1, 1]  # never below one
    alone = CoreShare(cpus=2)
    alone.hold(a, 8)
    assert alone.threads(a, 8) == 8  # alone, as set (even past the CPUs)
    alone.hold(b, 2)
    assert (alone.threads(a, 8), alone.threads(b, 2)) == (1, 1)  # 8 * 2 // 10, and at least one
    small.enabled = False
    assert small.threads(a, 2) == 2


@pytest.fixture(scope="module")
def two(tiny_models_dir):
    from llm.causal import CausalLMAdapter

    adapters = []
    for name in ("first", "second"):
        adapter = CausalLMAdapter(ModelSpec(id=name, name=name, kind="causal_lm", threads=2,
                                            path=tiny_models_dir / "qwen2_5_0_5b"))
        adapter.load()
        adapters.append(adapter)
    yield adapters
    for adapter in adapters:
        adapter.unload()


class Counting:
    """A backend that notes how many torch threads each of its decode steps ran on."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.step_threads: list[int] = []

    def decode(self, tokens):
        self.step_threads.append(torch.get_num_threads())
        return self._backend.decode(tokens)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def _run_two(adapters):
    from engine.engine import Engine

    async def main():
        backends = [Counting(a.engine_backend()) for a in adapters]
        engines = [Engine(b, name=f"e{i}") for i, b in enumerate(backends)]
        prompt = [ChatMessage("user", "Count the parcels, please.")]
        try:
            long = engines[0].submit(engines[0].encode(prompt, None), greedy(600), CancelToken())
            engines[0].start()
            await wait_until(lambda: engines[0].steps >= 5, timeout=30, what="the first engine decoding")
            short = engines[1].submit(engines[1].encode(prompt, None), greedy(24), CancelToken())
            engines[1].start()
            await collect(short)
            during = len(backends[0].step_threads)
            await collect(long)
            return backends, during
        finally:
            for engine in engines:
                await asyncio.to_thread(engine.stop, 10.0)

    return asyncio.run(main())


def test_two_engines_decoding_at_once_split_the_threads_and_take_them_back(two, monkeypatch):
    monkeypatch.setattr(SHARE, "cpus", 2)
    (first, second), during = _run_two(two)
    assert set(second.step_threads) == {1}  # the first engine was busy all along
    assert first.step_threads[:3] == [2, 2, 2]  # alone
    assert 1 in first.step_threads[:during]  # while the second one decoded
    assert first.step_threads[-20:] == [2] * 20  # the second one went idle: all of them again
    assert SHARE.busy == 0  # both idle (then stopped): nothing held


def test_with_sharing_off_each_engine_keeps_its_threads(two, monkeypatch):
    monkeypatch.setattr(SHARE, "cpus", 2)
    monkeypatch.setattr(SHARE, "enabled", False)
    (first, second), _ = _run_two(two)
    assert set(first.step_threads) == set(second.step_threads) == {2}
