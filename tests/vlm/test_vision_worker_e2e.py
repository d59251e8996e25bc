"""Image requests through a real server process with the engine's vision worker on (the
default): concurrent replies equal the one-at-a-time ones, and bad images sent among them get
their clear 4xx while the good ones are served."""
from __future__ import annotations

import asyncio
import base64
import io
import random

import openai
import pytest
from PIL import Image, ImageDraw

from tests.server_process import RemoteServer

pytestmark = pytest.mark.timeout(300)
VLM = "qwen_vl_2b"


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def png(size, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(image).text((4, 4), f"No. {seed}", fill=(0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def chat(raw: bytes, text: str = "Read all the text in this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(raw)}}]}]


GOOD = [chat(png(size, seed)) for seed, size in enumerate([(224, 168), (96, 200), (300, 64), (120, 120),
                                                            (160, 90), (64, 64)])]
corrupt = bytearray(png((224, 168), 9))
corrupt[60] ^= 0xFF  # inside IDAT: the CRC no longer matches
BAD = [(chat(bytes(corrupt)), 400, "INVALID_IMAGE"),
       (chat(png((1000, 4), 10)), 400, "IMAGE_ASPECT_RATIO"),  # Qwen's resize cannot take it
       (chat(b"plain text, not pixels"), 415, None)]


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    with RemoteServer(models_dir=tiny_models_dir) as srv:
        yield srv


async def ask(client, messages):
    try:
        r = await client.chat.completions.create(model=VLM, messages=messages, max_tokens=8, temperature=0)
        return r.choices[0].message.content
    except openai.APIStatusError as e:
        return e


def test_concurrent_image_requests_with_bad_images_among_them(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            alone = [await ask(client, m) for m in GOOD]
            mixed = GOOD[:3] + [m for m, _, _ in BAD] + GOOD[3:]
            together = await asyncio.gather(*(ask(client, m) for m in mixed))
            return alone, together

    alone, together = asyncio.run(main())
    assert all(isinstance(t, str) and t for t in alone), alone
    errors = together[3:3 + len(BAD)]
    assert together[:3] + together[3 + len(BAD):] == alone
    for error, (_, status, code) in zip(errors, BAD):
        assert isinstance(error, openai.APIStatusError) and error.status_code == status, error
        assert set(error.body) == {"message", "type", "param", "code"}
        if code:
            assert error.body["code"] == code
    # the engine is still serving images afterwards
    again = asyncio.run(_one(server.url, GOOD[0]))
    assert again == alone[0]


async def _one(url, messages):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        return await ask(client, messages)
