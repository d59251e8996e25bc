"""OpenAI surface, pure units: request -> GenerateInput conversion, content parts, data: URLs,
and the stream chunk serializers."""
from __future__ import annotations

import base64
import io
from dataclasses import replace

import pytest
from PIL import Image
from pydantic import ValidationError

from core.errors import BadRequest, DeadlineExceeded, ModelNotFound, PayloadTooLarge
from core.types import GenerationParams
from llm.types import GenerateOutput, ImagePart, StreamDelta, Usage
from server.schemas.openai_compat import ChatCompletionRequest, CompletionRequest, image_bytes
from server.schemas.openai_responses import ChatChunks, CompletionChunks, chat_completion, completion

MAX = 1000


class FakeResolver:
    """Stands in for services.llm: picks 'text' or 'vlm' by default, defaults of 64 tokens."""

    def __init__(self) -> None:
        self.selected: list[tuple[str | None, bool]] = []

    def select(self, model, *, images=False):
        self.selected.append((model, images))
        if model == "missing":
            raise ModelNotFound(f"Model '{model}' not found", param="model")
        return model or ("vlm" if images else "text")

    def params_for(self, model_id, **overrides):
        base = GenerationParams(max_new_tokens=64, temperature=0.0, top_p=0.9)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def png(w=8, h=6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat(**body):
    body.setdefault("model", "text")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate(body)


def convert(req, resolver=None, max_bytes=MAX):
    return req.to_generate_input(resolver or FakeResolver(), max_image_bytes=max_bytes)


# ---- chat conversion ---------------------------------------------------------------------
def test_text_chat_converts_roles_and_params():
    resolver = FakeResolver()
    inp = convert(chat(model="qwen", messages=[{"role": "developer", "content": "be brief"},
                                               {"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": None},
                                               {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}]}],
                       temperature=0.5, top_p=0.8, seed=7, stop="END", top_k=-1, repetition_penalty=1.1,
                       ignore_eos=True, user="someone", presence_penalty=0, frequency_penalty=0.0,
                       response_format={"type": "text"}, logprobs=False, tool_choice="none", n=1), resolver)
    assert inp.model == "qwen" and inp.prompt is None and resolver.selected == [("qwen", False)]
    assert [(m.role, m.content) for m in inp.messages] == [("system", "be brief"), ("user", "hi"),
                                                            ("assistant", ""), ("user", "a\nb")]
    p = inp.params
    assert (p.temperature, p.top_p, p.seed, p.stop, p.top_k, p.repetition_penalty, p.ignore_eos) == \
        (0.5, 0.8, 7, ("END",), 0, 1.1, True)
    assert p.max_new_tokens == 64  # not given: the model's default


@pytest.mark.parametrize("name", [None, "", "default", " Default "])
def test_default_model_names_select_the_default(name):
    resolver = FakeResolver()
    assert convert(chat(model=name), resolver).model == "text"
    assert resolver.selected == [(None, False)]


def test_max_completion_tokens_wins_over_max_tokens():
    assert convert(chat(max_tokens=10)).params.max_new_tokens == 10
    assert convert(chat(max_tokens=10, max_completion_tokens=3)).params.max_new_tokens == 3
    assert convert(chat(max_completion_tokens=5)).params.max_new_tokens == 5


def test_stop_list_and_empty_entries():
    assert convert(chat(stop=["a", "", "b"])).params.stop == ("a", "b")
    assert convert(chat(stop=[])).params.stop == ()
    with pytest.raises(BadRequest) as e:
        convert(chat(stop=["a", "b", "c", "d", "e"]))
    assert e.value.param == "stop"


def test_image_part_is_decoded_and_selects_a_vision_model():
    resolver = FakeResolver()
    raw = png()
    inp = convert(chat(model=None, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": data_url(raw), "detail": "low"}}]}]), resolver)
    assert inp.model == "vlm" and resolver.selected == [(None, True)]
    content = inp.messages[0].content
    assert content == ("what is this?", ImagePart(raw))


def test_unknown_fields_are_ignored():
    req = chat(foo=1, extra_body={"x": 1}, metadata={"a": "b"}, store=False)
    assert convert(req).model == "text"


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "logprobs"),
])
def test_unsupported_parameters_are_400(body, param):
    with pytest.raises(BadRequest) as e:
        convert(chat(**body))
    assert e.value.status_code == 400 and e.value.code == "UNSUPPORTED_PARAMETER" and e.value.param == param


@pytest.mark.parametrize("body", [
    {"temperature": 2.5}, {"temperature": -0.1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0},
    {"n": 0}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}, {"top_k": -2},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
])
def test_malformed_values_fail_validation(body):
    with pytest.raises(ValidationError):
        chat(**body)


def test_tool_role_is_400():
    with pytest.raises(BadRequest) as e:
        convert(chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "42",
                                                                  "tool_call_id": "1"}]))
    assert e.value.code == "UNSUPPORTED_ROLE" and e.value.param == "messages.1.role"
    with pytest.raises(BadRequest) as e:
        convert(chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]))
    assert e.value.param == "messages.0.tool_calls"


def test_unsupported_parts_and_misplaced_images_are_400():
    with pytest.raises(BadRequest) as e:
        convert(chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]))
    assert e.value.code == "UNSUPPORTED_CONTENT" and e.value.param == "messages.0.content.0.type"
    with pytest.raises(BadRequest) as e:
        convert(chat(messages=[{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png())}}]}]))
    assert e.value.code == "UNSUPPORTED_CONTENT"
    with pytest.raises(BadRequest) as e:
        convert(chat(messages=[{"role": "user", "content": None}]))
    assert e.value.code == "MISSING_CONTENT"


def test_unsupported_checks_run_before_model_selection():
    resolver = FakeResolver()
    with pytest.raises(BadRequest):
        convert(chat(model="missing", n=3), resolver)
    assert resolver.selected == []
    with pytest.raises(ModelNotFound):
        convert(chat(model="missing"), resolver)


# ---- data: URLs ----------------------------------------------------------------------------
def test_data_url_decodes_and_tolerates_line_breaks():
    raw = png()
    assert image_bytes(data_url(raw), max_bytes=MAX, param="p") == raw
    wrapped = "data:image/png;base64," + "\n".join(base64.encodebytes(raw).decode().split())
    assert image_bytes(wrapped, max_bytes=MAX, param="p") == raw
    assert image_bytes(data_url(raw, "application/octet-stream"), max_bytes=MAX, param="p") == raw


@pytest.mark.parametrize("url, code", [
    ("https://example.com/cat.png", "IMAGE_URL_NOT_ALLOWED"),
    ("HTTP://example.com/cat.png", "IMAGE_URL_NOT_ALLOWED"),
    ("file:///etc/passwd", "INVALID_IMAGE_URL"),
    ("just text", "INVALID_IMAGE_URL"),
    ("data:image/png,rawbytes", "INVALID_IMAGE_URL"),
    ("data:image/png;base64", "INVALID_IMAGE_URL"),
    ("data:image/png;base64,", "INVALID_IMAGE_URL"),
    ("data:image/png;base64,not*base64!", "INVALID_IMAGE_URL"),
    ("data:image/png;base64,QUJDR", "INVALID_IMAGE_URL"),
])
def test_bad_image_urls_are_400(url, code):
    with pytest.raises(BadRequest) as e:
        image_bytes(url, max_bytes=MAX, param="messages.0.content.1.image_url.url")
    assert e.value.status_code == 400 and e.value.code == code
    assert e.value.param == "messages.0.content.1.image_url.url"
    if code == "IMAGE_URL_NOT_ALLOWED":
        assert "not enabled" in e.value.message and "data:" in e.value.message


def test_image_size_is_checked_before_decoding():
    exact = b"x" * MAX
    assert image_bytes(data_url(exact), max_bytes=MAX, param="p") == exact
    with pytest.raises(PayloadTooLarge) as e:  # one byte more: caught on the decoded size
        image_bytes(data_url(exact + b"y"), max_bytes=MAX, param="p")
    assert e.value.status_code == 413
    # Far too long: refused on the encoded length, even though it is not valid base64 at all.
    with pytest.raises(PayloadTooLarge):
        image_bytes("data:image/png;base64," + "!" * (MAX * 2), max_bytes=MAX, param="p")


def test_oversized_image_in_request_is_413():
    big = data_url(b"x" * (MAX + 10))
    with pytest.raises(PayloadTooLarge) as e:
        convert(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]))
    assert e.value.code == "FILE_TOO_LARGE" and e.value.param == "messages.0.content.0.image_url.url"


# ---- completions conversion ----------------------------------------------------------------
def test_completion_prompt_is_raw():
    resolver = FakeResolver()
    inp = CompletionRequest(model="default", prompt="Once upon", max_tokens=5).to_generate_input(resolver)
    assert inp.prompt == "Once upon" and inp.messages is None and inp.model == "text"
    assert inp.params.max_new_tokens == 5
    assert CompletionRequest(prompt=["one"]).to_generate_input(FakeResolver()).prompt == "one"


@pytest.mark.parametrize("body, param", [
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": [[1, 2]]}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "suffix": "end"}, "suffix"), ({"prompt": "x", "logprobs": 1}, "logprobs"),
    ({"prompt": "x", "n": 2}, "n"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"),
])
def test_completion_unsupported_is_400(body, param):
    with pytest.raises(BadRequest) as e:
        CompletionRequest.model_validate(body).to_generate_input(FakeResolver())
    assert e.value.status_code == 400 and e.value.param == param


# ---- responses and stream chunks -----------------------------------------------------------
OUT = GenerateOutput(text="hello", finish_reason="length", usage=Usage(3, 2), model="text", latency=0.1, ttft=0.01)


def test_non_stream_responses():
    c = chat_completion(OUT).model_dump()
    assert c["id"].startswith("chatcmpl-") and c["object"] == "chat.completion" and isinstance(c["created"], int)
    assert c["model"] == "text" and c["system_fingerprint"] is None
    assert c["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                             "finish_reason": "length", "logprobs": None}]
    assert c["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    t = completion(OUT).model_dump()
    assert t["id"].startswith("cmpl-") and t["object"] == "text_completion"
    assert t["choices"] == [{"text": "hello", "index": 0, "finish_reason": "length", "logprobs": None}]


def run(chunks, deltas):
    events = []
    for d in deltas:
        events += chunks.on_delta(d)
    return events + chunks.end()


DELTAS = [StreamDelta("he"), StreamDelta(""), StreamDelta("llo"), StreamDelta("", "stop", Usage(3, 2))]


def test_chat_chunks_sequence():
    ser = ChatChunks("text")
    events = run(ser, DELTAS)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {ser.id} and ser.id.startswith("chatcmpl-")
    assert {c["created"] for c in chunks} == {ser.created}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "text" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "he"},
                                                          {"content": "llo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]


def test_chat_chunks_with_usage_and_text_on_the_last_delta():
    events = run(ChatChunks("text", include_usage=True), [StreamDelta("abc", "length", Usage(4, 1))])
    role, content, final, usage, done = events
    assert role["usage"] is None and content["choices"][0]["delta"] == {"content": "abc"}
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert final["usage"] is None
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 1,
                                                         "total_tokens": 5}
    assert done == "[DONE]"


def test_completion_chunks_sequence():
    ser = CompletionChunks("text", include_usage=True)
    events = run(ser, DELTAS)
    assert ser.id.startswith("cmpl-") and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["he", "llo", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5


def test_error_event_in_openai_shape():
    ser = ChatChunks("text")
    ser.on_delta(StreamDelta("x"))
    [event] = ser.on_error(DeadlineExceeded("generation did not finish within 1 s"))
    assert event == {"error": {"message": "generation did not finish within 1 s", "type": "server_error",
                               "param": None, "code": "DEADLINE_EXCEEDED"}}
    assert ser.end() == ["[DONE]"]
