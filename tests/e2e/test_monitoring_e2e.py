"""Issue 11's data half end to end, on SQLite and PostgreSQL: system and GPU status, request records
written by every surface, the sampler's history and its per-bucket aggregates (checked against known
inserted samples), request statistics, and the live configuration taking effect at once."""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone

import pytest
import requests

from store import monitoring as repo
from store.db import Database, sqlite_url
from tests.e2e.management_api import ADMIN_PASSWORD, Api, assert_seed_error, backend_env
from tests.server_process import ROOT, RemoteServer

TINY_TEXT = "qwen2_5_0_5b"
TINY_VLM = "qwen_vl_2b"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tiny_models_dir):
    env = {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, "CHATVLM_MONITORING__GPU_MONITOR_INTERVAL": "1",
           **backend_env(request)}
    with RemoteServer(models_dir=tiny_models_dir, env=env) as srv:
        srv.db_url = env.get("CHATVLM_DATABASE__URL") or sqlite_url(srv.data_dir)
        yield srv


@pytest.fixture(scope="module")
def api(server):
    return Api(server.url)


def _wait(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"{what} not met within {timeout} s")


def test_system_status_and_gpu(api):
    status = api.get("/api/system/status").json()
    assert set(status) == {"status", "version", "uptime", "models", "resources", "gpu"}
    assert status["status"] == "healthy" and status["uptime"] > 0 and status["gpu"] == []
    assert set(status["models"]) == {"total", "running", "stopped", "error"} and status["models"]["total"] >= 10
    for key in ("cpu_percent", "memory_percent", "disk_percent"):
        assert 0 <= status["resources"][key] <= 100
    timings = []
    for _ in range(5):  # no driver here: an empty list, fast (the least of a few, the machine is shared)
        started = time.perf_counter()
        r = api.get("/api/system/gpu")
        timings.append(time.perf_counter() - started)
        assert r.status_code == 200 and r.json() == {"gpus": []}
    assert min(timings) <= 0.05, timings


def test_every_route_needs_a_token_and_users_only_read(server, api):
    for method, path in (("GET", "/api/system/status"), ("GET", "/api/system/gpu"), ("GET", "/api/config"),
                         ("PUT", "/api/config"), ("GET", "/api/monitoring/metrics"),
                         ("GET", "/api/monitoring/performance"), ("GET", "/api/monitoring/requests")):
        assert_seed_error(requests.request(method, server.url + path, json={}, timeout=30), 401,
                          "AUTHENTICATION_FAILED")
    r = api.post("/api/users", json={"username": "watcher", "password": "watcher-pass-1", "role": "user"})
    assert r.status_code in (201, 409), r.text
    user = Api(server.url, username="watcher", password="watcher-pass-1")
    for path in ("/api/system/status", "/api/config", "/api/monitoring/metrics", "/api/monitoring/performance"):
        assert user.get(path).status_code == 200, path
    assert_seed_error(user.put("/api/config", json={"log_level": "ERROR"}), 403, "AUTHORIZATION_FAILED")
    assert api.get("/api/config").json()["log_level"] != "ERROR"


def _consume(r: requests.Response) -> str:
    assert r.status_code == 200, r.text
    return "".join(chunk.decode() for chunk in r.iter_content(None))


def test_every_surface_writes_a_record_and_the_sampler_counts_them(server, api):
    url = server.url
    calls = [
        ("POST", "/v1/chat/completions", {"model": TINY_TEXT, "messages": HELLO, "max_tokens": 3}),
        ("POST", "/generate", {"prompt": "Hi", "model": TINY_TEXT, "max_tokens": 3, "stream": False}),
        ("POST", "/api/v1/generate", {"prompt": "Hi", "model": TINY_TEXT, "max_tokens": 3}),
        ("POST", "/api/v1/llm/generate/", {"prompt": "Hi", "model": TINY_TEXT, "parameters": {"max_length": 3}}),
    ]
    for method, path, body in calls:
        r = requests.request(method, url + path, json=body, timeout=120)
        assert r.status_code == 200, (path, r.text)
    assert api.post(f"/api/models/{TINY_TEXT}/generate", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200
    stream = requests.post(url + "/v1/chat/completions", json={"model": TINY_TEXT, "messages": HELLO, "max_tokens": 4,
                                                               "stream": True}, stream=True, timeout=120)
    assert "[DONE]" in _consume(stream)
    r = requests.post(url + "/v1/embeddings", json={"model": "all_minilm_l6_v2", "input": ["a cat", "a dog"]}, timeout=120)
    assert r.status_code == 200, r.text
    with open(ROOT / "samples" / "receipt_en.png", "rb") as f:
        r = requests.post(url + "/ocr", files={"file": ("r.png", f, "image/png")}, data={"model": "rapidocr"}, timeout=120)
    assert r.status_code == 200, r.text
    r = requests.post(url + "/v1/chat/completions", json={"model": "no-such-model", "messages": HELLO}, timeout=30)
    assert r.status_code == 404

    items = api.get("/api/monitoring/requests?limit=1000").json()["items"]
    by_route = {}  # this module's server served no inference before this test
    for item in items:
        by_route.setdefault((item["method"], item["route"]), []).append(item)
    for route in ("/v1/chat/completions", "/generate", "/api/v1/generate", "/api/v1/llm/generate/",
                  "/api/models/{model_id}/generate"):
        rec = next(r for r in by_route[("POST", route)] if r["model"] is not None)
        assert rec["model"] == TINY_TEXT and rec["status"] == 200 and rec["duration"] > 0, rec
        assert rec["completion_tokens"] and rec["prompt_tokens"], rec
    chats = by_route[("POST", "/v1/chat/completions")]
    assert sum(1 for c in chats if c["model"] == TINY_TEXT) == 2  # the stream, recorded when it ended, and the JSON
    assert any(c["model"] is None and c["status"] == 404 for c in chats)
    emb = by_route[("POST", "/v1/embeddings")][0]
    assert emb["model"] == "all_minilm_l6_v2" and emb["prompt_tokens"] > 2 and emb["completion_tokens"] is None
    ocr = by_route[("POST", "/ocr")][0]
    assert ocr["model"] == "rapidocr" and ocr["status"] == 200
    assert not any(i["route"] in ("/health", "/metrics") for i in items)

    perf = api.get(f"/api/monitoring/performance?model_id={TINY_TEXT}&time_range=1h").json()
    assert perf["time_range"] == "1h" and len(perf["models"]) == 1
    m = perf["models"][0]
    assert m["model_name"] == TINY_TEXT and m["total_requests"] == 6 and m["successful_requests"] == 6
    assert m["failed_requests"] == 0 and m["error_rate"] == 0
    assert 0 < m["min_response_time"] <= m["avg_response_time"] <= m["max_response_time"]
    assert m["requests_per_second"] == pytest.approx(6 / 3600, rel=1e-3)
    assert perf["system"]["avg_cpu_percent"] is not None and perf["system"]["avg_gpu_utilization"] is None
    everyone = {x["model_name"] for x in api.get("/api/monitoring/performance?time_range=1h").json()["models"]}
    assert {TINY_TEXT, "all_minilm_l6_v2", "rapidocr"} <= everyone
    assert_seed_error(api.get("/api/monitoring/performance?model_id=nope"), 404, "MODEL_NOT_FOUND")
    assert api.get("/api/monitoring/performance?time_range=2h").status_code == 422
    detail = api.get(f"/api/models/{TINY_TEXT}").json()["performance_stats"]
    assert detail["total_requests"] == 6 and detail["error_rate"] == 0

    # The sampler moved the same requests into its per-model history (it samples every second).
    def sampled():
        body = api.get("/api/monitoring/metrics", params={"metric_type": "model", "interval": "1h"}).json()
        got = sum(i["requests"] for i in body["metrics"] if i["model_id"] == TINY_TEXT)
        return body if got == 6 else None

    body = _wait(sampled, what="the sampler's model history")
    rows = [i for i in body["metrics"] if i["model_id"] == TINY_TEXT]
    assert all(i["errors"] == 0 for i in rows) and any(i["tokens_per_second"] for i in rows)
    assert body["summary"]["total_requests"] >= 6


def _at(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def test_metrics_buckets_match_known_samples(server, api):
    base = int(datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp())
    db = Database(server.db_url)
    try:
        system = [repo.SystemRow(base + dt, cpu, mem, 50.0, mem_used) for dt, cpu, mem, mem_used in
                  ((0, 10.0, 30.0, 100 * 2**20), (30, 20.0, 50.0, 300 * 2**20), (60, 40.0, 40.0, 200 * 2**20),
                   (3600, 80.0, 60.0, 400 * 2**20))]
        gpus = [repo.GpuRow(base + dt, idx, util, used * 2**20, 8192 * 2**20, temp, 100.0) for dt, idx, util, used, temp in
                ((0, 0, 50.0, 1000, 60.0), (30, 0, 70.0, 3000, 70.0), (0, 1, 10.0, 500, 40.0), (3600, 0, 90.0, 4000, 80.0))]
        models = [repo.ModelRow(base + dt, "m1", "running", req, err, lat, tps, q) for dt, req, err, lat, tps, q in
                  ((0, 10, 1, 0.2, 5.0, 2), (30, 30, 0, 0.4, 15.0, 4), (3600, 0, 0, None, 0.0, 0))]
        db.call(repo.add_samples, system, gpus, models)
    finally:
        db.dispose()
    window = {"start_time": _at(base), "end_time": _at(base + 7200)}

    def get(**params):
        r = api.get("/api/monitoring/metrics", params={**window, **params})
        assert r.status_code == 200, r.text
        return r.json()

    cpu = get(metric_type="cpu", interval="1m")
    assert [(i["timestamp"], i["samples"], i["cpu_percent"], i["cpu_percent_max"]) for i in cpu["metrics"]] == [
        (_at(base), 2, 15.0, 20.0), (_at(base + 60), 1, 40.0, 40.0), (_at(base + 3600), 1, 80.0, 80.0)]
    assert cpu["summary"] == {"samples": 4, "avg_cpu_percent": 37.5, "max_cpu_percent": 80.0}
    hourly = get(metric_type="cpu", interval="1h")["metrics"]
    assert [(i["samples"], i["cpu_percent"]) for i in hourly] == [(3, pytest.approx(23.333, abs=1e-3)), (1, 80.0)]
    mem = get(metric_type="memory", interval="1h")["metrics"]
    assert mem[0]["memory_percent"] == 40.0 and mem[0]["memory_percent_max"] == 50.0 and mem[0]["memory_used"] == 200.0
    gpu = get(metric_type="gpu", interval="1h")
    assert [(i["gpu_id"], i["samples"], i["gpu_utilization"], i["gpu_memory_used"], i["gpu_temperature_max"])
            for i in gpu["metrics"]] == [(0, 2, 60.0, 2000.0, 70.0), (1, 1, 10.0, 500.0, 40.0), (0, 1, 90.0, 4000.0, 80.0)]
    assert gpu["summary"]["avg_gpu_utilization"] == 55.0 and gpu["summary"]["max_gpu_utilization"] == 90.0
    model = get(metric_type="model", interval="1h")
    first = model["metrics"][0]
    assert (first["model_id"], first["requests"], first["errors"]) == ("m1", 40, 1)
    assert first["avg_response_time"] == pytest.approx(0.35) and first["tokens_per_second"] == 10.0
    assert first["queue_depth_max"] == 4 and first["error_rate"] == pytest.approx(0.025)
    assert model["summary"]["total_requests"] == 40 and model["summary"]["avg_response_time"] == pytest.approx(0.35)
    combined = get(interval="1h")  # the seed's view: machine, mean of the GPUs, models' response time
    assert combined["metrics"][0]["cpu_percent"] == pytest.approx(23.333, abs=1e-3)
    assert combined["metrics"][0]["gpu_utilization"] == pytest.approx(130 / 3, abs=1e-3)
    assert combined["summary"]["avg_response_time"] == pytest.approx(0.35)
    later = get(metric_type="cpu", interval="1m", start_time=_at(base + 60))  # the start bounds the samples
    assert [i["cpu_percent"] for i in later["metrics"]] == [40.0, 80.0]
    day = get(metric_type="cpu", interval="1d", start_time=_at(base), end_time=_at(base + 86400))
    assert [(i["timestamp"], i["samples"]) for i in day["metrics"]] == [(_at(base), 4)]


def test_bad_metrics_queries_are_refused(api):
    path = "/api/monitoring/metrics"
    for params in ({"start_time": "yesterday"}, {"end_time": "2020-13-01T00:00:00Z"}, {"metric_type": "disk"},
                   {"interval": "2m"}):
        assert_seed_error(api.get(path, params=params), 422, "INVALID_REQUEST", path)
    assert_seed_error(api.get(path, params={"start_time": "2020-01-02T00:00:00Z", "end_time": "2020-01-01T00:00:00Z"}),
                      400, "INVALID_TIME_RANGE", path)
    start = datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp()
    ok = {"start_time": _at(int(start)), "end_time": _at(int(start) + 10_000 * 60), "interval": "1m"}
    assert api.get(path, params=ok).status_code == 200  # exactly 10,000 buckets
    too_many = {**ok, "end_time": _at(int(start) + 10_000 * 60 + 1)}
    assert_seed_error(api.get(path, params=too_many), 400, "TOO_MANY_BUCKETS", path)


def _samples_since(api, since: float) -> int:
    body = api.get("/api/monitoring/metrics", params={"metric_type": "cpu", "interval": "1m",
                                                      "start_time": _at(math.ceil(since))}).json()
    return body["summary"]["samples"]


def test_live_config_takes_effect_at_once(server, api):
    cfg = api.get("/api/config").json()
    assert cfg["gpu_monitor_interval"] == 1 and cfg["sources"]["gpu_monitor_interval"] == "config"
    assert cfg["sources"]["max_concurrent_models"] == "default" and cfg["log_level"] == "WARNING"
    for bad in ({"gpu_monitor_interval": 0}, {"unknown_key": 1}, {"alert_thresholds": {"gpu_utilization_high": 150}},
                {"alert_thresholds": {"nope": 1}}, {"log_level": "LOUD"}, {"max_concurrent_models": -1},
                {"health_check_interval": "often"}):
        assert_seed_error(api.put("/api/config", json=bad), 422, "INVALID_REQUEST", "/api/config")

    # log_level: INFO lines appear only once the level allows them
    assert api.put("/api/config", json={"health_check_interval": 1}).json()["changed"] == {"health_check_interval": 1}
    assert "configuration changed" not in server.logs()
    r = api.put("/api/config", json={"log_level": "info"})
    assert r.status_code == 200 and r.json()["log_level"] == "INFO" and r.json()["sources"]["log_level"] == "database"
    _wait(lambda: "configuration changed by admin: log_level" in server.logs(), 5, "an INFO line")

    # alert_thresholds: a partial change, merged over config.yaml's values, source per threshold
    r = api.put("/api/config", json={"alert_thresholds": {"gpu_temperature_high": 70}}).json()
    assert r["alert_thresholds"]["gpu_temperature_high"] == 70 and r["alert_thresholds"]["gpu_utilization_high"] == 90
    assert r["sources"]["alert_thresholds"]["gpu_temperature_high"] == "database"
    assert r["sources"]["alert_thresholds"]["gpu_utilization_high"] == "default"

    # gpu_monitor_interval: the sampler slows down at once, and speeds up at once
    assert api.put("/api/config", json={"gpu_monitor_interval": 3600}).status_code == 200
    time.sleep(0.3)
    quiet_from = time.time()
    time.sleep(2.5)
    assert _samples_since(api, quiet_from) == 0
    assert api.put("/api/config", json={"gpu_monitor_interval": 1}).status_code == 200
    _wait(lambda: _samples_since(api, quiet_from) >= 2, 10, "samples at the faster interval")

    # health_check_interval: a running model is probed every second now
    assert requests.post(server.url + f"/models/{TINY_TEXT}/load", timeout=120).status_code == 200
    first = _wait(lambda: api.get(f"/api/models/{TINY_TEXT}").json()["health_checked_at"], 10, "a health probe")
    later = _wait(lambda: (api.get(f"/api/models/{TINY_TEXT}").json()["health_checked_at"] or "") > first, 10,
                  "a second probe")
    assert later and api.get(f"/api/models/{TINY_TEXT}").json()["health"] == "healthy"

    # max_concurrent_models: loading one more unloads the least recently used idle model
    assert api.put("/api/config", json={"max_concurrent_models": 1}).status_code == 200
    assert requests.post(server.url + f"/models/{TINY_VLM}/load", timeout=120).status_code == 200
    assert requests.get(server.url + "/models", timeout=30).json()["loaded"] == [TINY_VLM]

    # default_model_timeout: a start given no timeout of its own gets this one
    assert api.put("/api/config", json={"max_concurrent_models": 0, "default_model_timeout": 0.001}).status_code == 200
    task = api.act("qwen2_5_vl_3b", "start")
    assert task["status"] == "failed" and task["error_code"] == "OPERATION_TIMEOUT"
    r = api.put("/api/config", json={"default_model_timeout": None, "max_concurrent_models": None}).json()
    assert r["default_model_timeout"] == 300 and r["sources"]["default_model_timeout"] == "config"  # config.yaml's
    assert r["sources"]["max_concurrent_models"] == "default"


def test_a_job_is_recorded_when_it_runs(server, api):
    with open(ROOT / "samples" / "receipt_en.png", "rb") as f:
        r = requests.post(server.url + "/jobs/ocr", files={"file": ("r.png", f, "image/png")},
                          data={"model": "rapidocr"}, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    _wait(lambda: requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()["status"] == "succeeded", 120,
          "the job")

    def records():
        items = api.get("/api/monitoring/requests?model_id=rapidocr&limit=1000").json()["items"]
        return {(i["method"], i["route"], i["status"]) for i in items}

    found = _wait(lambda: (got := records()) >= {("POST", "/jobs/ocr", 202), ("JOB", "/jobs/ocr (job)", 200)} and got,
                  10, "the job's records")
    assert ("GET", "/jobs/{job_id}", 200) not in found  # a status poll names no model


@pytest.fixture(params=["sqlite", "postgresql"])
def restart_env(request):
    return {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, **backend_env(request)}


def test_config_and_statistics_survive_a_restart(restart_env, tiny_models_dir, tmp_path):
    data = tmp_path / "data"
    with RemoteServer(models_dir=tiny_models_dir, data_dir=data, env=restart_env) as srv:
        api = Api(srv.url)
        r = api.put("/api/config", json={"gpu_monitor_interval": 1, "max_concurrent_models": 3,
                                         "alert_thresholds": {"error_rate_high": 0.2}})
        assert r.status_code == 200, r.text
        for _ in range(2):
            r = requests.post(srv.url + "/v1/chat/completions",
                              json={"model": TINY_TEXT, "messages": HELLO, "max_tokens": 2}, timeout=120)
            assert r.status_code == 200
        assert api.get(f"/api/models/{TINY_TEXT}").json()["performance_stats"]["total_requests"] == 2
        _wait(lambda: _samples_since(api, time.time() - 60) >= 2, 15, "samples")
    with RemoteServer(models_dir=tiny_models_dir, data_dir=data, env=restart_env) as srv:
        api = Api(srv.url)
        cfg = api.get("/api/config").json()
        assert (cfg["gpu_monitor_interval"], cfg["max_concurrent_models"]) == (1, 3)
        assert cfg["alert_thresholds"]["error_rate_high"] == 0.2
        assert cfg["sources"]["gpu_monitor_interval"] == cfg["sources"]["max_concurrent_models"] == "database"
        assert cfg["sources"]["alert_thresholds"]["error_rate_high"] == "database"
        stats = api.get(f"/api/models/{TINY_TEXT}").json()["performance_stats"]
        assert stats["total_requests"] == 2 and stats["error_rate"] == 0
        perf = api.get("/api/monitoring/performance?time_range=1h").json()["models"]
        assert [(m["model_name"], m["total_requests"]) for m in perf] == [(TINY_TEXT, 2)]
        # the stored interval drives the new process's sampler (config.yaml says 60 s)
        restarted = time.time()
        _wait(lambda: _samples_since(api, restarted) >= 2, 15, "samples at the stored interval")
