"""Seed 001 (EasyVizAI) against a real server over the tiny checkpoints: the REST routes with
requests (the seed's Python example, its JS stream parsing), and the WebSocket chat with the
``websockets`` package."""
from __future__ import annotations

import json
import time

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

TEXT = "qwen2_5_0_5b"   # the default text model
VLM = "qwen_vl_2b"
MAX = 8                 # tokens per reply: the tiny models never stop by themselves


def api(server, path: str) -> str:
    return f"{server.url}/api/v1/llm/{path}"


def data_events(body: str) -> list[dict]:
    """The seed's JS client: split the body on newlines, JSON-parse every `data: ` line."""
    return [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: ")]


# ---- REST -----------------------------------------------------------------------------------------
def test_health_models_detail_load_unload(tiny_server):
    h = requests.get(api(tiny_server, "health/"), timeout=10).json()
    assert h["status"] == "healthy" and h["device"] == "cpu" and h["current_model"] == TEXT
    m = requests.get(api(tiny_server, "models/"), timeout=10).json()
    assert m["current_model"] == TEXT and {TEXT, VLM} <= set(m["available_models"])
    by_key = {x["key"]: x for x in m["models"]}
    assert by_key["qwen_vl_7b"]["installed"] is False and by_key["qwen_vl_7b"]["reason"]
    assert "rapidocr" not in by_key  # not a text model

    r = requests.post(api(tiny_server, f"models/{TEXT}/load/"), timeout=60)
    assert r.status_code == 200 and r.json()["message"] == f"Model {TEXT} loaded successfully"
    d = requests.get(api(tiny_server, f"models/{TEXT}/"), timeout=10).json()
    assert d["name"] == TEXT and d["loaded"] is True and d["config"]["type"] == "causal_lm"
    assert d["config"]["context_length"] == 4096 and d["active_requests"] == 0
    assert TEXT in requests.get(api(tiny_server, "health/"), timeout=10).json()["loaded_models"]

    r = requests.post(api(tiny_server, f"models/{VLM}/unload"), timeout=60)  # no slash: no redirect
    assert r.status_code == 200 and r.history == []
    r = requests.get(api(tiny_server, "models/nope/"), timeout=10)
    assert r.status_code == 404 and r.json() == {"error": "Model 'nope' not found", "code": "MODEL_NOT_FOUND"}


def test_generate_like_the_seeds_python_example(tiny_server):
    data = {"prompt": "请写一首关于春天的诗", "model": TEXT,
            "parameters": {"temperature": 0.8, "max_length": MAX}}
    response = requests.post(api(tiny_server, "generate/"), json=data, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["response"], str) and body["model"] == TEXT and body["prompt"] == data["prompt"]
    assert body["usage"]["completion_tokens"] == MAX and body["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] > 5  # the chat template wraps the prompt


def test_generate_greedy_is_deterministic_and_the_stream_matches(tiny_server):
    data = {"prompt": "Tell me about spring", "parameters": {"do_sample": False, "max_length": MAX}}
    one = requests.post(api(tiny_server, "generate/"), json=data, timeout=60).json()
    two = requests.post(api(tiny_server, "generate"), json=data, timeout=60, allow_redirects=False).json()
    assert one["response"] == two["response"] and one["model"] == TEXT

    r = requests.post(api(tiny_server, "generate/stream/"), json=data, stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = data_events(r.text)
    assert events[-1] == {"done": True}
    chunks = events[:-1]
    assert chunks and all(set(e) == {"chunk"} and e["chunk"] for e in chunks)
    assert "".join(e["chunk"] for e in chunks) == one["response"]


def test_stream_errors_before_the_stream_are_json(tiny_server):
    r = requests.post(api(tiny_server, "generate/stream/"), json={"prompt": "x", "model": "nope"}, timeout=30)
    assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"
    r = requests.post(api(tiny_server, "generate/stream"), json={"prompt": "x", "parameters": {"max_length": 0}},
                      timeout=30, allow_redirects=False)
    assert r.status_code == 422 and r.json()["code"] == "VALIDATION_ERROR" and "max_length" in r.json()["error"]


# ---- WebSocket ------------------------------------------------------------------------------------
def recv(ws) -> dict:
    return json.loads(ws.recv(timeout=60))


def chat(ws, message: str, max_length: int = MAX, **extra) -> tuple[list[dict], dict]:
    """Send one chat_message; return (the frames before the end frame, the assistant_end frame)."""
    ws.send(json.dumps({"type": "chat_message", "message": message, "stream": True,
                        "timestamp": "2024-01-01T12:00:00Z", "parameters": {"max_length": max_length}, **extra}))
    frames = []
    while (frame := recv(ws))["type"] != "assistant_end":
        frames.append(frame)
    return frames, frame


def opened(server, session: str):
    ws = connect(f"{server.ws_url}/ws/chat/{session}/", open_timeout=10)
    hello = recv(ws)
    assert hello["type"] == "connection_established" and hello["session_id"] == session
    return ws, hello


def test_ws_two_turn_conversation_sends_the_history(tiny_server):
    ws, hello = opened(tiny_server, "e2e_conv")
    with ws:
        assert hello["history_turns"] == 0
        chunks, first = chat(ws, "你好，请介绍一下你自己。")
        assert chunks and all(c["type"] == "assistant_chunk" and c["model"] == TEXT for c in chunks)
        assert "".join(c["chunk"] for c in chunks) == first["message"]
        assert first["finish_reason"] == "length" and first["usage"]["completion_tokens"] == MAX
        _, second = chat(ws, "再说一遍。")
        # the second prompt holds the first exchange too
        assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + MAX
    ws, hello = opened(tiny_server, "e2e_conv")  # a reconnection resumes the session
    with ws:
        assert hello["history_turns"] == 2


def test_ws_model_switch_and_back(tiny_server):
    ws, _ = opened(tiny_server, "e2e_switch")
    with ws:
        ws.send(json.dumps({"type": "model_switch", "model": VLM}))
        assert recv(ws) == {"type": "model_switched", "model": VLM}
        chunks, end = chat(ws, "hello", max_length=4)
        assert end["model"] == VLM and all(c["model"] == VLM for c in chunks) and end["usage"]["completion_tokens"] == 4
        ws.send(json.dumps({"type": "model_switch", "model": TEXT}))
        assert recv(ws) == {"type": "model_switched", "model": TEXT}
        _, end = chat(ws, "and now?", max_length=4)
        assert end["model"] == TEXT


@pytest.mark.parametrize("frame,code", [
    ("{not json", "INVALID_JSON"),
    (json.dumps({"type": "dance"}), "UNKNOWN_TYPE"),
    (json.dumps({"type": "chat_message", "message": ""}), "EMPTY_MESSAGE"),
    (json.dumps({"type": "chat_message", "message": "hi", "model": "nope"}), "MODEL_NOT_FOUND"),
    (json.dumps({"type": "model_switch", "model": "nope"}), "MODEL_NOT_FOUND"),
])
def test_ws_bad_input_gets_error_frames_and_the_socket_stays_usable(tiny_server, frame, code):
    ws, _ = opened(tiny_server, "e2e_errors")
    with ws:
        ws.send(frame)
        err = recv(ws)
        assert err["type"] == "error" and err["code"] == code and isinstance(err["error"], str)
        _, end = chat(ws, "still there?", max_length=2)
        assert end["finish_reason"] == "length"


def engine_active(server) -> int:
    return requests.get(api(server, f"models/{TEXT}/"), timeout=10).json()["active_requests"]


def wait_engine_idle(server, within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while engine_active(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine_active(server) == 0


def test_ws_disconnect_mid_stream_cancels_the_generation(tiny_server):
    ws, _ = opened(tiny_server, "e2e_cancel")
    ws.send(json.dumps({"type": "chat_message", "message": "a very long answer please",
                        "parameters": {"max_length": 4096}}))
    assert recv(ws)["type"] == "assistant_chunk"
    assert engine_active(tiny_server) == 1
    ws.close()
    assert wait_engine_idle(tiny_server)  # stopped in the engine, far before 4096 tokens

    ws, hello = opened(tiny_server, "e2e_cancel")
    with ws:
        assert hello["history_turns"] == 0  # the interrupted answer was not kept
        _, end = chat(ws, "short one", max_length=3)
        assert end["usage"]["completion_tokens"] == 3


def test_ws_busy_and_cancel(tiny_server):
    ws, _ = opened(tiny_server, "e2e_busy")
    with ws:
        ws.send(json.dumps({"type": "chat_message", "message": "long", "parameters": {"max_length": 4096}}))
        assert recv(ws)["type"] == "assistant_chunk"
        ws.send(json.dumps({"type": "chat_message", "message": "second"}))
        while (frame := recv(ws))["type"] == "assistant_chunk":
            pass
        assert frame["type"] == "error" and frame["code"] == "BUSY"
        ws.send(json.dumps({"type": "cancel"}))
        while (frame := recv(ws))["type"] == "assistant_chunk":
            pass
        assert frame["type"] == "assistant_end" and frame["finish_reason"] == "cancelled"
        assert wait_engine_idle(tiny_server)
        _, end = chat(ws, "next", max_length=2)
        assert end["finish_reason"] == "length"


def test_ws_without_trailing_slash(tiny_server):
    with connect(f"{tiny_server.ws_url}/ws/chat/e2e_noslash", open_timeout=10) as ws:
        assert recv(ws)["type"] == "connection_established"
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws)["type"] == "pong"
    with connect(f"{tiny_server.ws_url}/ws/chat/bad%20id/", open_timeout=10) as ws:
        assert recv(ws)["code"] == "INVALID_SESSION_ID"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1008
