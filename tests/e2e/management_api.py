"""A small client of the management surface for the end-to-end tests (requests, a bearer token)."""
from __future__ import annotations

import time

import pytest
import requests

ADMIN_PASSWORD = "admin-password-123"


def backend_env(request) -> dict[str, str]:
    """Environment selecting the test's backend: SQLite (the default) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    cluster = request.getfixturevalue("postgres_cluster")
    return {"CHATVLM_DATABASE__URL": cluster.new_database()}


def token(url: str, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
    r = requests.post(url + "/api/auth/token", json={"username": username, "password": password}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


class Api:
    def __init__(self, url: str, bearer: str | None = None, *, username: str = "admin",
                 password: str = ADMIN_PASSWORD) -> None:
        self.url = url
        self.s = requests.Session()
        self.s.headers["Authorization"] = "Bearer " + (bearer or token(url, username, password))

    def call(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        return self.s.request(method, self.url + path, **kw)

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, **kw):
        return self.call("POST", path, **kw)

    def put(self, path, **kw):
        return self.call("PUT", path, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)

    def wait_task(self, task_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.get(f"/api/tasks/{task_id}").json()
            if task["status"] in ("succeeded", "failed"):
                return task
            time.sleep(0.1)
        pytest.fail(f"task {task_id} did not finish in {timeout} s")

    def act(self, model: str, action: str, **body) -> dict:
        r = self.post(f"/api/models/{model}/{action}", json=body or None)
        assert r.status_code == 202, r.text
        assert r.json()["message"]
        return self.wait_task(r.json()["task_id"])

    def wait_status(self, model: str, status: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self.get(f"/api/models/{model}").json()
            if item["status"] == status:
                return item
            time.sleep(0.1)
        pytest.fail(f"model {model} did not become {status}: {item}")


def assert_seed_error(r: requests.Response, status: int, code: str, path: str | None = None) -> dict:
    """Seed 004's error shape: {"error": {"code", "message", "details"}, "timestamp", "path"}."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "timestamp", "path"}, body
    assert set(body["error"]) == {"code", "message", "details"} and body["error"]["code"] == code, body
    assert body["timestamp"].endswith("Z") and body["path"] == (path or r.request.path_url.split("?")[0])
    return body
