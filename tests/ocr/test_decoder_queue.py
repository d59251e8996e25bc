"""The shared image decoder's queue is bounded: past limits.decode_queue waiting uploads, a new
one is refused at once (503 OVERLOADED + Retry-After) instead of waiting behind the others."""
from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from core.config import LimitsSettings
from core.errors import Overloaded
from ocr.pages import ImageDecoder


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, "PNG")
    return buf.getvalue()


def test_a_full_decode_queue_refuses_at_once():
    decoder = ImageDecoder(LimitsSettings(decode_concurrency=1, decode_queue=2))
    data = png()

    async def scenario():
        await decoder._slots.acquire()  # the one decode slot is busy
        waiting = [asyncio.create_task(decoder.decode(data, target_max_pixels=None, all_frames=False))
                   for _ in range(2)]
        await asyncio.sleep(0.01)
        assert decoder.waiting == 2
        with pytest.raises(Overloaded) as refused:
            await decoder.decode(data, target_max_pixels=None, all_frames=False)
        assert refused.value.headers["Retry-After"] == "1"
        decoder._slots.release()
        done = await asyncio.gather(*waiting)
        assert [d.original_size for d in done] == [(64, 48), (64, 48)] and decoder.waiting == 0
        # with a free slot nothing is refused, even at decode_queue 0
        zero = ImageDecoder(LimitsSettings(decode_concurrency=1, decode_queue=0))
        assert (await zero.decode(data, target_max_pixels=None, all_frames=False)).original_size == (64, 48)

    asyncio.run(scenario())
