"""Seed 000 and seed 002 surfaces without a model: schema validation and conversion to the
service's types, the SSE serializers through the real pipeline (server/sse.py), and the routes'
wiring over a scripted generation service (the real one is exercised end to end in tests/e2e)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.errors import BadRequest, ChatVLMError, DeadlineExceeded, ModelNotFound
from core.types import GenerationParams
from llm.service import GenerationService, ModelInfo
from llm.types import ChatMessage, StreamDelta, Usage
from models.adapter import ModelSpec
from server.app import create_app
from server.schemas import llama_local as ll
from server.schemas import spec_v1 as v1
from server.sse import sse_response
from tests.conftest import fake_settings


# ---- seed 000 schemas ------------------------------------------------------------------------
def test_llama_request_defaults_and_conversion():
    req = ll.GenerateRequest(prompt="Что такое ML?")
    assert req.stream is True and req.model is None
    assert req.messages() == [ChatMessage("user", "Что такое ML?")]
    assert req.param_overrides() == {"max_new_tokens": None, "temperature": None, "top_p": None, "top_k": None,
                                     "repetition_penalty": None}
    req = ll.GenerateRequest(prompt="x", temperature=0.7, max_tokens=512, top_p=0.9, top_k=40, repeat_penalty=1.1,
                             stream=False, model="default")
    assert req.model is None
    assert req.param_overrides() == {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                     "repetition_penalty": 1.1}


@pytest.mark.parametrize("field,value", [
    ("prompt", ""), ("temperature", -0.1), ("temperature", 2.01), ("max_tokens", 0), ("max_tokens", 4097),
    ("top_p", 1.5), ("top_k", 0), ("top_k", 101), ("repeat_penalty", 0.9), ("repeat_penalty", 2.5)])
def test_llama_request_ranges(field, value):
    body = {"prompt": "x", field: value}
    with pytest.raises(ValidationError):
        ll.GenerateRequest.model_validate(body)


def test_llama_model_info_never_shows_a_full_path():
    defaults = GenerationParams(max_new_tokens=256, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1)
    info = ModelInfo(id="qwen2_5_0_5b", name="Qwen2.5 0.5B", kind="causal_lm", context_length=32768, loaded=True,
                     defaults=defaults)
    spec = ModelSpec(id="qwen2_5_0_5b", name="Qwen2.5 0.5B", kind="causal_lm",
                     path=Path("/srv/secret/models/Qwen2.5-0.5B-Instruct"))
    body = ll.ModelInfoResponse.of(info, spec, "cpu").model_dump()
    assert body == {"path": "Qwen2.5-0.5B-Instruct", "loaded": True, "n_ctx": 32768, "n_gpu_layers": 0,
                    "temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "max_tokens": 256,
                    "stream": True, "model": "qwen2_5_0_5b", "name": "Qwen2.5 0.5B"}
    assert ll.ModelInfoResponse.of(info, replace(spec, path=None), "cuda:0").model_dump()["path"] == "qwen2_5_0_5b"
    assert ll.ModelInfoResponse.of(info, spec, "cuda:0").n_gpu_layers == -1


def test_llama_serializers():
    assert ll.delta_events(StreamDelta("Маш")) == ["Маш"]
    assert ll.delta_events(StreamDelta("", "stop", Usage(3, 4))) == []
    assert ll.error_events(DeadlineExceeded("took\ntoo long")) == ["[ERROR] took too long"]
    assert ll.end_events() == ["[DONE]"]


# ---- seed 002 schemas ------------------------------------------------------------------------
def test_v1_request_conversion():
    req = v1.GenerateRequest(prompt="请解释", model="default")
    assert req.stream is False and req.model is None
    assert req.param_overrides()["stop"] is None and req.param_overrides()["seed"] is None
    req = v1.GenerateRequest.model_validate({"prompt": "x", "stop": "\n\n", "seed": 7, "repeat_penalty": 1.2,
                                             "top_k": 0, "temperature": 0})
    assert req.param_overrides() == {"max_new_tokens": None, "temperature": 0.0, "top_p": None, "top_k": 0,
                                     "repetition_penalty": 1.2, "stop": ("\n\n",), "seed": 7}
    assert v1.GenerationFields(prompt="x", stop=["a", "b"]).param_overrides()["stop"] == ("a", "b")
    assert v1.GenerationFields(prompt="x", stop=[]).param_overrides()["stop"] is None


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {"prompt": "x", "temperature": 3}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "top_p": 2},
    {"prompt": "x", "top_k": -1}, {"prompt": "x", "stop": [""]}, {"prompt": "x", "stop": ["s"] * 17},
    {"prompt": "x", "seed": -1}, {"prompt": "x", "stop": 5}, {"max_tokens": 5}])
def test_v1_request_ranges(body):
    with pytest.raises(ValidationError):
        v1.GenerateRequest.model_validate(body)


def test_v1_stream_serializer_ends_with_finished():
    s = v1.V1StreamSerializer()
    assert s.on_delta(StreamDelta("人")) == [{"token": "人", "finished": False}]
    assert s.on_delta(StreamDelta("")) == []
    assert s.end() == [{"token": "", "finished": True, "finish_reason": None, "usage": None}]  # never silent
    assert s.on_delta(StreamDelta("能", "length", Usage(5, 2))) == [
        {"token": "能", "finished": False},
        {"token": "", "finished": True, "finish_reason": "length",
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}]
    assert s.end() == []
    s = v1.V1StreamSerializer()
    assert s.on_error(DeadlineExceeded("late")) == [{"error": {"code": "DEADLINE_EXCEEDED", "message": "late"},
                                                     "finished": True}]
    assert s.end() == []


@pytest.mark.parametrize("quantization, engine", [(None, None), ("none", "none"), ("int8", "int8_weight_only"),
                                                  ("q8_0", "int8_weight_only"),
                                                  ("int8_weight_only", "int8_weight_only"),
                                                  ("q4_0", "int4_weight_only"), ("int4", "int4_weight_only")])
def test_load_maps_the_quantizations_it_can_honour(quantization, engine):
    request = v1.LoadRequest(quantization=quantization)
    request.check()
    assert request.engine_quantization == engine


@pytest.mark.parametrize("quantization", ["q4_k_m", "awq", "int2", "NONE", "INT8", ""])  # the schema's enum, exactly
def test_load_rejects_quantization(quantization):
    with pytest.raises(BadRequest) as exc:
        v1.LoadRequest(quantization=quantization, prefer_gpu=False).check()
    assert exc.value.code == "QUANTIZATION_UNSUPPORTED" and exc.value.param == "quantization"


def test_load_device_warnings():
    warn = v1.LoadRequest(prefer_gpu=True).device_warning
    assert "no GPU" in warn("m", "cpu", "auto", False)
    assert "models.m.device" in warn("m", "cpu", "cpu", True)
    assert warn("m", "cuda", "auto", True) is None
    assert "prefer_gpu=false" in v1.LoadRequest(prefer_gpu=False).device_warning("m", "cuda", "auto", True)
    assert v1.LoadRequest(prefer_gpu=False).device_warning("m", "cpu", "auto", False) is None
    assert v1.LoadRequest().device_warning("m", "cuda", "auto", True) is None


def test_batch_validated_up_front():
    req = v1.BatchRequest(requests=[{"prompt": "a"}, {"prompt": "c", "stop": "x"}])
    assert all(isinstance(item, v1.GenerationFields) for item in req.requests)
    with pytest.raises(ValidationError) as e:
        v1.BatchRequest(requests=[{"prompt": "a"}, {"prompt": "b", "temperature": 9}])
    assert e.value.errors()[0]["loc"] == ("requests", 1, "temperature")
    for requests in ([], [{"prompt": "x"}] * 33):
        with pytest.raises(ValidationError):
            v1.BatchRequest(requests=requests)


# ---- the SSE pipeline with these serializers -------------------------------------------------
async def _deltas(pieces: list[str], fail: ChatVLMError | None = None):
    for p in pieces:
        yield StreamDelta(p)
    if fail:
        raise fail
    yield StreamDelta("", "length", Usage(3, len(pieces)))


def _sse_app(pieces, fail=None) -> TestClient:
    app = FastAPI()

    @app.get("/ll")
    async def _ll():
        return sse_response(_deltas(pieces, fail), on_delta=ll.delta_events, on_error=ll.error_events,
                            end=ll.end_events)

    @app.get("/v1")
    async def _v1():
        s = v1.V1StreamSerializer()
        return sse_response(_deltas(pieces, fail), on_delta=s.on_delta, on_error=s.on_error, end=s.end)

    return TestClient(app)


def seed_000_reader(lines) -> tuple[str, str | None, bool]:
    """Seed 000's streaming loop: (text, error, saw [DONE])."""
    out, error = [], None
    for line in lines:
        if line.startswith("data: "):
            token = line[6:]
            if token == "[DONE]":
                return "".join(out), error, True
            elif token.startswith("[ERROR"):
                error = token
            else:
                out.append(token)
    return "".join(out), error, False


def sse_events(body: str) -> list[str]:
    """A conforming SSE parser: data lines of one event are joined with newlines."""
    events = []
    for block in body.split("\n\n"):
        data = [ln[6:] if ln.startswith("data: ") else ln[5:] for ln in block.split("\n") if ln.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


def test_llama_stream_pipeline_multiline_piece():
    with _sse_app(["Маш", "ина", " line\nnext", " end"]) as c:
        r = c.get("/ll")
    assert r.headers["content-type"].startswith("text/event-stream")
    assert sse_events(r.text) == ["Маш", "ина", " line\nnext", " end", "[DONE]"]
    text, error, done = seed_000_reader(r.text.split("\n"))
    assert (text, error, done) == ("Машина linenext end", None, True)  # the seed's loop drops the newline itself


def test_streams_end_properly_after_a_mid_stream_error():
    with _sse_app(["a", "b"], DeadlineExceeded("generation did not finish within 1 s")) as c:
        ll_body, v1_body = c.get("/ll").text, c.get("/v1").text
    assert sse_events(ll_body) == ["a", "b", "[ERROR] generation did not finish within 1 s", "[DONE]"]
    events = [json.loads(e) for e in sse_events(v1_body)]
    assert events[-1] == {"error": {"code": "DEADLINE_EXCEEDED", "message": "generation did not finish within 1 s"},
                          "finished": True}
    assert [e["token"] for e in events[:-1]] == ["a", "b"]


# ---- routes over a scripted generation service --------------------------------------------------
class ScriptedLLM(GenerationService):
    """Real ``generate`` over a scripted ``stream``: 'tiny' is the one text model; the reply
    echoes the prompt word by word up to max_new_tokens; a prompt 'fail' fails mid-stream."""

    def __init__(self) -> None:
        self.seen: list = []

    def select(self, model, *, images=False):
        if model not in (None, "tiny"):
            raise ModelNotFound(f"Model '{model}' not found", param="model")
        return "tiny"

    def params_for(self, model_id, **overrides):
        return replace(GenerationParams(max_new_tokens=8), **{k: v for k, v in overrides.items() if v is not None})

    async def stream(self, inp, *, timeout_s=None):
        self.seen.append(inp)
        model_id = self.select(inp.model)
        words = [w + " " for w in inp.messages[0].content.split()][:inp.params.max_new_tokens]
        fail = DeadlineExceeded("too slow") if words == ["fail "] else None
        return model_id, _deltas(words, fail)


@pytest.fixture
def client(tmp_path, fake_kind):
    app = create_app(fake_settings(tmp_path, {"fast": {}, "absent": {"installed": False}}))
    llm = app.state.services.llm = ScriptedLLM()
    with TestClient(app, raise_server_exceptions=False) as c:
        c.llm = llm
        yield c


def test_llama_routes(client):
    r = client.post("/generate", json={"prompt": "one two three", "stream": False, "max_tokens": 2, "top_k": 5})
    assert r.json() == {"text": "one two ", "prompt": "one two three", "model": "tiny", "finish_reason": "length",
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    inp = client.llm.seen[-1]
    assert inp.messages == [ChatMessage("user", "one two three")] and inp.params.top_k == 5
    r = client.post("/generate", json={"prompt": "one two"})
    assert sse_events(r.text) == ["one ", "two ", "[DONE]"]
    r = client.post("/generate", json={"prompt": "x", "temperature": 5})
    assert r.status_code == 422 and r.json()["code"] == "VALIDATION_ERROR" and "temperature" in r.json()["detail"]
    r = client.post("/generate", json={"prompt": "x", "model": "nope"})
    assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"


def test_v1_routes(client):
    r = client.post("/api/v1/generate", json={"prompt": "a b c", "max_tokens": 2, "stop": ["z"], "seed": 1})
    body = r.json()
    assert body["text"] == "a b " and body["usage"]["total_tokens"] == 5 and body["latency"] >= 0
    assert client.llm.seen[-1].params.stop == ("z",) and client.llm.seen[-1].params.seed == 1
    for path, extra in (("/api/v1/generate/stream", {}), ("/api/v1/generate", {"stream": True})):
        events = [json.loads(e) for e in sse_events(client.post(path, json={"prompt": "a b", **extra}).text)]
        assert [e["token"] for e in events] == ["a ", "b ", ""] and events[-1]["finished"] is True
    r = client.post("/api/v1/generate", json={"prompt": "x", "top_p": 7})
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR"
    r = client.post("/api/v1/generate", json={"prompt": "x", "model": "llama-2-7b-chat"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_v1_batch_keeps_order_and_isolates_failures(client):
    reqs = [{"prompt": "a"}, {"prompt": "b", "model": "nope"}, {"prompt": "fail"}, {"prompt": "d e", "max_tokens": 1}]
    body = client.post("/api/v1/batch/generate", json={"requests": reqs}).json()
    r = body["results"]
    assert r[0]["text"] == "a " and r[3]["text"] == "d " and r[3]["finish_reason"] == "length"
    assert r[1]["error"]["code"] == "MODEL_NOT_FOUND" and r[2]["error"]["code"] == "DEADLINE_EXCEEDED"
    assert (body["total"], body["successful"], body["failed"]) == (4, 2, 2)
    r = client.post("/api/v1/batch/generate", json={"requests": []})
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR"


def test_v1_models_load_unload(client):
    models = {m["name"]: m for m in client.get("/api/v1/models").json()["models"]}
    assert models["fast"]["installed"] and not models["fast"]["loaded"] and models["fast"]["format"] == "fake"
    assert not models["absent"]["installed"] and models["absent"]["reason"]
    r = client.post("/api/v1/models/fast/load", json={"quantization": "awq", "prefer_gpu": False})
    assert r.status_code == 400 and r.json()["error"]["code"] == "QUANTIZATION_UNSUPPORTED"
    assert client.app.state.services.manager.state("fast").status == "unloaded"
    r = client.post("/api/v1/models/fast/load", json={"quantization": None, "prefer_gpu": True})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "loaded" and body["device"] == "cpu"
    assert "GPU" in body["warning"] and body["already_loaded"] is False
    assert client.post("/api/v1/models/fast/load").json()["already_loaded"] is True  # no body at all
    assert client.get("/api/v1/models").json()["models"][0]["loaded"] is True
    assert client.post("/api/v1/models/fast/unload").json() == {"status": "unloaded", "model": "fast",
                                                                "was_loaded": True}
    r = client.post("/api/v1/models/nope/load")
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"
    r = client.post("/api/v1/models/absent/load")
    assert r.status_code == 503 and r.json()["error"]["code"] == "MODEL_NOT_INSTALLED"


def test_deltas_that_say_more_follows_leave_in_one_write():
    """Events a remote sent in one read (``more``) leave in one body message, still one SSE event each;
    the finish and the end marker leave together."""
    import asyncio

    async def deltas():
        yield StreamDelta("a", more=True)
        yield StreamDelta("b", more=True)
        yield StreamDelta("c")
        yield StreamDelta("d")
        yield StreamDelta("", "stop", Usage(1, 4))

    from server.schemas.openai_responses import ChatChunks

    s = ChatChunks("m", include_usage=True)
    response = sse_response(deltas(), on_delta=s.on_delta, on_error=s.on_error, end=s.end)
    bodies: list[str] = []

    async def receive():
        await asyncio.sleep(3600)  # the client stays: sse-starlette cancels this when the stream ends
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            bodies.append(message["body"].decode())

    asyncio.run(response({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send))
    events = [sse_events(b) for b in bodies]
    assert [len(e) for e in events] == [4, 1, 3], bodies  # the first carries the role chunk too

    def content(event: str) -> str:
        return json.loads(event)["choices"][0]["delta"].get("content", "")

    assert [content(e) for e in events[0]] == ["", "a", "b", "c"] and content(events[1][0]) == "d"
    assert json.loads(events[2][0])["choices"][0]["finish_reason"] == "stop"
    assert json.loads(events[2][1])["usage"]["completion_tokens"] == 4 and events[2][2] == "[DONE]"
