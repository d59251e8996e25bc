"""The generation engine: continuous batching over the tiny Qwen2 causal LM and tiny Qwen-VL
checkpoints (real model code, random weights), and over the echo FakeBackend where the test
needs exact control of timing and content (queueing, cancellation, failures).

The tiny models never pick an end-of-turn token, so replies run to max_new_tokens; the
assertions are about equality between runs, counts and finish reasons, not wording.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import pytest
from PIL import Image, ImageDraw

from core.errors import BadRequest, ModelUnavailable, Overloaded, ServerError
from core.types import CancelToken, GenerationParams
from engine.engine import Engine
from llm.types import ChatMessage, ImagePart
from models.adapter import ModelSpec
from tests.fakes import FakeBackend

pytestmark = pytest.mark.timeout(120)


def greedy(n: int = 8, **kw) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@contextlib.asynccontextmanager
async def engine_over(backend, **kw):
    """An Engine over `backend`, NOT started (submit first to get one batch, then start)."""
    engine = Engine(backend, name="test", **kw)
    try:
        yield engine
    finally:
        with contextlib.suppress(RuntimeError):  # already started
            engine.start()
        await asyncio.to_thread(engine.stop, 10.0)


async def collect(handle):
    """(text, pieces) of a request; the pieces are the non-empty streamed texts."""
    pieces = [d.text async for d in handle]
    return "".join(pieces), [p for p in pieces if p]


async def wait_until(condition, timeout: float = 2.0, what: str = "condition") -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def run_batch(backend, requests, **engine_kw):
    """Submit every (messages, prompt, params) before starting the engine, so they are
    admitted together (one prefill, one batch); return [(text, handle)]."""
    async def main():
        async with engine_over(backend, **engine_kw) as engine:
            handles = [engine.submit(engine.encode(m, p), params, CancelToken()) for m, p, params in requests]
            engine.start()
            results = await asyncio.gather(*(collect(h) for h in handles))
            return [(text, h) for (text, _), h in zip(results, handles)]

    return asyncio.run(main())


# ---- the tiny causal LM ------------------------------------------------------------------

@pytest.fixture(scope="module")
def causal(tiny_models_dir):
    from llm.causal import CausalLMAdapter

    adapter = CausalLMAdapter(ModelSpec(id="qwen2_5_0_5b", name="qwen2_5_0_5b", kind="causal_lm",
                                        path=tiny_models_dir / "qwen2_5_0_5b"))
    adapter.load()
    yield adapter
    adapter.unload()


def alone(adapter, messages, prompt, params):
    """(text, handle) of one request with the engine to itself."""
    return run_batch(adapter.engine_backend(), [(messages, prompt, params)])[0]


PROMPTS = [  # (messages, prompt): different lengths, scripts, chat and raw
    ([ChatMessage("user", "Hi")], None),
    (None, "Hello"),
    ([ChatMessage("system", "You are terse."), ChatMessage("user", "Describe the picture in one sentence, please.")],
     None),
    (None, "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 3),
    ([ChatMessage("user", "请识别图片中的所有文字。"), ChatMessage("assistant", "好"), ChatMessage("user", "再来")], None),
    (None, "0123456789 " * 12),
    ([ChatMessage("user", ("Invoice number 12345,", "total due: $678.90."))], None),
    (None, "The quick brown fox jumps over the lazy dog. " * 6),
]


def test_greedy_is_the_same_alone_and_in_a_batch_of_8(causal):
    params = greedy(8)
    solo = [alone(causal, m, p, params)[0] for m, p in PROMPTS]
    lengths = {len(causal.encode(m, p).input_ids) for m, p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # really different prompt lengths (left padding in play)
    batch = run_batch(causal.engine_backend(), [(m, p, params) for m, p in PROMPTS])
    assert [text for text, _ in batch] == solo
    for _, handle in batch:
        assert handle.finish_reason == "length" and handle.usage.completion_tokens == 8
    assert len(set(solo)) == len(solo)  # different prompts, different replies: the rows did not mix


def test_requests_joining_a_running_batch_match_their_solo_run(causal):
    """Four requests decode; four more join mid-way (prefill + cache merge), rows leave at
    different times (cache pruning): every reply still equals its solo run."""
    lengths = [6, 9, 4, 8, 7, 5, 10, 3]
    solo = [alone(causal, m, p, greedy(n))[0] for (m, p), n in zip(PROMPTS, lengths)]

    async def main():
        async with engine_over(causal.engine_backend()) as engine:
            engine.start()
            first = [engine.submit(engine.encode(m, p), greedy(n), CancelToken())
                     for (m, p), n in zip(PROMPTS[:4], lengths[:4])]
            iters = [h.__aiter__() for h in first]
            heads = [(await it.__anext__()).text for it in iters]  # all four are decoding now
            assert engine.steps >= 1
            late = [engine.submit(engine.encode(m, p), greedy(n), CancelToken())
                    for (m, p), n in zip(PROMPTS[4:], lengths[4:])]

            async def rest(head, it):
                return head + "".join([d.text async for d in it])

            texts = await asyncio.gather(*(rest(h, it) for h, it in zip(heads, iters)),
                                         *(collect(h) for h in late))
            return [t if isinstance(t, str) else t[0] for t in texts], first + late

    texts, handles = asyncio.run(main())
    assert texts == solo
    assert [h.usage.completion_tokens for h in handles] == lengths


def test_per_request_sampling_params_and_lengths_in_one_batch(causal):
    chat = [ChatMessage("user", "Describe the picture in one sentence, please.")]
    from scripts.make_tiny_models import _CORPUS

    other = _CORPUS  # holds most of the tiny vocabulary: the greedy pick has been seen, the penalty bites
    rows = [
        (chat, None, greedy(3)),
        (chat, None, GenerationParams(max_new_tokens=5, temperature=0.9, seed=11, ignore_eos=True)),
        (chat, None, GenerationParams(max_new_tokens=7, temperature=1.5, top_k=1, seed=5, ignore_eos=True)),
        (chat, None, GenerationParams(max_new_tokens=6, temperature=1.5, top_p=1e-6, seed=6, ignore_eos=True)),
        (None, other, GenerationParams(max_new_tokens=9, temperature=1.2, seed=12, ignore_eos=True)),
        (None, other, greedy(4, repetition_penalty=1.8)),
        (chat, None, greedy(11)),
    ]
    first = run_batch(causal.engine_backend(), rows)
    for (_, _, params), (text, handle) in zip(rows, first):
        assert handle.finish_reason == "length"
        assert handle.usage.completion_tokens == params.max_new_tokens
    again = run_batch(causal.engine_backend(), rows)
    assert [t for t, _ in again] == [t for t, _ in first]  # seeded rows reproduce run to run
    # top_k=1 and a tiny top_p are greedy; a row's text does not depend on its neighbours.
    assert first[0][0] == alone(causal, chat, None, greedy(3))[0]
    assert first[2][0] == alone(causal, chat, None, greedy(7))[0]
    assert first[3][0] == alone(causal, chat, None, greedy(6))[0]
    assert first[6][0] == alone(causal, chat, None, greedy(11))[0]
    assert first[1][0] == alone(causal, chat, None, rows[1][2])[0]  # the seed is the row's own
    assert first[5][0] == alone(causal, None, other, rows[5][2])[0]
    assert first[5][0] != alone(causal, None, other, greedy(4))[0]  # the penalty changed the choice


def test_prompt_token_counts_are_exact(causal):
    tok = causal.tokenizer
    conversations = [
        [ChatMessage("user", "Hi")],
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Счёт № 42 от 1 марта. 发票金额 🚀")],
        [ChatMessage("user", ("part one", "part two")), ChatMessage("assistant", "ok"), ChatMessage("user", "again")],
    ]
    raw = ["Hello", "北京市朝阳区建国路八十八号。", "a  b\n\n c 😀 "]
    rows = [(m, None, greedy(1)) for m in conversations] + [(None, p, greedy(2)) for p in raw]
    results = run_batch(causal.engine_backend(), rows)
    for messages, (_, handle) in zip(conversations, results):
        turns = [{"role": m.role, "content": m.content if isinstance(m.content, str) else "\n".join(m.content)}
                 for m in messages]
        ids = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        assert handle.usage.prompt_tokens == len(ids)
        assert handle.usage.completion_tokens == 1
    for prompt, (_, handle) in zip(raw, results[len(conversations):]):
        assert handle.usage.prompt_tokens == len(tok(prompt).input_ids)
        assert handle.usage.completion_tokens == 2
        assert handle.usage.total_tokens == handle.usage.prompt_tokens + 2


def test_stop_string_cuts_the_reply_and_never_leaks(causal):
    prompt = "The quick brown fox"
    full, _ = alone(causal, None, prompt, greedy(24))
    # A stop string taken from the middle of the reply (two clean characters).
    k = next(i for i in range(len(full) // 3, len(full) - 2)
             if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[k:k + 2]
    cut = full[:full.find(stop)]

    async def main():
        async with engine_over(causal.engine_backend()) as engine:
            engine.start()
            handle = engine.submit(engine.encode(None, prompt), greedy(24, stop=("NEVER-THERE", stop)), CancelToken())
            seen, pieces = "", []
            async for delta in handle:
                pieces.append(delta.text)
                seen += delta.text
                assert cut.startswith(seen), (seen, cut)  # nothing past the cut was ever sent
            return seen, pieces, handle

    text, pieces, handle = asyncio.run(main())
    assert text == cut and stop not in text
    assert handle.finish_reason == "stop"
    assert handle.usage.completion_tokens < 24


def test_context_overflow_is_rejected_by_submit(causal):
    backend = causal.engine_backend()
    context = backend.context_length
    assert context == 4096
    long_prompt = " ".join(str(i) for i in range(1100))
    encoded = causal.encode(None, long_prompt)
    assert len(encoded.input_ids) > context

    async def main():
        async with engine_over(backend) as engine:
            before = engine.waiting_count
            with pytest.raises(BadRequest) as info:
                engine.submit(encoded, greedy(4), CancelToken())
            assert info.value.code == "CONTEXT_LENGTH_EXCEEDED" and info.value.status_code == 400
            assert str(len(encoded.input_ids)) in info.value.message and str(context) in info.value.message
            assert engine.waiting_count == before == 0
            # A prompt of exactly the context leaves no room for one token: rejected too.
            exact = type(encoded)(encoded.input_ids[:context])
            with pytest.raises(BadRequest):
                engine.submit(exact, greedy(4), CancelToken())
            assert engine.waiting_count == 0
            # Messages are counted after the chat template.
            with pytest.raises(BadRequest) as info:
                engine.submit(engine.encode([ChatMessage("user", long_prompt)], None), greedy(4), CancelToken())
            assert info.value.code == "CONTEXT_LENGTH_EXCEEDED"

    asyncio.run(main())


def test_max_new_tokens_is_clamped_to_the_remaining_context(causal):
    backend = causal.engine_backend()
    encoded = causal.encode(None, " ".join(str(i) for i in range(1100)))
    near_full = type(encoded)(encoded.input_ids[:backend.context_length - 2])

    async def main():
        async with engine_over(backend) as engine:
            engine.start()
            handle = engine.submit(near_full, greedy(50), CancelToken())
            await collect(handle)
            return handle

    handle = asyncio.run(main())
    assert handle.finish_reason == "length"
    assert handle.usage.completion_tokens == 2
    assert handle.usage.prompt_tokens + handle.usage.completion_tokens == 4096


# ---- scheduling, over the echo backend -------------------------------------------------

def echo(engine, text, params=None, cancel=None):
    return engine.submit(engine.encode(None, text), params or GenerationParams(max_new_tokens=500),
                         cancel or CancelToken())


def test_echo_backend_round_trip():
    async def main():
        async with engine_over(FakeBackend()) as engine:
            engine.start()
            handle = echo(engine, "Привет, world")
            text, _ = await collect(handle)
            return text, handle

    text, handle = asyncio.run(main())
    assert text == "Привет, world"
    assert handle.finish_reason == "stop"  # the echo model ends with end-of-text
    assert handle.usage.prompt_tokens == len("Привет, world")


def test_fast_tokens_are_coalesced_but_the_first_goes_at_once():
    async def main(interval):
        async with engine_over(FakeBackend(step_delay=0.002), stream_interval=interval) as engine:
            engine.start()
            return await collect(echo(engine, "coalesce these forty characters please!!"))

    text, pieces = asyncio.run(main(0.0))  # an event per token (a slow consumer may merge a few)
    assert text == "coalesce these forty characters please!!" and len(pieces) > len(text) // 2
    text, pieces = asyncio.run(main(10.0))  # nothing is flushed between the first token and the end
    assert text == "coalesce these forty characters please!!" and len(pieces) <= 2


def test_repetition_stop_ends_a_looping_reply():
    async def main(max_repeat):
        async with engine_over(FakeBackend()) as engine:
            engine.start()
            handle = echo(engine, "Total" + "." * 100 + " 42", GenerationParams(max_new_tokens=300,
                                                                               max_repeat=max_repeat))
            text, _ = await collect(handle)
            return text, handle.finish_reason

    assert asyncio.run(main(0)) == ("Total" + "." * 100 + " 42", "stop")  # off: runs to the end
    text, reason = asyncio.run(main(64))
    assert reason == "stop" and text == "Total" + "." * 64  # stopped once the run reached 64


@pytest.mark.parametrize("prompt, stops, expected", [
    ("abc STOP def", ("STOP",), "abc "),
    ("abc STx de STOP more", ("STOP",), "abc STx de "),     # a near miss is released, not eaten
    ("one two three", ("three", "two"), "one "),              # the earliest stop wins
    ("xyzST", ("STOP",), "xyzST"),                            # ends (EOS) on a held-back prefix: flushed
    ("STOP at once", ("STOP",), ""),
    ("aaab", ("ab",), "aa"),                                  # overlapping candidates
])
def test_stop_strings_on_the_echo_model(prompt, stops, expected):
    async def main():
        async with engine_over(FakeBackend(step_delay=0.001)) as engine:
            engine.start()
            handle = echo(engine, prompt, GenerationParams(max_new_tokens=500, stop=stops))
            seen = ""
            async for delta in handle:
                seen += delta.text
                assert expected.startswith(seen), (seen, expected)
            return seen, handle

    text, handle = asyncio.run(main())
    assert text == expected
    assert handle.finish_reason == "stop"


def test_held_back_stop_prefix_is_flushed_at_max_tokens():
    async def main():
        async with engine_over(FakeBackend()) as engine:
            engine.start()
            handle = echo(engine, "abcSTOxyz", GenerationParams(max_new_tokens=6, stop=("STOP",)))
            pieces = [d async for d in handle]
            return pieces, handle

    pieces, handle = asyncio.run(main())
    assert "".join(d.text for d in pieces) == "abcSTO"
    assert handle.finish_reason == "length" and handle.usage.completion_tokens == 6
    assert pieces[-1].finish_reason == "length" and pieces[-1].usage == handle.usage


def test_empty_stop_string_does_not_lose_text():
    """An empty stop string (a surface may pass one through) must act like no stop string."""
    async def main():
        async with engine_over(FakeBackend()) as engine:
            engine.start()
            handle = echo(engine, "hello world", GenerationParams(max_new_tokens=500, stop=("",)))
            text, _ = await collect(handle)
            return text

    assert asyncio.run(main()) == "hello world"


def test_queue_bound_rejects_with_retry_after():
    async def main():
        async with engine_over(FakeBackend(step_delay=0.02), max_batch=1, max_queue=2) as engine:
            engine.start()
            running = echo(engine, "r" * 200)
            await wait_until(lambda: engine.active_count == 1, what="first request running")
            echo(engine, "w1"), echo(engine, "w2")
            assert engine.waiting_count == 2
            with pytest.raises(Overloaded) as info:
                echo(engine, "w3")
            assert info.value.status_code == 503 and info.value.code == "OVERLOADED"
            assert int(info.value.headers["Retry-After"]) >= 1
            assert engine.waiting_count == 2
            # When the running request leaves, the queue moves and there is room again.
            running.cancel.cancel()
            await wait_until(lambda: engine.waiting_count < 2, timeout=2.0, what="queue moved")
            accepted = echo(engine, "ok")
            assert accepted is not None

    asyncio.run(main())


def test_cancelling_one_of_four_running_requests():
    prompts = [chr(ord("a") + i) * 120 for i in range(4)]
    backend = FakeBackend(step_delay=0.01)

    async def main():
        async with engine_over(backend) as engine:
            handles = [echo(engine, p) for p in prompts]
            engine.start()
            victim = handles[1].__aiter__()
            got = "".join([(await victim.__anext__()).text for _ in range(3)])
            assert engine.active_count == 4 and backend.batch_size == 4
            others = [asyncio.ensure_future(collect(h)) for i, h in enumerate(handles) if i != 1]
            await victim.aclose()  # the client left
            assert handles[1].cancel.cancelled
            elapsed = await wait_until(lambda: engine.active_count == 3, timeout=1.0, what="victim dropped")
            assert backend.batch_size == 3
            texts = [t for t, _ in await asyncio.gather(*others)]
            return got, elapsed, texts, handles

    got, elapsed, texts, handles = asyncio.run(main())
    assert prompts[1].startswith(got) and 3 <= len(got) < 120
    assert elapsed < 1.0
    assert texts == [prompts[0], prompts[2], prompts[3]]
    for i in (0, 2, 3):
        assert handles[i].finish_reason == "stop"
        assert handles[i].usage.completion_tokens == 121  # 120 characters, then end-of-text


def test_cancelling_the_consuming_task_cancels_the_request():
    backend = FakeBackend(step_delay=0.01)

    async def main():
        async with engine_over(backend) as engine:
            engine.start()
            handle = echo(engine, "z" * 300)
            task = asyncio.ensure_future(collect(handle))
            await wait_until(lambda: engine.steps >= 3, what="decoding")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: engine.active_count == 0, what="request dropped")
            return handle

    handle = asyncio.run(main())
    assert handle.cancel.cancelled
    assert backend.batch_size == 0


def test_deadline_finishes_with_cancelled():
    backend = FakeBackend(step_delay=0.01)

    async def main():
        async with engine_over(backend) as engine:
            engine.start()
            start = time.monotonic()
            handle = echo(engine, "d" * 300, cancel=CancelToken(deadline=time.monotonic() + 0.3))
            text, _ = await collect(handle)  # ends normally, no exception
            elapsed = time.monotonic() - start
            late = echo(engine, "never", cancel=CancelToken(deadline=time.monotonic() - 1))
            late_deltas = [d async for d in late]
            return text, elapsed, handle, late, late_deltas, engine.active_count

    text, elapsed, handle, late, late_deltas, active = asyncio.run(main())
    assert handle.finish_reason == "cancelled"
    assert 0 < len(text) < 300 and set(text) == {"d"}
    assert handle.usage.completion_tokens == len(text) and handle.usage.prompt_tokens == 300
    assert elapsed < 2.5
    # Expired while still waiting: dropped before its prefill, nothing generated.
    assert late.finish_reason == "cancelled" and late.usage.completion_tokens == 0 and late_deltas == []
    assert active == 0 and backend.batch_size == 0


def test_deadline_of_a_waiting_request_is_honoured_while_it_queues():
    """A request stuck behind a full batch must not outlive its deadline in the queue, and
    (like one whose client left) must not keep holding a queue slot."""
    backend = FakeBackend(step_delay=0.02)

    async def main():
        async with engine_over(backend, max_batch=1, max_queue=1) as engine:
            engine.start()
            running = echo(engine, "r" * 200)  # ~4 s of decoding
            await wait_until(lambda: engine.active_count == 1, what="running")
            start = time.monotonic()
            queued = echo(engine, "q" * 10, cancel=CancelToken(deadline=time.monotonic() + 0.2))
            try:
                deltas = await asyncio.wait_for(_all(queued), timeout=2.0)
            except asyncio.TimeoutError:
                pytest.fail("a request whose deadline passed while queued was still pending 2 s later "
                            f"(waiting_count={engine.waiting_count})")
            elapsed = time.monotonic() - start
            assert engine.active_count == 1 and not running.cancel.cancelled  # the other one runs on
            assert engine.waiting_count == 0
            echo(engine, "room again")  # the slot is free (max_queue=1): no Overloaded
            return deltas, elapsed, queued

    deltas, elapsed, queued = asyncio.run(main())
    assert deltas == [] and queued.finish_reason == "cancelled" and queued.usage.completion_tokens == 0
    assert elapsed < 1.0, f"the expired request waited {elapsed:.2f} s for a batch slot"


async def _all(handle):
    return [d async for d in handle]


def test_zero_token_prompt_is_rejected_and_cannot_break_a_batch(causal):
    """An empty prompt (no tokens) cannot be prefilled; submit must refuse it (400) instead of
    letting the step fail and take every co-batched request down with it."""
    from engine.backend import EncodedPrompt

    async def main():
        async with engine_over(causal.engine_backend()) as engine:
            other = engine.submit(engine.encode(None, "Hello"), greedy(3), CancelToken())
            with pytest.raises(BadRequest):
                engine.submit(EncodedPrompt([]), greedy(3), CancelToken())
            assert engine.waiting_count == 1
            engine.start()
            await collect(other)
            return other

    other = asyncio.run(main())
    assert other.finish_reason == "length" and other.usage.completion_tokens == 3


def test_backend_failure_fails_every_active_request_and_the_engine_carries_on():
    backend = FakeBackend(fail_step=3)
    prompts = ["first request", "second one", "third"]

    async def main():
        async with engine_over(backend) as engine:
            handles = [echo(engine, p) for p in prompts]
            engine.start()
            errors, partial = [], []
            for h in handles:
                text = ""
                with pytest.raises(ServerError) as info:
                    async for d in h:
                        text += d.text
                errors.append(info.value)
                partial.append(text)
            await wait_until(lambda: engine.active_count == 0, what="batch cleared")
            assert backend.batch_size == 0
            backend.fail_step = None  # the fault was transient
            after = echo(engine, "still serving")
            text, _ = await collect(after)
            return errors, partial, text, after

    errors, partial, text, after = asyncio.run(main())
    for err, prompt, got in zip(errors, prompts, partial):
        assert type(err) is ServerError and err.status_code == 500
        assert "secret" not in err.message and "0x7f" not in err.message  # internals are not exposed
        assert prompt.startswith(got) and len(got) < len(prompt)
    assert text == "still serving" and after.finish_reason == "stop"


def test_a_failure_the_scheduler_cannot_recover_from_fails_every_request_and_later_ones_get_503():
    # The step fails, and releasing the batch fails too: the scheduler thread cannot go on.
    # Nobody may be left waiting on a queue no thread serves any more.
    backend = FakeBackend(fail_step=3, step_delay=0.01)
    backend.fail_keep = True

    async def main():
        async with engine_over(backend, max_batch=2) as engine:
            handles = [echo(engine, p) for p in ("first request", "second one", "queued behind them")]
            engine.start()
            errors = []
            for h in handles:
                with pytest.raises((ServerError, ModelUnavailable)) as info:
                    await asyncio.wait_for(collect(h), 10)
                errors.append(info.value)
            await wait_until(lambda: not engine._thread.is_alive(), what="scheduler stopped")
            with pytest.raises(ModelUnavailable) as later:
                echo(engine, "after the failure")
            return errors, later.value

    errors, later = asyncio.run(main())
    assert [e.status_code for e in errors] == [500, 500, 503]  # the batch's own error; the queued one's
    assert "internal failure" in errors[2].message and "secret" not in errors[0].message
    assert later.status_code == 503 and later.headers.get("Retry-After") and "internal failure" in later.message


def test_stop_fails_waiting_and_running_requests_with_model_unavailable():
    backend = FakeBackend(step_delay=0.02)

    async def main():
        engine = Engine(backend, name="m", max_batch=1)
        engine.start()
        running = echo(engine, "r" * 300)
        await wait_until(lambda: engine.active_count == 1, what="running")
        waiting = [echo(engine, "w1"), echo(engine, "w2")]
        assert engine.waiting_count == 2
        await asyncio.to_thread(engine.stop, 5.0)
        results = []
        for h in [running, *waiting]:
            text = ""
            with pytest.raises(ModelUnavailable) as info:
                async for d in h:
                    text += d.text
            results.append((text, info.value))
        with pytest.raises(ModelUnavailable):
            echo(engine, "after stop")
        return results, engine

    results, engine = asyncio.run(main())
    for text, err in results:
        assert err.status_code == 503 and err.headers.get("Retry-After")
    assert results[1][0] == results[2][0] == ""  # the waiting ones never started
    assert engine.waiting_count == 0 and engine.active_count == 0 and backend.batch_size == 0


# ---- VLMs: images of different sizes in one batch --------------------------------------

def picture(size, seed: int) -> Image.Image:
    img = Image.new("RGB", size, (255, 255 - 40 * seed, 40 * seed))
    draw = ImageDraw.Draw(img)
    draw.rectangle((size[0] // 5, size[1] // 5, size[0] // 2, size[1] // 2), fill=(20 * seed, 0, 0))
    draw.text((5, 5), f"Invoice {seed}", fill="black")
    return img


VLM_REQUESTS = [
    [ChatMessage("user", (ImagePart(picture((640, 400), 1)), "Read all the text in this image."))],
    [ChatMessage("user", (ImagePart(picture((120, 300), 2)), "Describe the picture."))],
    [ChatMessage("system", "Be brief."), ChatMessage("user", (ImagePart(picture((64, 64), 3)), "What is it?"))],
    [ChatMessage("user", ("Compare:", ImagePart(picture((300, 90), 4)), ImagePart(picture((90, 90), 5))))],
    [ChatMessage("user", "No picture here, just text. Съешь же ещё этих булок.")],
]


def tiny_vlm(tiny_models_dir, model_id: str):
    """A loaded tiny Qwen-VL adapter at small image sizes, unloaded after (for fixtures)."""
    from vlm.qwen import QwenVLAdapter

    adapter = QwenVLAdapter(ModelSpec(id=model_id, name=model_id, kind="qwen_vl", path=tiny_models_dir / model_id,
                                      max_pixels=112 * 112, min_pixels=56 * 56))
    adapter.load()
    yield adapter
    adapter.unload()


@pytest.fixture(scope="module", params=["qwen_vl_2b", "qwen3_vl_2b"])
def vlm(request, tiny_models_dir):
    yield from tiny_vlm(tiny_models_dir, request.param)


def test_vlm_batch_with_images_matches_solo_runs(vlm):
    params = greedy(6)
    encoded = [vlm.encode(m, None) for m in VLM_REQUESTS]
    grids = [tuple(map(tuple, e.vision["image_grid_thw"].tolist())) for e in encoded if e.vision]
    assert len(set(grids)) == len(grids)  # really different image sizes
    assert not encoded[-1].vision
    solo = [alone(vlm, m, None, params)[0] for m in VLM_REQUESTS]
    batch = run_batch(vlm.engine_backend(), [(m, None, params) for m in VLM_REQUESTS])
    assert [t for t, _ in batch] == solo
    for (_, handle), e in zip(batch, encoded):
        assert handle.usage.prompt_tokens == len(e.input_ids) and handle.usage.completion_tokens == 6


def test_vlm_image_request_joining_a_running_batch(vlm):
    """Image requests prefilled while others decode keep their own multimodal RoPE offsets."""
    lengths = [7, 4, 6, 5, 8]
    solo = [alone(vlm, m, None, greedy(n))[0] for m, n in zip(VLM_REQUESTS, lengths)]

    async def main():
        async with engine_over(vlm.engine_backend()) as engine:
            engine.start()
            first = [engine.submit(engine.encode(m, None), greedy(n), CancelToken())
                     for m, n in zip(VLM_REQUESTS[:2], lengths[:2])]
            iters = [h.__aiter__() for h in first]
            heads = [(await it.__anext__()).text for it in iters]
            late = [engine.submit(engine.encode(m, None), greedy(n), CancelToken())
                    for m, n in zip(VLM_REQUESTS[2:], lengths[2:])]

            async def rest(head, it):
                return head + "".join([d.text async for d in it])

            texts = await asyncio.gather(*(rest(h, it) for h, it in zip(heads, iters)),
                                         *(collect(h) for h in late))
            return [t if isinstance(t, str) else t[0] for t in texts]

    assert asyncio.run(main()) == solo
