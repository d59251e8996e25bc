"""Prefix caching: exact (greedy replies equal with the cache on and off, on the real tiny
Qwen2 through the engine), bounded (LRU by bytes), and matched block by block."""
from __future__ import annotations

import pytest
import torch

from engine.backend import BatchBackend
from engine.prefix_cache import PrefixCache
from llm.types import ChatMessage
from models.adapter import ModelSpec
from tests.engine.test_engine import greedy, run_batch

pytestmark = pytest.mark.timeout(180)

SYSTEM = ("You are the assistant of a shipping company. Answer questions about parcels, invoices, "
          "customs forms and delivery times politely and precisely. ") * 3


def kv(n: int, fill: float = 1.0, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), -fill)) for _ in range(layers)]


def test_lookup_finds_the_longest_block_aligned_prefix_and_leaves_a_token_to_prefill():
    cache = PrefixCache(max_bytes=1 << 20, block=4)
    ids = list(range(11))
    cache.store(ids, kv(11))
    assert len(cache) == 1 and cache.find(ids) == 8  # (11 - 1) // 4 * 4
    end, layers = cache.lookup(list(range(10)) + [99, 98])  # shares 10 tokens: 2 whole blocks
    assert end == 8 and layers[0][0].shape == (1, 2, 8, 4)
    assert cache.find(list(range(5)) + [77] * 6) == 4  # shares one block only
    assert cache.find([1] + list(range(1, 11))) == 0  # a different first token: nothing
    assert cache.find(list(range(8))) == 4  # 8 tokens: at most 7 may come from the cache
    assert cache.lookup([5, 6, 7]) is None and cache.misses == 1 and cache.hits == 1


def test_the_cache_is_bounded_and_evicts_the_least_recently_used():
    one = sum(t.numel() * t.element_size() for pair in kv(8) for t in pair)
    cache = PrefixCache(max_bytes=2 * one + 1, block=8)
    a, b, c = ([x] * 9 for x in (1, 2, 3))
    cache.store(a, kv(9))
    cache.store(b, kv(9))
    assert cache.lookup(a) is not None  # a is now the most recent
    cache.store(c, kv(9))
    assert cache.bytes <= cache.max_bytes and len(cache) == 2
    assert cache.find(b) == 0 and cache.find(a) == 8 and cache.find(c) == 8
    stored = kv(9)
    cache.store([4] * 9, stored)
    stored[0][0].fill_(5.0)  # the cache holds copies: writing the caller's tensors changes nothing
    assert float(cache.lookup([4] * 9)[1][0][0].max()) == 1.0


def test_a_prefix_shared_by_two_entries_survives_the_eviction_of_one():
    cache = PrefixCache(max_bytes=1 << 20, block=4)
    cache.store(list(range(8)) + [1], kv(9))
    cache.store(list(range(8)) + [2], kv(9))  # same usable prefix: nothing new stored
    assert len(cache) == 1
    cache.store(list(range(4)) + [9, 9, 9, 9, 9], kv(9))
    cache._evict()  # the oldest holds blocks [0:4] and [0:8]; the other still holds [0:4]
    assert cache.find(list(range(4)) + [0] * 5) == 4 and cache.find(list(range(9))) == 4


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def causal(request, tiny_models_dir):
    from llm.causal import CausalLMAdapter
    from models.precision import cpu_has_bf16

    if request.param == "bfloat16" and not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    adapter = CausalLMAdapter(ModelSpec(id="qwen2_5_0_5b", name="qwen2_5_0_5b", kind="causal_lm",
                                        path=tiny_models_dir / "qwen2_5_0_5b", dtype=request.param))
    adapter.load()
    yield adapter
    adapter.unload()


def backend(adapter, mb: float) -> BatchBackend:
    return BatchBackend(adapter.model, adapter.tokenizer, adapter.encode, prefix_cache_mb=mb, prefix_block=8)


def chats() -> list[list[ChatMessage]]:
    questions = ["Where is my parcel?", "How do I fill in a customs form for a gift?", "Привет! Сколько идёт посылка?",
                 "请问发票在哪里？", "Can I change the delivery address after dispatch, and what does it cost?"]
    out = [[ChatMessage("system", SYSTEM), ChatMessage("user", q)] for q in questions]
    # A chat history resent with one more turn: the first request's whole prompt is its prefix.
    out.append(out[0] + [ChatMessage("assistant", "It is on its way."), ChatMessage("user", "When will it arrive?")])
    return out


def test_greedy_replies_are_identical_with_the_prefix_cache_on_and_off(causal):
    params = greedy(12)
    off = backend(causal, 0)
    assert off.prefix_cache is None
    want = [run_batch(off, [(m, None, params)])[0][0] for m in chats()]

    on = backend(causal, 64)
    got = [run_batch(on, [(m, None, params)])[0][0] for m in chats()]  # one by one: the 2nd on hit
    assert got == want
    assert on.prefix_cache.hits >= len(chats()) - 1 and len(on.prefix_cache) >= 1
    # All at once with a warm cache: one prefill from the ends of their cached prefixes.
    together = [text for text, _ in run_batch(on, [(m, None, params) for m in chats()])]
    assert together == want
    # Prompts that reuse a prefix report their full prompt length, as without the cache.
    _, handle = run_batch(on, [(chats()[1], None, params)])[0]
    assert handle.usage.prompt_tokens == len(causal.encode(chats()[1], None).input_ids)


def test_prompts_with_cached_prefixes_prefill_together_exactly(causal, monkeypatch):
    """Hits admitted together run as one forward: each row runs the longest uncached rest,
    taking less of its cached prefix, or none (a prompt shorter than that rest runs whole)."""
    params = greedy(8)
    texts = [SYSTEM + "Where is parcel 1?", SYSTEM[:len(SYSTEM) // 2],
             SYSTEM + "I need a customs form for a parcel to Norway with books and a scarf. " * 4]
    lengths = [len(causal.encode(None, t).input_ids) for t in texts]
    off = backend(causal, 0)
    want = [run_batch(off, [(None, t, params)])[0][0] for t in texts]
    on = backend(causal, 64)
    run_batch(on, [(None, SYSTEM, greedy(1))])  # warm: the system prompt's blocks are cached
    calls = []
    real = on._prefill_after_many
    monkeypatch.setattr(on, "_prefill_after_many",
                        lambda prompts, hits: calls.append([start for start, _ in hits]) or real(prompts, hits))
    got = [text for text, _ in run_batch(on, [(None, t, params) for t in texts])]
    assert got == want
    assert len(calls) == 1 and len(calls[0]) == 3 and all(calls[0])  # one forward, all three hits
    rest = max(n - start for n, start in zip(lengths, calls[0]))
    assert lengths[1] < rest  # the short prompt ran whole, beside rows reading their prefixes


def test_a_cache_hit_joins_a_running_batch_exactly(causal):
    """A hit prefilled alone while other rows are mid-decode gives its solo reply."""
    import asyncio

    from core.types import CancelToken
    from tests.engine.test_engine import collect, engine_over, wait_until

    params = greedy(10)
    off = backend(causal, 0)
    want = [run_batch(off, [(m, None, params)])[0][0] for m in chats()[:3]]
    on = backend(causal, 64)
    run_batch(on, [(chats()[0], None, greedy(1))])  # warm: the system prompt's blocks are cached

    async def main():
        async with engine_over(on) as engine:
            first = engine.submit(engine.encode(chats()[0], None), params, CancelToken())
            engine.start()
            await wait_until(lambda: engine.steps >= 3, what="decode under way")
            later = [engine.submit(engine.encode(m, None), params, CancelToken()) for m in chats()[1:3]]
            return [text for text, _ in await asyncio.gather(*(collect(h) for h in [first, *later]))]

    assert asyncio.run(main()) == want


# ---- chunked prefill -----------------------------------------------------------------------

LONG = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 6


def test_chunked_prefill_gives_the_same_output_as_one_prefill(causal):
    params = greedy(10)
    prompts = [(None, LONG), ([ChatMessage("user", LONG + " Summarise.")], None), (None, "short one")]
    one = [run_batch(backend(causal, 0), [(m, p, params)])[0][0] for m, p in prompts]
    chunked = BatchBackend(causal.model, causal.tokenizer, causal.encode, prefill_chunk=16)
    assert chunked.chunked(causal.encode(None, LONG)) and not chunked.chunked(causal.encode(None, "short one"))
    assert [run_batch(chunked, [(m, p, params)])[0][0] for m, p in prompts] == one
    # All three admitted together: the long ones go chunk by chunk while the short one decodes.
    assert [text for text, _ in run_batch(chunked, [(m, p, params) for m, p in prompts])] == one
    # Chunked on top of a cached prefix (the second run of the same long prompt).
    both = BatchBackend(causal.model, causal.tokenizer, causal.encode, prefill_chunk=16, prefix_cache_mb=16,
                        prefix_block=8)
    assert [run_batch(both, [(None, LONG, params)])[0][0] for _ in range(2)] == [one[0], one[0]]
    assert both.prefix_cache.hits == 1


def test_a_long_prompt_joins_a_running_batch_chunk_by_chunk(causal):
    """While the long prompt is prefilled, the running row keeps getting a token every step."""
    import asyncio

    from core.types import CancelToken
    from tests.engine.test_engine import collect, engine_over, wait_until

    params = greedy(240)  # still decoding when the long prompt, a few layers per step, has joined
    want_short = run_batch(backend(causal, 0), [(None, "Hello there", params)])[0][0]
    want_long = run_batch(backend(causal, 0), [(None, LONG, greedy(5))])[0][0]
    chunked = BatchBackend(causal.model, causal.tokenizer, causal.encode, prefill_chunk=16)
    n_long = len(causal.encode(None, LONG).input_ids)

    async def main():
        async with engine_over(chunked) as engine:
            short = engine.submit(engine.encode(None, "Hello there"), params, CancelToken())
            engine.start()
            await wait_until(lambda: engine.steps >= 2, timeout=30, what="decode under way")
            before = engine.steps
            long = engine.submit(engine.encode(None, LONG), greedy(5), CancelToken())

            async def long_reply():
                # The decode steps run until the long prompt's first token, read when it
                # arrives (any lag only adds steps: the bound below is a lower one).
                text, first_at = "", None
                async for delta in long:
                    first_at = engine.steps if first_at is None else first_at
                    text += delta.text
                return text, first_at

            (short_text, _), (long_text, first_at) = await asyncio.gather(collect(short), long_reply())
            return [short_text, long_text], first_at - before

    texts, steps = asyncio.run(main())
    assert texts == [want_short, want_long]
    assert steps >= n_long // 16 - 1  # the short row decoded between the chunks
