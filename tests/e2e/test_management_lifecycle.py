"""The lifecycle end to end on a tiny checkpoint, on SQLite and PostgreSQL: create, start,
generate through four surfaces, stop (then 503 MODEL_NOT_RUNNING elsewhere), restart, logs
(followed as SSE), resource and timeout failures, and delete of a running model."""
from __future__ import annotations

import json
import threading
import time

import openai
import pytest
import requests

from tests.e2e.management_api import ADMIN_PASSWORD, Api, assert_seed_error, backend_env
from tests.server_process import RemoteServer

TINY_TEXT = "qwen2_5_0_5b"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tiny_models_dir):
    env = {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, **backend_env(request)}
    with RemoteServer(models_dir=tiny_models_dir, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server, tiny_models_dir):
    a = Api(server.url)
    r = a.post("/api/models", json={"name": "life", "framework": "transformers",
                                    "config": {"model_path": str(tiny_models_dir / TINY_TEXT), "max_tokens": 8}})
    assert r.status_code == 201, r.text
    return a


def test_full_lifecycle_through_four_surfaces(api, server):
    assert api.get("/api/models/life").json()["status"] == "created"
    task = api.act("life", "start")
    assert task["status"] == "succeeded" and task["action"] == "start" and task["error"] is None
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    item = api.get("/api/models/life").json()
    assert (item["status"], item["health"]) == ("running", "healthy") and item["resource_usage"]["memory"] > 0

    # 1. the management surface: seed 004's generate, JSON and stream
    r = api.post("/api/models/life/generate", json={"prompt": "Hello, how are you?", "max_tokens": 5,
                                                    "temperature": 0.7, "top_p": 0.9, "top_k": 40, "stop": ["Human:"]})
    body = r.json()
    assert r.status_code == 200 and set(body) == {"id", "model", "choices", "usage", "created"}
    assert body["model"] == "life" and body["choices"][0]["index"] == 0 and body["choices"][0]["finish_reason"]
    assert body["usage"]["completion_tokens"] <= 5
    with api.post("/api/models/life/generate", json={"prompt": "Tell me a story", "max_tokens": 4, "stream": True},
                  stream=True) as r:
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(e["id"] == events[0]["id"] and e["choices"][0]["index"] == 0 for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    chat = api.post(f"/api/models/{api.get('/api/models/life').json()['id']}/chat/completions",
                    json={"messages": HELLO, "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    # 2. OpenAI, through the SDK
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        c = client.chat.completions.create(model="life", messages=HELLO, max_tokens=3)
        assert c.model == "life" and c.usage.completion_tokens == 3
    # 3. spec v1 and 4. LLaMA-Local
    r = requests.post(server.url + "/api/v1/generate", json={"prompt": "Hi", "model": "life", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == "life"
    r = requests.post(server.url + "/generate", json={"prompt": "Hi", "model": "life", "max_tokens": 3,
                                                      "stream": False})
    assert r.status_code == 200, r.text

    task = api.act("life", "stop")
    assert task["status"] == "succeeded"
    assert api.get("/api/models/life").json()["status"] == "stopped"
    # stopped through the API: no lazy load anywhere, 503 MODEL_NOT_RUNNING in each surface's shape
    r = requests.post(server.url + "/v1/chat/completions", json={"model": "life", "messages": HELLO})
    assert r.status_code == 503 and r.json()["error"]["code"] == "MODEL_NOT_RUNNING"
    r = requests.post(server.url + "/api/v1/generate", json={"prompt": "Hi", "model": "life"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "MODEL_NOT_RUNNING"
    r = requests.post(server.url + "/models/life/load")
    assert r.status_code == 503 and r.json()["code"] == "MODEL_NOT_RUNNING"
    assert_seed_error(api.post("/api/models/life/generate", json={"prompt": "Hi"}), 503, "MODEL_NOT_RUNNING")
    assert api.get("/api/models/life").json()["status"] == "stopped"

    task = api.act("life", "restart")
    assert task["status"] == "succeeded" and api.get("/api/models/life").json()["status"] == "running"
    perf = api.get("/api/models/life").json()["performance_stats"]
    assert perf["total_requests"] >= 3 and perf["error_rate"] > 0  # the 503 counted as a failure

    logs = api.get("/api/models/life/logs", params={"lines": 100}).json()["logs"]
    messages = [entry["message"] for entry in logs]
    assert any(m == "starting" for m in messages) and any(m.startswith("running: loaded in") for m in messages)
    assert "stopped" in messages and any(m.startswith("generate -> 200") for m in messages)
    assert any("MODEL_NOT_RUNNING" in m or "-> 503" in m for m in messages)
    assert all(set(e) == {"timestamp", "level", "message"} for e in logs)
    text = json.dumps(logs)
    assert "Hello, how are you" not in text and "Tell me a story" not in text  # no prompt text in logs
    assert len(api.get("/api/models/life/logs", params={"lines": 2}).json()["logs"]) == 2


def test_models_never_touched_keep_lazy_loading(server):
    r = requests.post(server.url + "/api/v1/generate", json={"prompt": "Hi", "model": TINY_TEXT, "max_tokens": 2})
    assert r.status_code == 200


def test_follow_logs_streams_new_lines(api):
    got: list[dict] = []
    ready = threading.Event()

    def follow():
        with api.get("/api/models/life/logs", params={"lines": 1, "follow": "true"}, stream=True, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                    ready.set()
                    if any(g["message"].startswith("generate -> 200") for g in got):
                        return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert ready.wait(30)  # the last line came first
    r = api.post("/api/models/life/generate", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code in (200, 503)
    t.join(30)
    assert not t.is_alive() and len(got) >= 2


def test_resource_and_timeout_failures_show_as_error(api, tiny_models_dir):
    r = api.post("/api/models", json={"name": "needs-gpu", "framework": "transformers",
                                      "config": {"model_path": str(tiny_models_dir / TINY_TEXT)},
                                      "resource_requirements": {"gpu_count": 1}})
    assert r.status_code == 201
    task = api.act("needs-gpu", "start")
    assert (task["status"], task["error_code"]) == ("failed", "INSUFFICIENT_RESOURCES") and task["error"]
    item = api.get("/api/models/needs-gpu").json()
    assert item["status"] == "error" and item["health"] == "unhealthy" and "GPU" in item["reason"]

    r = api.post("/api/models", json={"name": "slow", "framework": "transformers",
                                      "config": {"model_path": str(tiny_models_dir / "qwen_vl_2b")}})
    assert r.status_code == 201
    task = api.act("slow", "start", timeout=0.001)
    assert (task["status"], task["error_code"]) == ("failed", "OPERATION_TIMEOUT")
    assert api.get("/api/models/slow").json()["status"] in ("starting", "running", "error")


def test_lifecycle_input_is_checked(api):
    assert_seed_error(api.post("/api/models/nope/start"), 404, "MODEL_NOT_FOUND")
    for body in ({"force": "yes"}, {"timeout": -1}, {"timeout": 10**9}, {"extra": True}):
        assert_seed_error(api.post("/api/models/life/start", json=body), 422, "INVALID_REQUEST")
    assert_seed_error(api.get("/api/tasks/task-nope"), 404, "TASK_NOT_FOUND")


def test_force_stop_cancels_in_flight_and_delete_stops_first(api, server):
    api.act("life", "start")
    results = {}

    def long_stream():
        with requests.post(server.url + "/v1/chat/completions", stream=True, timeout=60, json={
                "model": "life", "messages": HELLO, "max_tokens": 4000, "stream": True, "ignore_eos": True}) as r:
            results["lines"] = [ln for ln in r.iter_lines(decode_unicode=True) if ln]

    t = threading.Thread(target=long_stream, daemon=True)
    t.start()
    time.sleep(1.0)
    started = time.monotonic()
    task = api.act("life", "stop", force=True)
    assert task["status"] == "succeeded" and time.monotonic() - started < 20
    t.join(30)
    assert results["lines"][-1] == "data: [DONE]"  # the stream ended properly, not cut
    assert api.get("/api/models/life").json()["status"] == "stopped"

    api.act("life", "start")
    r = api.delete("/api/models/life")
    assert r.status_code == 200
    assert_seed_error(api.get("/api/models/life"), 404, "MODEL_NOT_FOUND")
    r = requests.post(server.url + "/v1/chat/completions", json={"model": "life", "messages": HELLO})
    assert r.status_code == 404
