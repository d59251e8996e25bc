"""Persistence across server restarts, on SQLite and PostgreSQL: a model that was running comes
back running with the same data directory (and database); one that was stopped stays stopped;
a `kill -9` at any moment loses no committed change; a start that fails at start-up shows as
`error` with the reason, never as a crash."""
from __future__ import annotations

import shutil

import pytest
import requests

from tests.e2e.management_api import ADMIN_PASSWORD, Api, assert_seed_error, backend_env
from tests.server_process import RemoteServer

TINY_TEXT = "qwen2_5_0_5b"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request):
    return {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, **backend_env(request)}


def _chat(url: str, model: str) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2},
                         timeout=120)


def test_desired_state_survives_a_restart(env, tiny_models_dir, tmp_path):
    data, weights = tmp_path / "data", tmp_path / "weights"
    for folder in ("runs", "bad"):  # private copies: one loses its weights while the server is down
        shutil.copytree(tiny_models_dir / TINY_TEXT, weights / folder)
    env = {**env, "CHATVLM_MANAGEMENT__MODEL_ROOTS": f'["{weights}"]'}
    with RemoteServer(models_dir=tiny_models_dir, data_dir=data, env=env) as srv:
        api = Api(srv.url)
        for name, path in (("runs", weights / "runs"), ("halts", tiny_models_dir / TINY_TEXT),
                           ("gone-bad", weights / "bad")):
            r = api.post("/api/models", json={"name": name, "framework": "transformers",
                                              "config": {"model_path": str(path)}})
            assert r.status_code == 201, r.text
        assert api.act("runs", "start")["status"] == "succeeded"
        assert api.act("gone-bad", "start")["status"] == "succeeded"
        assert api.act("halts", "start")["status"] == "succeeded"
        assert api.act("halts", "stop")["status"] == "succeeded"
        assert api.act(TINY_TEXT, "stop")["status"] == "succeeded"  # a config.yaml model, stopped on purpose
    (weights / "bad" / "config.json").unlink()
    with RemoteServer(models_dir=tiny_models_dir, data_dir=data, env=env) as srv:
        api = Api(srv.url)
        assert api.wait_status("runs", "running")["health"] == "healthy"
        assert _chat(srv.url, "runs").status_code == 200
        bad = api.wait_status("gone-bad", "error")
        assert bad["reason"] and bad["health"] == "unhealthy"
        for stopped in ("halts", TINY_TEXT):
            assert api.get(f"/api/models/{stopped}").json()["status"] == "stopped"
            r = _chat(srv.url, stopped)
            assert r.status_code == 503 and r.json()["error"]["code"] == "MODEL_NOT_RUNNING"
        logs = [e["message"] for e in api.get("/api/models/runs/logs").json()["logs"]]
        assert "created (framework transformers, kind causal_lm)" in logs  # lines from before the restart
        assert any("starting it again" in m for m in logs)
        assert srv.proc.poll() is None


def test_kill_9_loses_no_committed_change(env, tiny_models_dir, tmp_path):
    data = tmp_path / "data"
    srv = RemoteServer(models_dir=tiny_models_dir, data_dir=data, env=env)
    try:
        api = Api(srv.url)
        assert api.post("/api/users", json={"username": "keeper", "password": "keeper-pass-1"}).status_code == 201
        r = api.post("/api/models", json={"name": "durable", "framework": "rapidocr", "tags": ["t"]})
        assert r.status_code == 201
        model_id = r.json()["id"]
        assert api.put("/api/models/durable", json={"priority": 9}).status_code == 200
        assert api.act("durable", "start")["status"] == "succeeded"
        r = api.post("/api/models", json={"name": "short-lived", "framework": "tesseract"})
        assert r.status_code == 201 and api.delete("/api/models/short-lived").status_code == 200
        # a task in flight at the moment of the kill
        slow = api.post("/api/models", json={"name": "in-flight", "framework": "transformers",
                                             "config": {"model_path": str(tiny_models_dir / "qwen_vl_2b")}})
        assert slow.status_code == 201
        task_id = api.post("/api/models/in-flight/start").json()["task_id"]
        srv.kill()
    finally:
        srv.stop()
    with RemoteServer(models_dir=tiny_models_dir, data_dir=data, env=env) as srv:
        api = Api(srv.url)
        item = api.get(f"/api/models/{model_id}").json()
        assert item["name"] == "durable" and item["priority"] == 9 and item["tags"] == ["t"]
        api.wait_status("durable", "running")
        assert_seed_error(api.get("/api/models/short-lived"), 404, "MODEL_NOT_FOUND")
        assert "keeper" in [u["username"] for u in api.get("/api/users").json()["items"]]
        task = api.get(f"/api/tasks/{task_id}").json()
        assert task["status"] in ("succeeded", "failed")  # never left "running" forever
        if task["status"] == "failed":
            assert task["error_code"] == "INTERRUPTED"
        api.wait_status("in-flight", "running")  # its desired state was committed before the load began
