"""EasyVizAI surface (seed 001) in-process: schemas, the session store, the REST routes and the
WebSocket protocol, over the real model selection with generation replaced by a counting fake."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from core.config import load_settings
from core.errors import Overloaded
from core.types import Capability, GenerationParams
from llm.service import GenerationService
from llm.types import ChatMessage, StreamDelta, Usage
from server.app import create_app
from server.chat_sessions import ChatSessionStore
from server.schemas.easyviz import (AssistantChunkFrame, AssistantEndFrame, ConnectionFrame, ErrorFrame,
                                    GenerationParameters, ModelSwitchedFrame)
from tests.conftest import ROOT


# ---- schemas ------------------------------------------------------------------------------------
def test_parameters_take_the_seeds_documented_defaults():
    base = GenerationParams(max_new_tokens=512, temperature=0.0, top_p=1.0, top_k=20, repetition_penalty=1.1)
    p = GenerationParameters(temperature=0.8, top_p=0.5, max_length=7, seed=3, stop=["x", ""]).apply(base)
    assert (p.temperature, p.top_p, p.max_new_tokens, p.seed, p.stop) == (0.8, 0.5, 7, 3, ("x",))
    # The seed's table: temperature 0.7, top_p 0.9, max_length 2048, do_sample true.
    d = GenerationParameters().apply(base)
    assert (d.temperature, d.top_p, d.max_new_tokens, d.greedy) == (0.7, 0.9, 2048, False)
    assert (d.top_k, d.repetition_penalty) == (20, 1.1)  # not in the seed: the model's own
    assert GenerationParameters(do_sample=False, temperature=1.2).apply(base).temperature == 0.0
    assert GenerationParameters(do_sample=True).apply(base).temperature == 0.7
    assert GenerationParameters(temperature=0.0).apply(base).greedy


# ---- session store -------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_store_keeps_history_bounded_by_turns_and_chars():
    store = ChatSessionStore(max_turns=3, max_chars=40)
    for i in range(5):
        store.record("a", f"u{i}", f"a{i}")
    s = store.get("a")
    assert [m.content for m in s.history()] == ["u2", "a2", "u3", "a3", "u4", "a4"]
    assert [m.role for m in s.history()] == ["user", "assistant"] * 3
    store.record("a", "x" * 32, "y" * 5)  # 37 chars: only this exchange fits
    assert [m.content for m in store.get("a").history()] == ["x" * 32, "y" * 5]
    assert store.get("a").chars == 37
    store.record("a", "z" * 50, "")  # larger than the cap alone: nothing is kept
    assert store.get("a").history() == [] and store.get("a").chars == 0


def test_store_evicts_least_recently_used_and_idle_sessions():
    clock = Clock()
    store = ChatSessionStore(max_sessions=2, idle_s=60, clock=clock)
    store.set_model("a", "m1")
    store.get("b")
    store.get("a")          # a is now the most recent
    store.get("c")          # evicts b
    assert "b" not in store and "a" in store and "c" in store
    assert store.get("a").model == "m1"
    clock.now += 30
    store.get("c")
    clock.now += 31         # a idle for 61 s, c for 31 s
    assert "a" not in store and "c" in store and len(store) == 1
    assert store.get("a").model is None  # a fresh session


# ---- the app with a fake generator -------------------------------------------------------------------
class CountingLLM(GenerationService):
    """Real selection and defaults; the reply is ``w0 w1 ...`` up to max_new_tokens, one word a delta,
    and prompt_tokens counts the words of every message, so history makes it grow."""

    def __init__(self, real: GenerationService) -> None:
        super().__init__(real.selector, real.manager, real.decoder, real.limits)
        self.delay = 0.0
        self.inputs = []
        self.events: list[str] = []

    async def stream(self, inp, *, timeout_s=None):
        model_id = self.select(inp.model)
        self.inputs.append(inp)
        prompt_tokens = sum(len(m.content.split()) for m in inp.messages)
        last = inp.messages[-1].content
        n = inp.params.max_new_tokens

        async def deltas():
            self.events.append("start")
            try:
                for i in range(n):
                    await asyncio.sleep(self.delay)
                    if "fail-midway" in last and i == 2:
                        raise Overloaded("engine queue is full")
                    end = i == n - 1
                    yield StreamDelta(f"w{i} ", "length" if end else None, Usage(prompt_tokens, n) if end else None)
                self.events.append("finished")
            finally:
                self.events.append("closed")

        return model_id, deltas()

    async def generate(self, inp, *, timeout_s=None):
        from llm.types import GenerateOutput

        model_id, deltas = await self.stream(inp)
        parts, usage, finish = [], None, "stop"
        async for d in deltas:
            parts.append(d.text)
            usage, finish = d.usage or usage, d.finish_reason or finish
        return GenerateOutput("".join(parts), finish, usage, model_id, 0.01, 0.001)


@pytest.fixture
def app(tmp_path, fake_kind, monkeypatch):
    from models import registry

    monkeypatch.setitem(registry.KIND_CAPABILITIES, "fake", frozenset({Capability.CHAT, Capability.GENERATE}))
    models = {"txt": {"name": "Text", "kind": "fake", "hf_repo": "org/txt", "generation": {"max_new_tokens": 6}},
              "txt2": {"name": "Text 2", "kind": "fake"},
              "absent": {"name": "Absent", "kind": "fake", "options": {"installed": False}},
              "ocr_only": {"name": "Tess", "kind": "tesseract"}}
    settings = load_settings(ROOT / "tests" / "empty.yaml", models=models, models_dir=tmp_path / "weights",
                             data_dir=tmp_path / "data",
                             defaults={"ocr": ["ocr_only"], "chat": ["txt"], "text": ["absent", "txt", "txt2"]})
    app = create_app(settings)
    app.state.services.llm = CountingLLM(app.state.services.llm)
    return app


@pytest.fixture
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def llm(client) -> CountingLLM:
    return client.app.state.services.llm


def test_health_and_models(client):
    h = client.get("/api/v1/llm/health/").json()
    assert h == {"status": "healthy", "device": "cpu", "loaded_models": [], "current_model": "txt",
                 "active_sessions": 0, "websocket_connections": 0}
    m = client.get("/api/v1/llm/models/").json()
    assert m["current_model"] == "txt" and m["available_models"] == ["txt", "txt2"] and m["device"] == "cpu"
    by_key = {x["key"]: x for x in m["models"]}
    assert set(by_key) == {"txt", "txt2", "absent"}  # the OCR engine is not a text model
    assert by_key["absent"]["installed"] is False and "no weights" in by_key["absent"]["reason"]


def test_model_detail_load_unload(client):
    d = client.get("/api/v1/llm/models/txt/").json()
    assert d["name"] == "txt" and d["loaded"] is False and d["status"] == "unloaded"
    assert d["config"]["name"] == "org/txt" and d["config"]["type"] == "fake" and d["config"]["max_length"] == 2048  # the seed's default on this surface
    r = client.post("/api/v1/llm/models/txt/load/")
    assert r.status_code == 200 and r.json()["message"] == "Model txt loaded successfully"
    assert client.get("/api/v1/llm/models/txt/").json()["loaded"] is True
    assert client.get("/api/v1/llm/health/").json()["loaded_models"] == ["txt"]
    assert client.post("/api/v1/llm/models/txt/unload/").json()["message"] == "Model txt unloaded successfully"
    assert client.post("/api/v1/llm/models/txt/unload/").json()["message"] == "Model txt was not loaded"


@pytest.mark.parametrize("method,path,status,code", [
    ("get", "/api/v1/llm/models/nope/", 404, "MODEL_NOT_FOUND"),
    ("post", "/api/v1/llm/models/nope/load/", 404, "MODEL_NOT_FOUND"),
    ("get", "/api/v1/llm/models/ocr_only/", 404, "MODEL_CAPABILITY_MISSING"),
    ("post", "/api/v1/llm/models/absent/load/", 503, "MODEL_NOT_INSTALLED"),
])
def test_model_errors_have_the_seed_shape(client, method, path, status, code):
    r = getattr(client, method)(path)
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error", "code"} and body["code"] == code and isinstance(body["error"], str)


def test_generate(client):
    r = client.post("/api/v1/llm/generate/", json={"prompt": "hello there", "parameters": {"max_length": 3}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response"] == "w0 w1 w2 " and body["model"] == "txt" and body["prompt"] == "hello there"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert body["finish_reason"] == "length"
    inp = llm(client).inputs[-1]
    assert inp.messages == [ChatMessage("user", "hello there")] and inp.params.max_new_tokens == 3
    r = client.post("/api/v1/llm/generate/", json={"prompt": "x", "model": "txt2", "parameters": {"max_length": 1}})
    assert r.json()["model"] == "txt2"
    r = client.post("/api/v1/llm/generate/", json={"prompt": "x"})
    assert r.status_code == 200
    params = llm(client).inputs[-1].params  # the seed's documented defaults
    assert (params.max_new_tokens, params.temperature, params.top_p) == (2048, 0.7, 0.9)


@pytest.mark.parametrize("body,status,code", [
    ({"prompt": "x", "model": "nope"}, 404, "MODEL_NOT_FOUND"),
    ({"prompt": "x", "model": "absent"}, 503, "MODEL_NOT_INSTALLED"),
    ({"prompt": ""}, 422, "VALIDATION_ERROR"),
    ({"prompt": "x", "parameters": {"max_length": 5000}}, 422, "VALIDATION_ERROR"),
    ({"prompt": "x", "parameters": {"temperature": 2.5}}, 422, "VALIDATION_ERROR"),
    ({"prompt": "x", "parameters": {"top_p": 0}}, 422, "VALIDATION_ERROR"),
])
def test_generate_errors(client, body, status, code):
    for path in ("/api/v1/llm/generate/", "/api/v1/llm/generate/stream/"):
        r = client.post(path, json=body)
        assert r.status_code == status and r.json()["code"] == code, (path, r.text)
        assert isinstance(r.json()["error"], str)


def sse_data(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def test_stream_shape_and_error_midway(client):
    r = client.post("/api/v1/llm/generate/stream/", json={"prompt": "hi", "parameters": {"max_length": 4}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert sse_data(r.text) == [{"chunk": "w0 "}, {"chunk": "w1 "}, {"chunk": "w2 "}, {"chunk": "w3 "},
                                {"done": True}]
    r = client.post("/api/v1/llm/generate/stream/", json={"prompt": "fail-midway", "parameters": {"max_length": 9}})
    assert sse_data(r.text) == [{"chunk": "w0 "}, {"chunk": "w1 "},
                                {"error": "engine queue is full", "code": "OVERLOADED"}, {"done": True}]


def test_paths_without_trailing_slash_do_not_redirect(client):
    r = client.post("/api/v1/llm/generate", json={"prompt": "a", "parameters": {"max_length": 1}},
                    follow_redirects=False)
    assert r.status_code == 200 and r.json()["response"] == "w0 "
    r = client.post("/api/v1/llm/generate/stream", json={"prompt": "a", "parameters": {"max_length": 1}},
                    follow_redirects=False)
    assert r.status_code == 200 and sse_data(r.text)[-1] == {"done": True}
    for path in ("/api/v1/llm/health", "/api/v1/llm/models", "/api/v1/llm/models/txt"):
        assert client.get(path, follow_redirects=False).status_code == 200
    assert client.post("/api/v1/llm/models/txt/unload", follow_redirects=False).status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/llm/generate/" in paths and "/api/v1/llm/generate" not in paths


# ---- WebSocket ---------------------------------------------------------------------------------------
def answer(ws) -> tuple[list[dict], dict]:
    """Frames until the end of one answer: (chunks and errors, the assistant_end frame)."""
    frames = []
    while True:
        f = ws.receive_json()
        if f["type"] == "assistant_end":
            return frames, f
        frames.append(f)


def test_ws_conversation_keeps_history(client):
    with client.websocket_connect("/ws/chat/s1/") as ws:
        hello = ws.receive_json()
        assert hello == {"type": "connection_established", "session_id": "s1", "model": None, "history_turns": 0}
        ws.send_json({"type": "chat_message", "message": "one two", "parameters": {"max_length": 3},
                      "timestamp": "2024-01-01T12:00:00Z", "stream": True})
        chunks, end = answer(ws)
        assert chunks == [{"type": "assistant_chunk", "chunk": f"w{i} ", "model": "txt"} for i in range(3)]
        for frame, schema in [(hello, ConnectionFrame), (chunks[0], AssistantChunkFrame), (end, AssistantEndFrame)]:
            assert schema.model_validate(frame).model_dump() == frame  # the documented shapes are the real ones
        assert end == {"type": "assistant_end", "model": "txt", "message": "w0 w1 w2 ", "finish_reason": "length",
                       "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}
        ws.send_json({"type": "chat_message", "message": "three", "stream": False, "parameters": {"max_length": 2}})
        chunks, end = answer(ws)
        assert chunks == [] and end["message"] == "w0 w1 "
        assert end["usage"]["prompt_tokens"] == 2 + 3 + 1  # the first exchange went with it
        assert llm(client).inputs[-1].messages == [
            ChatMessage("user", "one two"), ChatMessage("assistant", "w0 w1 w2 "), ChatMessage("user", "three")]
    assert client.get("/api/v1/llm/health/").json()["active_sessions"] == 1
    with client.websocket_connect("/ws/chat/s1") as ws:  # same session, no slash: history resumes
        assert ws.receive_json()["history_turns"] == 2


def test_ws_model_switch_and_per_message_model(client):
    with client.websocket_connect("/ws/chat/s2/") as ws:
        ws.receive_json()
        ws.send_json({"type": "model_switch", "model": "txt2"})
        switched = ws.receive_json()
        assert switched == {"type": "model_switched", "model": "txt2"}
        ModelSwitchedFrame.model_validate(switched)
        ws.send_json({"type": "chat_message", "message": "a", "parameters": {"max_length": 1}})
        assert answer(ws)[1]["model"] == "txt2"
        ws.send_json({"type": "chat_message", "message": "a", "model": "txt", "parameters": {"max_length": 1}})
        assert answer(ws)[1]["model"] == "txt"   # for that message only
        ws.send_json({"type": "chat_message", "message": "a", "parameters": {"max_length": 1}})
        assert answer(ws)[1]["model"] == "txt2"
    with client.websocket_connect("/ws/chat/s2/") as ws:
        assert ws.receive_json()["model"] == "txt2"  # the session remembers its model


@pytest.mark.parametrize("frame,code", [
    ("not json", "INVALID_JSON"),
    ("[1, 2]", "INVALID_FRAME"),
    (json.dumps({"type": "shout"}), "UNKNOWN_TYPE"),
    (json.dumps({"message": "no type"}), "UNKNOWN_TYPE"),
    (json.dumps({"type": ["chat_message"]}), "UNKNOWN_TYPE"),
    (json.dumps({"type": "chat_message", "message": "   "}), "EMPTY_MESSAGE"),
    (json.dumps({"type": "chat_message"}), "VALIDATION_ERROR"),
    (json.dumps({"type": "chat_message", "message": "x" * 32_001}), "MESSAGE_TOO_LONG"),
    (json.dumps({"type": "chat_message", "message": "a", "model": "nope"}), "MODEL_NOT_FOUND"),
    (json.dumps({"type": "chat_message", "message": "a", "model": "absent"}), "MODEL_NOT_INSTALLED"),
    (json.dumps({"type": "chat_message", "message": "a", "parameters": {"max_length": 0}}), "VALIDATION_ERROR"),
    (json.dumps({"type": "model_switch", "model": "nope"}), "MODEL_NOT_FOUND"),
    (json.dumps({"type": "model_switch", "model": "ocr_only"}), "MODEL_CAPABILITY_MISSING"),
    (json.dumps({"type": "model_switch"}), "VALIDATION_ERROR"),
])
def test_ws_bad_input_gets_an_error_frame_and_the_socket_stays_usable(client, frame, code):
    with client.websocket_connect("/ws/chat/s3/") as ws:
        ws.receive_json()
        ws.send_text(frame)
        err = ws.receive_json()
        assert err["type"] == "error" and err["code"] == code and isinstance(err["error"], str), err
        assert ErrorFrame.model_validate(err).model_dump() == err
        ws.send_json({"type": "ping", "timestamp": "t"})
        assert ws.receive_json() == {"type": "pong", "timestamp": "t"}
        ws.send_json({"type": "chat_message", "message": "still here", "parameters": {"max_length": 1}})
        assert answer(ws)[1]["finish_reason"] == "length"


def test_ws_binary_frame_and_bad_session_id(client):
    with client.websocket_connect("/ws/chat/s4/") as ws:
        ws.receive_json()
        ws.send_bytes(b"\x00\x01")
        assert ws.receive_json()["code"] == "INVALID_FRAME"
    with client.websocket_connect("/ws/chat/" + "x" * 200 + "/") as ws:
        assert ws.receive_json()["code"] == "INVALID_SESSION_ID"


def test_ws_error_midway_ends_the_answer_and_is_not_remembered(client):
    with client.websocket_connect("/ws/chat/s5/") as ws:
        ws.receive_json()
        ws.send_json({"type": "chat_message", "message": "fail-midway", "parameters": {"max_length": 9}})
        frames, end = answer(ws)
        assert [f["type"] for f in frames] == ["assistant_chunk", "assistant_chunk", "error"]
        assert frames[-1]["code"] == "OVERLOADED"
        assert end["finish_reason"] == "error" and end["usage"] is None and end["message"] == "w0 w1 "
    with client.websocket_connect("/ws/chat/s5/") as ws:
        assert ws.receive_json()["history_turns"] == 0


def wait_for(predicate, timeout=3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_ws_one_answer_at_a_time_and_cancel(client):
    fake = llm(client)
    fake.delay = 0.02
    with client.websocket_connect("/ws/chat/s6/") as ws:
        ws.receive_json()
        ws.send_json({"type": "chat_message", "message": "long", "parameters": {"max_length": 200}})
        seen = [ws.receive_json()]
        ws.send_json({"type": "chat_message", "message": "second"})
        while seen[-1]["type"] == "assistant_chunk":
            seen.append(ws.receive_json())
        assert seen[-1]["type"] == "error" and seen[-1]["code"] == "BUSY"
        ws.send_json({"type": "cancel"})
        frames, end = answer(ws)
        assert end["finish_reason"] == "cancelled" and end["usage"] is None
        shown = "".join(f["chunk"] for f in seen + frames if f["type"] == "assistant_chunk")
        assert end["message"] == shown and shown.startswith("w0 ") and len(shown.split()) < 200
        assert fake.events[-1] == "closed" and "finished" not in fake.events
        ws.send_json({"type": "cancel"})  # nothing to cancel: no frame
        ws.send_json({"type": "chat_message", "message": "next", "parameters": {"max_length": 1}})
        assert answer(ws)[1]["finish_reason"] == "length"
    with client.websocket_connect("/ws/chat/s6/") as ws:
        assert ws.receive_json()["history_turns"] == 1  # the cancelled answer was not kept


def test_ws_disconnect_mid_answer_cancels_generation(client):
    fake = llm(client)
    fake.delay = 0.02
    with client.websocket_connect("/ws/chat/s7/") as ws:
        ws.receive_json()
        ws.send_json({"type": "chat_message", "message": "long", "parameters": {"max_length": 500}})
        assert ws.receive_json()["type"] == "assistant_chunk"
    assert wait_for(lambda: fake.events[-1:] == ["closed"]), fake.events
    assert "finished" not in fake.events
    assert wait_for(lambda: client.get("/api/v1/llm/health/").json()["websocket_connections"] == 0)
