"""The engine's vision worker (engine/vision.py) on the tiny Qwen-VL checkpoints (real model
code, random weights): image features computed ahead of admission, in one vision-tower call for
the requests that arrived together, while the running batch keeps decoding.

The reference is the old path: one request at a time with the vision tower inside the prefill
forward (``vision_worker: false``). Greedy replies must be identical.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

from core.errors import ModelUnavailable, ServerError
from core.types import CancelToken
from llm.types import ChatMessage, ImagePart
from tests.engine.test_engine import collect, engine_over, greedy, picture, run_batch, tiny_vlm, wait_until

pytestmark = pytest.mark.timeout(180)

# Eight image requests of different sizes and prompts, and one without an image.
REQUESTS = [
    [ChatMessage("user", (ImagePart(picture(size, seed)), text))]
    for seed, (size, text) in enumerate([
        ((640, 400), "Read all the text in this image."), ((120, 300), "Describe the picture."),
        ((64, 64), "What is it?"), ((300, 90), "Transcribe."), ((90, 90), "Colours?"),
        ((200, 200), "Read all the text in this image."), ((56, 160), "Count the boxes."),
        ((400, 120), "Is there an invoice number?")], start=1)
] + [[ChatMessage("user", "No picture here, just text.")]]


@pytest.fixture(scope="module", params=["qwen_vl_2b", "qwen2_5_vl_3b", "qwen3_vl_2b"])
def vlm(request, tiny_models_dir):
    yield from tiny_vlm(tiny_models_dir, request.param)


def inline_backend(vlm):
    backend = vlm.engine_backend()
    backend.vision_ahead = False  # the vision tower inside the prefill forward, as before
    assert not backend.encodes_images_ahead
    return backend


def counting_backend(vlm):
    """The adapter's backend with its vision-tower calls counted (number of prompts per call)."""
    backend = vlm.engine_backend()
    assert backend.encodes_images_ahead
    calls: list[int] = []
    encode = backend.encode_images

    def counted(prompts):
        todo = [p for p in prompts if p.vision and p.features is None]
        if todo:  # prefill calls it too, for prompts that did not pass the worker (none here)
            calls.append(len(todo))
        encode(prompts)

    backend.encode_images = counted
    return backend, calls


def solo_runs(vlm, lengths):
    return [run_batch(inline_backend(vlm), [(m, None, greedy(n))])[0][0] for m, n in zip(REQUESTS, lengths)]


def test_batched_off_loop_features_match_one_request_at_a_time(vlm):
    """All nine submitted together: one vision-tower call for the eight images, and every reply
    equals its run alone through the inline path."""
    lengths = [6] * len(REQUESTS)
    solo = solo_runs(vlm, lengths)
    backend, calls = counting_backend(vlm)
    batch = run_batch(backend, [(m, None, greedy(n)) for m, n in zip(REQUESTS, lengths)])
    assert [t for t, _ in batch] == solo
    assert calls == [8]  # the text-only request never passes the vision worker


def test_images_arriving_while_others_decode_match_their_solo_runs(vlm):
    """Image requests encoded on the vision worker while earlier ones decode keep their own
    multimodal RoPE offsets and give the same replies."""
    lengths = [12, 9, 5, 7, 6, 8, 4, 10, 6]
    solo = solo_runs(vlm, lengths)
    backend, calls = counting_backend(vlm)

    async def main():
        async with engine_over(backend) as engine:
            engine.start()
            first = [engine.submit(engine.encode(m, None), greedy(n), CancelToken())
                     for m, n in zip(REQUESTS[:2], lengths[:2])]
            iters = [h.__aiter__() for h in first]
            heads = [(await it.__anext__()).text for it in iters]  # both are decoding now
            late = [engine.submit(engine.encode(m, None), greedy(n), CancelToken())
                    for m, n in zip(REQUESTS[2:], lengths[2:])]

            async def rest(head, it):
                return head + "".join([d.text async for d in it])

            texts = await asyncio.gather(*(rest(h, it) for h, it in zip(heads, iters)),
                                         *(collect(h) for h in late))
            return [t if isinstance(t, str) else t[0] for t in texts]

    assert asyncio.run(main()) == solo
    assert sum(calls) == 8  # every image encoded once, on the vision worker


class Gate:
    """Holds the vision worker inside its call (after it took the requests) until opened."""

    def __init__(self, backend) -> None:
        self.entered, self.open = threading.Event(), threading.Event()
        encode = backend.encode_images

        def gated(prompts):
            self.entered.set()
            assert self.open.wait(30)
            encode(prompts)

        backend.encode_images = gated


def test_request_cancelled_while_its_image_is_encoded_is_released(vlm):
    backend = vlm.engine_backend()
    gate = Gate(backend)
    solo = solo_runs(vlm, [5, 5])

    async def main():
        async with engine_over(backend) as engine:
            engine.start()
            victim = engine.submit(engine.encode(REQUESTS[0], None), greedy(5), CancelToken())
            other = engine.submit(engine.encode(REQUESTS[1], None), greedy(5), CancelToken())
            assert await asyncio.to_thread(gate.entered.wait, 10)
            assert engine.waiting_count == 2  # being encoded still counts toward the queue bound
            victim.cancel.cancel()
            gate.open.set()
            (victim_text, _), (other_text, _) = await asyncio.gather(collect(victim), collect(other))
            await wait_until(lambda: engine.waiting_count == 0 and engine.active_count == 0,
                             what="the engine idle again")
            assert victim.finish_reason == "cancelled" and victim_text == ""
            # the engine carries on with new image requests
            again = await collect(engine.submit(engine.encode(REQUESTS[0], None), greedy(5), CancelToken()))
            return other_text, other.finish_reason, again[0]

    other_text, reason, again = asyncio.run(main())
    assert (other_text, reason, again) == (solo[1], "length", solo[0])


def test_stop_while_images_are_encoded_fails_them_with_model_unavailable(vlm):
    backend = vlm.engine_backend()
    gate = Gate(backend)

    async def main():
        async with engine_over(backend) as engine:
            engine.start()
            inside = engine.submit(engine.encode(REQUESTS[0], None), greedy(5), CancelToken())
            assert await asyncio.to_thread(gate.entered.wait, 10)
            queued = engine.submit(engine.encode(REQUESTS[1], None), greedy(5), CancelToken())
            stopping = asyncio.create_task(asyncio.to_thread(engine.stop, 10.0))
            await asyncio.sleep(0.05)
            gate.open.set()
            await stopping
            for handle in (inside, queued):
                with pytest.raises(ModelUnavailable):
                    await collect(handle)

    asyncio.run(main())


def test_images_that_fail_the_vision_tower_fail_alone(vlm):
    """A request whose pixels do not match its image grid (a broken encoding) fails with a
    server error; the requests that shared its vision-tower call still get their replies."""
    solo = solo_runs(vlm, [5, 5, 5])

    async def main():
        async with engine_over(vlm.engine_backend()) as engine:
            prompts = [engine.encode(m, None) for m in REQUESTS[:3]]
            prompts[1].vision["pixel_values"] = prompts[1].vision["pixel_values"][:-8]  # 8 patches short
            handles = [engine.submit(p, greedy(5), CancelToken()) for p in prompts]
            engine.start()
            return await asyncio.gather(*(collect(h) for h in handles), return_exceptions=True)

    good0, bad, good2 = asyncio.run(main())
    assert isinstance(bad, ServerError), bad
    assert (good0[0], good2[0]) == (solo[0], solo[2])
