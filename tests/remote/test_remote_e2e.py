"""Models of kind ``remote`` end to end, against real servers (no mocks): two more instances of our
own server (B and C, behind an API key), ``transformers serve`` on a tiny checkpoint, a plain HTTP
server that hangs (SIGSTOP), an address where nothing listens, and llama.cpp's server when built.

Every surface that generates text runs on a remote model without knowing it; errors keep each
surface's shape; streams pass through token by token; a client that leaves stops the remote."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image
from websockets.sync.client import connect

from tests.e2e.management_api import Api
from tests.remote.conftest import REMOTE_KEY, TEXT, llama_server, remote_env
from tests.server_process import RemoteServer

MAX = 6


def png(w=96, h=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def sse_data(response: requests.Response) -> list:
    """The data of each event of a streamed answer (JSON parsed when it is JSON)."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            data = line[5:].strip()
            try:
                out.append(json.loads(data))
            except ValueError:
                out.append(data)
    return out


@pytest.fixture(scope="module")
def front(remotes):
    return remotes.front


@pytest.fixture(scope="module")
def oai(front):
    with openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        yield client


# ---- every surface on a remote model ---------------------------------------------------------------
def test_openai_surface_streams_token_by_token_with_the_remotes_usage(oai):
    r = oai.chat.completions.create(model="rb", messages=[{"role": "user", "content": "Hello"}], max_tokens=MAX,
                                    temperature=0)
    assert r.model == "rb" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == MAX and r.usage.prompt_tokens > 5  # B's chat template, B's count
    stream = oai.chat.completions.create(model="rb", messages=[{"role": "user", "content": "Hello"}],
                                         max_tokens=MAX, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == r.choices[0].message.content  # greedy on B: the same reply
    assert chunks[-1].usage.completion_tokens == MAX
    c = oai.completions.create(model="rb", prompt="Once upon a time", max_tokens=MAX, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == MAX


def test_seed_surfaces_and_the_websocket_run_on_a_remote(front):
    r = requests.post(front.url + "/generate", json={"prompt": "Hi", "model": "rb", "max_tokens": MAX,
                                                      "stream": False}, timeout=60)  # seed 000
    assert r.status_code == 200, r.text
    r = requests.post(front.url + "/api/v1/generate", json={"prompt": "Hi", "model": "rb", "max_tokens": MAX},
                      timeout=60)  # seed 002
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX, r.text
    with requests.post(front.url + "/api/v1/generate/stream", json={"prompt": "Hi", "model": "rb", "max_tokens": MAX},
                       stream=True, timeout=60) as s:
        assert s.status_code == 200 and len(sse_data(s)) >= 2
    r = requests.post(front.url + "/api/v1/llm/generate/", json={"prompt": "Hi", "model": "rb",
                                                                 "parameters": {"max_length": MAX}}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX, r.text  # seed 001 REST
    with connect(f"{front.ws_url}/ws/chat/remote_ws/", open_timeout=10) as ws:  # seed 001 WebSocket
        assert json.loads(ws.recv(timeout=30))["type"] == "connection_established"
        ws.send(json.dumps({"type": "model_switch", "model": "rb"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "model_switched"
        ws.send(json.dumps({"type": "chat_message", "message": "hello", "stream": True,
                            "parameters": {"max_length": MAX}}))
        frames = []
        while (frame := json.loads(ws.recv(timeout=60)))["type"] != "assistant_end":
            frames.append(frame)
        assert frames and frame["model"] == "rb" and frame["usage"]["completion_tokens"] == MAX
    api = Api(front.url)  # seed 004's per-model inference route, behind its login
    r = api.post("/api/models/rb/generate", json={"prompt": "Hi", "max_tokens": MAX})
    assert r.status_code == 200, r.text


def test_images_go_to_a_vision_remote_as_data_urls(front, oai):
    def ask(*image_parts):
        return oai.chat.completions.create(model="rvl", max_tokens=3, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is in it?"}, *image_parts]}])

    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    plain, with_image = ask(), ask({"type": "image_url", "image_url": {"url": url}})
    # B's processor turned the image into vision tokens: the image reached it
    assert with_image.usage.prompt_tokens > plain.usage.prompt_tokens + 4
    r = requests.post(front.url + "/chat", files={"file": ("a.png", png(), "image/png")},
                      data={"prompt": "Describe", "model": "rvl"}, timeout=60)  # seed 003 /chat
    assert r.status_code == 200 and r.json()["model"] == "rvl", r.text
    r = requests.post(front.url + "/ocr", files={"file": ("a.png", png(), "image/png")},
                      params={"model": "rvl", "max_new_tokens": 4}, timeout=60)  # the VLM OCR prompt
    assert r.status_code == 200 and r.json()["model"] == "rvl", r.text
    r = requests.post(front.url + "/chat", files={"file": ("a.png", png(), "image/png")},
                      data={"prompt": "Describe", "model": "rb"}, timeout=60)  # vision: false: no images
    assert r.status_code == 404 and r.json()["code"] == "MODEL_CAPABILITY_MISSING", r.text


def test_transformers_serve_behind_us(front, remotes):
    # transformers serve answers /health (its /v1/models gives 500): the URL counts as healthy.
    def pieces(url: str, model: str) -> list:
        with requests.post(url + "/v1/chat/completions", stream=True, timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": MAX, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200, r.text
            events = sse_data(r)
        return events, [e["choices"][0]["delta"]["content"] for e in events
                        if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content")]

    events, ours = pieces(front.url, "rts")
    _, direct = pieces(remotes.tserve, str(remotes.models_dir / TEXT))
    assert ours == direct  # the same events, one for one: streamed straight through
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == MAX
    r = requests.post(front.url + "/api/v1/generate", json={"prompt": "Hi", "model": "rts", "max_tokens": MAX},
                      timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX, r.text


def test_llama_cpp_server_behind_us(remotes):
    binary = Path.home() / ".cache" / "chatvlm" / "llama.cpp" / "build" / "bin" / "llama-server"
    from scripts.bench_llm_peers import default_gguf

    gguf = default_gguf()
    if not binary.is_file() or gguf is None:
        pytest.skip("llama-server not built (bash scripts/build_llama_server.sh) or the SmolLM2 GGUF missing")
    with llama_server(binary, gguf) as url, RemoteServer(
            models_dir=remotes.models_dir,
            env=remote_env("rllama", [url], framework="llama.cpp", remote_model="smollm2")) as front:
        with requests.post(front.url + "/v1/chat/completions", stream=True, timeout=120, json={
                "model": "rllama", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8,
                "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200, r.text
            events = sse_data(r)
        assert events[-1] == "[DONE]" and 0 < events[-2]["usage"]["completion_tokens"] <= 8
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e["choices"])


# ---- the client leaves: the remote stops -----------------------------------------------------------------
def test_client_disconnect_stops_the_remote(remotes, front):
    b = remotes.b
    cancelled = remotes.metric(b, "generation_requests_total", model=TEXT, finish_reason="cancelled")
    r = requests.post(front.url + "/v1/completions", stream=True, timeout=60, json={
        "model": "rlong", "prompt": "Tell me everything", "max_tokens": 4000, "stream": True})
    assert r.status_code == 200
    lines = r.iter_lines()
    got = 0
    while got < 3:
        got += bool(next(lines))
    r.close()  # the client leaves after three events of a 4,000-token answer
    deadline = time.monotonic() + 10
    while remotes.metric(b, "generation_requests_total", model=TEXT, finish_reason="cancelled") <= cancelled:
        assert time.monotonic() < deadline, "the remote went on generating"
        time.sleep(0.1)
    tokens = remotes.metric(b, "generation_tokens_total", model=TEXT)
    time.sleep(0.5)
    assert remotes.metric(b, "generation_tokens_total", model=TEXT) == tokens  # nothing more is generated


# ---- failures: each one a status, never a 500 or a hang -----------------------------------------------
def test_no_healthy_backend_is_a_fast_503(front, oai):
    started = time.monotonic()
    r = requests.post(front.url + "/v1/chat/completions", timeout=10, json={
        "model": "rdead", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert time.monotonic() - started < 1.0
    assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["code"] == "BACKEND_UNAVAILABLE"
    r = requests.post(front.url + "/api/v1/generate", json={"prompt": "Hi", "model": "rdead"}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "BACKEND_UNAVAILABLE"  # seed 002's shape
    item = Api(front.url).get("/api/models/rdead").json()
    assert item["status"] == "running" and item["health"] == "unhealthy"  # loaded, but no URL answers


def test_remote_4xx_is_the_same_4xx_with_a_clean_message(front, remotes):
    r = requests.post(front.url + "/v1/chat/completions", timeout=30, json={
        "model": "rmissing", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert "no-such-model" in err["message"] and "127.0.0.1" not in err["message"]
    assert str(remotes.b.port) not in r.text


def test_remote_5xx_is_502_and_bad_credentials_are_502_not_401(front):
    r = requests.post(front.url + "/v1/chat/completions", timeout=30, json={
        "model": "r5xx", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 502 and r.json()["error"]["code"] == "BAD_GATEWAY", r.text
    r = requests.post(front.url + "/api/v1/generate", json={"prompt": "Hi", "model": "rnokey"}, timeout=30)
    assert r.status_code == 502 and "api_key" in r.json()["error"]["message"], r.text


def test_remote_timeout_is_504(front, remotes):
    r = requests.post(front.url + "/api/v1/models/rhung/load", json={}, timeout=30)
    assert r.status_code == 200, r.text
    assert Api(front.url).get("/api/models/rhung").json()["health"] == "healthy"  # /health 404, /v1/models 200
    remotes.hung.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        r = requests.post(front.url + "/v1/chat/completions", timeout=30, json={
            "model": "rhung", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert r.status_code == 504 and r.json()["error"]["code"] == "GATEWAY_TIMEOUT", r.text
        assert time.monotonic() - started < 5
    finally:
        remotes.hung.send_signal(signal.SIGCONT)


def test_max_concurrency_then_queue_then_503(front):
    body = {"model": "rbound", "prompt": "Go on", "max_tokens": 4000, "stream": True}
    first = requests.post(front.url + "/v1/completions", json=body, stream=True, timeout=60)
    assert first.status_code == 200  # holds the one slot
    second: dict = {}

    def queued():
        second["started"] = time.monotonic()
        second["r"] = requests.post(front.url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=60)
        second["done"] = time.monotonic()

    waiter = threading.Thread(target=queued)
    waiter.start()
    time.sleep(1.0)
    assert "done" not in second  # waits in the model's queue (max_queue 1)
    third = requests.post(front.url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=10)
    assert third.status_code == 503 and third.json()["error"]["code"] == "OVERLOADED" and third.headers["Retry-After"]
    released = time.monotonic()
    first.close()  # its slot passes to the queued one
    waiter.join(60)
    assert second["r"].status_code == 200 and second["done"] >= released, second["r"].text


# ---- failover ----------------------------------------------------------------------------------------------
def test_failover_when_a_backend_dies_and_its_return(remotes, front):
    c_port = remotes.c.port
    errors, results, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = requests.post(front.url + "/v1/chat/completions", timeout=30, json={
                    "model": "rfail", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
                (results if r.status_code == 200 else errors).append((time.monotonic(), r.status_code))
            except requests.RequestException as exc:
                errors.append((time.monotonic(), str(exc)))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    served_c = remotes.metric(remotes.c, "generation_requests_total", model=TEXT)
    assert served_c > 0  # both backends take requests
    remotes.c.kill()
    killed = time.monotonic()
    time.sleep(4.0)
    after_open = time.monotonic() - 2.5  # the circuit opens within a probe interval (0.5 s) or two failures
    assert not [e for e in errors if e[0] > killed + 1.5], errors
    assert [r for r in results if r[0] > killed + 1.5]  # served by B meanwhile
    remotes.c = remotes.stack.enter_context(remotes.start_remote(c_port))  # C returns
    deadline = time.monotonic() + 30
    while remotes.metric(remotes.c, "generation_requests_total", model=TEXT) == 0:
        assert time.monotonic() < deadline, "the returned backend is not used again"
        time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(60)
    assert not [e for e in errors if e[0] > after_open], errors


# ---- the registry: created through the API, its key masked and never logged -----------------------------
def test_created_through_the_api_with_the_key_masked(front, remotes):
    api = Api(front.url)
    r = api.post("/api/models", json={"name": "rapi", "framework": "vllm", "config": {
        "base_url": [remotes.b.url + "/v1"], "api_key": REMOTE_KEY, "remote_model": TEXT, "max_concurrency": 4,
        "timeout_s": 60, "vision": False}})
    assert r.status_code == 201, r.text
    item = api.get("/api/models/rapi").json()
    assert item["framework"] == "vllm" and item["kind"] == "remote" and item["config"]["api_key"] == "********"
    assert item["tasks"] == ["generate"]
    listed = {m["name"]: m for m in api.get("/api/models", params={"size": 100}).json()["items"]}
    assert listed["rb"]["config"]["api_key"] == "********" and listed["rb"]["config"]["base_url"] == [remotes.b.url]
    r = requests.post(front.url + "/v1/completions", json={"model": "rapi", "prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    # sending the masked key back with other changes keeps the real one
    r = api.call("PUT", "/api/models/rapi", json={"config": {**item["config"], "max_concurrency": 2}})
    assert r.status_code == 200, r.text
    requests.post(front.url + "/api/v1/models/rapi/unload", timeout=30)
    r = requests.post(front.url + "/v1/completions", json={"model": "rapi", "prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    r = api.post("/api/models", json={"name": "rbad", "framework": "sglang", "config": {"base_url": "ftp://x"}})
    assert r.status_code == 422 and "config.base_url" in r.json()["error"]["message"], r.text
    assert REMOTE_KEY not in front.logs() and REMOTE_KEY not in api.get("/api/models/rb").text
