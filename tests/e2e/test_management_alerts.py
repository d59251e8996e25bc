"""Alerts and /ws/monitor end to end: a real server process (SQLite; PostgreSQL for the restart
test), a real HTTP receiver for the webhook, a real SMTP server (aiosmtpd), and the `websockets`
client. Samples come from the server's own sampler (monitoring.gpu_monitor_interval 1 s)."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.e2e.management_api import ADMIN_PASSWORD, Api, assert_seed_error
from tests.notify_receivers import SmtpReceiver, WebhookReceiver, wait_until
from tests.server_process import RemoteServer

TINY_TEXT = "qwen2_5_0_5b"
QUIET_THRESHOLDS = {"gpu_utilization_high": 100, "gpu_temperature_high": 200, "gpu_memory_percent_high": 100,
                    "cpu_percent_high": 100, "memory_percent_high": 100, "disk_percent_high": 100,
                    "response_time_high": 86400, "error_rate_high": 1, "queue_depth_high": 1000000}


@pytest.fixture(scope="module")
def hook():
    r = WebhookReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def smtp():
    r = SmtpReceiver()
    yield r
    r.close()


def alert_env(hook: WebhookReceiver, smtp: SmtpReceiver, **extra: str) -> dict[str, str]:
    return {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "CHATVLM_MONITORING__GPU_MONITOR_INTERVAL": "1",
            "CHATVLM_ALERTS__WEBHOOKS": json.dumps([hook.url]),
            "CHATVLM_ALERTS__WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
            "CHATVLM_ALERTS__WEBHOOK_BACKOFF_S": "0.05",
            "CHATVLM_ALERTS__SMTP": json.dumps({"host": "127.0.0.1", "port": smtp.port, "from": "chatvlm@example.org",
                                                "to": ["ops@example.org"], "timeout_s": 5}),
            "CHATVLM_ALERTS__THRESHOLDS": json.dumps(QUIET_THRESHOLDS),
            "CHATVLM_MANAGEMENT__WS_PING_S": "1",
            "CHATVLM_MANAGEMENT__WS_QUEUE": "16", **extra}


@pytest.fixture(scope="module")
def server(tiny_models_dir, hook, smtp):
    with RemoteServer(models_dir=tiny_models_dir, env=alert_env(hook, smtp)) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    return Api(server.url)


@pytest.fixture(scope="module")
def reader(api, server):
    r = api.post("/api/users", json={"username": "watcher", "password": "watcher-pass-1", "role": "user"})
    assert r.status_code == 201, r.text
    return Api(server.url, username="watcher", password="watcher-pass-1")


def for_rule(hook: WebhookReceiver, rule_id: str) -> list[dict]:
    return [p for p in hook.accepted() if p["rule_id"] == rule_id]


def mails_for(smtp: SmtpReceiver, alert_ids: set[str]) -> list:
    return [m for m in smtp.messages if m["X-Chatvlm-Alert-Id"] in alert_ids]


class Monitor:
    """A /ws/monitor client that reads every frame on a thread and keeps them."""

    def __init__(self, server: RemoteServer, token: str, events: list[str] | None = None, **kw) -> None:
        self.ws = connect(f"{server.ws_url}/ws/monitor?token={token}", proxy=None, **kw)
        self.frames: list[dict] = []
        self._lock = threading.RLock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if events:
            self.send({"action": "subscribe", "events": events})
            assert self.wait(lambda f: f["type"] == "subscribed")

    def _read(self) -> None:
        try:
            for raw in self.ws:
                with self._lock:
                    self.frames.append(json.loads(raw))
        except Exception:  # noqa: BLE001 - the connection closed
            pass

    def send(self, obj) -> None:
        self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [f for f in self.frames if f["type"] == kind]

    def wait(self, pred, timeout: float = 60) -> dict | None:
        def found():
            with self._lock:
                return next((f for f in self.frames if pred(f)), None)
        return wait_until(found, timeout)

    def close(self) -> None:
        self.ws.close()
        self._thread.join(5)


# ---- rules through the API ---------------------------------------------------------------------
def test_rules_crud_roles_and_bad_conditions(api, reader, server):
    r = api.post("/api/config/alerts", json={"name": "高GPU使用率告警", "condition": "gpu_utilization > 90 for 5m",
                                             "severity": "warning", "enabled": True,
                                             "notification_channels": ["email", "webhook"]})
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["id"].startswith("alert-") and rule["notification_channels"] == ["email", "webhook"]
    assert rule["builtin"] is False and rule["firing"] == [] and rule["created_at"]
    listed = reader.get("/api/config/alerts").json()  # a `user` reads
    assert rule["id"] in [x["id"] for x in listed["items"]] and listed["total"] == len(listed["items"])
    assert {b["id"] for b in listed["builtin"]} >= {"builtin:cpu_percent_high", "builtin:gpu_temperature_high"}
    assert next(b for b in listed["builtin"] if b["id"] == "builtin:cpu_percent_high")["condition"] == "cpu_percent > 100"
    assert reader.get(f"/api/config/alerts/{rule['id']}").json()["name"] == "高GPU使用率告警"

    # a `user` may not write; no token is 401
    assert_seed_error(reader.post("/api/config/alerts", json={"name": "x", "condition": "cpu_percent > 1"}),
                      403, "AUTHORIZATION_FAILED")
    assert_seed_error(reader.delete(f"/api/config/alerts/{rule['id']}"), 403, "AUTHORIZATION_FAILED")
    import requests
    assert_seed_error(requests.get(server.url + "/api/config/alerts", timeout=30), 401, "AUTHENTICATION_FAILED")
    assert_seed_error(requests.get(server.url + "/api/alerts/history", timeout=30), 401, "AUTHENTICATION_FAILED")

    # bad conditions: 422 naming the position
    for condition, position in [("gpu_util > 90", 1), ("cpu_percent >> 3", 14), ("cpu_percent > 3 for 5x", 21),
                                ("cpu_percent > 3; rm -rf /", 16), ("__import__('os').system('x') > 1", 1)]:
        body = assert_seed_error(api.post("/api/config/alerts", json={"name": "bad", "condition": condition}),
                                 422, "INVALID_CONDITION")
        assert body["error"]["details"]["position"] == position, (condition, body)
        assert f"position {position}" in body["error"]["message"]
    for bad in ({"name": "x", "condition": "cpu_percent > 1", "severity": "fatal"},
                {"name": "x", "condition": "cpu_percent > 1", "notification_channels": ["pager"]},
                {"name": "x", "condition": "cpu_percent > 1", "surprise": 1},
                {"name": "", "condition": "cpu_percent > 1"}, {"condition": "cpu_percent > 1"},
                {"name": "x", "condition": "cpu_percent > 1", "enabled": "yes"}):
        assert_seed_error(api.post("/api/config/alerts", json=bad), 422, "INVALID_REQUEST")
    assert_seed_error(api.post("/api/config/alerts", data="{not json", headers={"Content-Type": "application/json"}),
                      400, "INVALID_REQUEST")

    # update: partial; an empty or bad update is refused
    r = api.put(f"/api/config/alerts/{rule['id']}", json={"severity": "critical", "condition": "gpu_temperature > 85"})
    assert r.status_code == 200 and (r.json()["severity"], r.json()["condition"]) == ("critical", "gpu_temperature > 85")
    assert r.json()["name"] == "高GPU使用率告警"
    assert_seed_error(api.put(f"/api/config/alerts/{rule['id']}", json={}), 422, "INVALID_REQUEST")
    assert_seed_error(api.put(f"/api/config/alerts/{rule['id']}", json={"condition": "gpu_temperature >"}),
                      422, "INVALID_CONDITION")
    assert_seed_error(api.put("/api/config/alerts/alert-nope", json={"enabled": False}), 404, "ALERT_RULE_NOT_FOUND")
    assert api.delete(f"/api/config/alerts/{rule['id']}").status_code == 200
    assert_seed_error(api.get(f"/api/config/alerts/{rule['id']}"), 404, "ALERT_RULE_NOT_FOUND")
    assert_seed_error(api.delete(f"/api/config/alerts/{rule['id']}"), 404, "ALERT_RULE_NOT_FOUND")
    assert_seed_error(api.get("/api/alerts/history", params={"start_time": "yesterday"}), 422, "INVALID_REQUEST")
    assert_seed_error(api.get("/api/alerts/history", params={"start_time": "2026-12-02T00:00:00Z",
                                                             "end_time": "2026-12-01T00:00:00Z"}),
                      422, "INVALID_REQUEST")
    assert_seed_error(api.get("/api/alerts/history", params={"state": "exploded"}), 422, "INVALID_REQUEST")


# ---- firing, notifying once, resolving ---------------------------------------------------------
def test_a_firing_rule_notifies_webhook_and_email_once_then_resolves(api, reader, server, hook, smtp):
    monitor = Monitor(server, api.s.headers["Authorization"][7:], ["system_alerts"])
    try:
        r = api.post("/api/config/alerts", json={"name": "always", "condition": "cpu_percent >= 0",
                                                 "severity": "critical", "notification_channels": ["webhook", "email"]})
        rule = r.json()
        assert wait_until(lambda: for_rule(hook, rule["id"]), 30), "no webhook POST arrived"
        (fired,) = for_rule(hook, rule["id"])
        assert wait_until(lambda: mails_for(smtp, {fired["alert_id"]}), 30), "no e-mail arrived"
        time.sleep(3.5)  # three more samples while it keeps firing: no more notifications
        assert len(for_rule(hook, rule["id"])) == 1 and len(mails_for(smtp, {fired["alert_id"]})) == 1
        assert (fired["state"], fired["severity"], fired["subject"]) == ("firing", "critical", "system")
        assert set(fired) >= {"alert_id", "rule_id", "rule_name", "condition", "severity", "state", "subject",
                              "metric", "value", "message", "fired_at", "timestamp"}
        assert mails_for(smtp, {fired["alert_id"]})[0]["Subject"] == "[chatvlm] CRITICAL firing: always"
        assert api.get(f"/api/config/alerts/{rule['id']}").json()["firing"] == ["system"]

        alert = monitor.wait(lambda f: f["type"] == "system_alert" and f["data"]["alert_id"] == fired["alert_id"])
        assert alert["data"]["severity"] == "critical" and alert["data"]["state"] == "firing"
        assert set(alert["data"]) >= {"alert_id", "severity", "message", "timestamp"}

        history = reader.get("/api/alerts/history", params={"rule_id": rule["id"]}).json()
        (event,) = history["items"]
        assert (event["state"], event["alert_id"], history["total"]) == ("firing", fired["alert_id"], 1)
        assert wait_until(lambda: reader.get("/api/alerts/history", params={"rule_id": rule["id"]})
                          .json()["items"][0]["notifications"].get("email"), 10)
        event = reader.get("/api/alerts/history", params={"rule_id": rule["id"]}).json()["items"][0]
        assert event["notifications"]["webhook"]["ok"] and event["notifications"]["email"]["ok"]

        # disabled: resolved, recorded and notified once on each channel
        assert api.put(f"/api/config/alerts/{rule['id']}", json={"enabled": False}).status_code == 200
        assert wait_until(lambda: len(for_rule(hook, rule["id"])) == 2, 30)
        resolved = for_rule(hook, rule["id"])[1]
        assert (resolved["state"], resolved["alert_id"]) == ("resolved", fired["alert_id"])
        assert wait_until(lambda: len(mails_for(smtp, {fired["alert_id"]})) == 2, 30)
        assert mails_for(smtp, {fired["alert_id"]})[1]["Subject"] == "[chatvlm] CRITICAL resolved: always"
        assert monitor.wait(lambda f: f["type"] == "system_alert" and f["data"]["state"] == "resolved"
                            and f["data"]["alert_id"] == fired["alert_id"])
        time.sleep(2.5)
        assert len(for_rule(hook, rule["id"])) == 2 and len(mails_for(smtp, {fired["alert_id"]})) == 2
        states = [e["state"] for e in reader.get("/api/alerts/history", params={"rule_id": rule["id"]}).json()["items"]]
        assert states == ["resolved", "firing"]
        assert [e["state"] for e in reader.get("/api/alerts/history", params={"rule_id": rule["id"],
                                                                             "state": "resolved"}).json()["items"]] \
            == ["resolved"]
    finally:
        monitor.close()


def test_a_model_in_error_fires_model_error_and_resolves_when_deleted(api, server, hook, smtp, tiny_models_dir):
    monitor = Monitor(server, api.s.headers["Authorization"][7:], ["model_status", "system_alerts"])
    try:
        rule = api.post("/api/config/alerts", json={"name": "model down", "condition": "model_error == 1",
                                                    "severity": "warning",
                                                    "notification_channels": ["webhook", "email"]}).json()
        # asks for a GPU this machine does not have: its start fails and it shows as `error`
        r = api.post("/api/models", json={"name": "broken", "framework": "transformers",
                                          "config": {"model_path": str(tiny_models_dir / TINY_TEXT)},
                                          "resource_requirements": {"gpu_count": 1}})
        assert r.status_code == 201, r.text
        task = api.act("broken", "start")
        assert task["status"] == "failed" and api.get("/api/models/broken").json()["status"] == "error"
        assert monitor.wait(lambda f: f["type"] == "model_status_update" and f["data"]["model_name"] == "broken"
                            and f["data"]["status"] == "error" and f["data"]["reason"])
        assert wait_until(lambda: for_rule(hook, rule["id"]), 30)
        time.sleep(2.5)
        (fired,) = for_rule(hook, rule["id"])
        assert (fired["subject"], fired["value"], fired["state"]) == ("model:broken", 1.0, "firing")
        assert len(mails_for(smtp, {fired["alert_id"]})) == 1

        assert api.delete("/api/models/broken").status_code == 200
        assert wait_until(lambda: len(for_rule(hook, rule["id"])) == 2, 30)
        assert for_rule(hook, rule["id"])[1]["state"] == "resolved"
        assert wait_until(lambda: len(mails_for(smtp, {fired["alert_id"]})) == 2, 30)
        assert api.delete(f"/api/config/alerts/{rule['id']}").status_code == 200
    finally:
        monitor.close()


# ---- /ws/monitor -------------------------------------------------------------------------------
def test_ws_events_for_start_and_stop(api, server, tiny_models_dir):
    r = api.post("/api/models", json={"name": "watched", "framework": "transformers",
                                      "config": {"model_path": str(tiny_models_dir / TINY_TEXT)}})
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    monitor = Monitor(server, api.s.headers["Authorization"][7:], ["model_status"])
    try:
        assert api.act("watched", "start")["status"] == "succeeded"
        assert api.act("watched", "stop")["status"] == "succeeded"
        assert monitor.wait(lambda f: f["type"] == "model_status_update" and f["data"]["status"] == "stopped"
                            and f["data"]["model_name"] == "watched")
        seen = [(f["data"]["previous_status"], f["data"]["status"]) for f in monitor.of("model_status_update")
                if f["data"]["model_name"] == "watched"]
        assert seen == [(None, "starting"), ("starting", "running"), ("running", "stopping"), ("stopping", "stopped")]
        first = monitor.of("model_status_update")[0]["data"]
        assert first["model_id"] == model_id and set(first) >= {"model_id", "status", "health", "timestamp"}
        assert monitor.of("system_metrics_update") == []  # not subscribed
    finally:
        monitor.close()


def test_ws_events_for_a_lazy_load_and_an_unload_through_other_surfaces(api, server, tiny_models_dir):
    """Loads and unloads the manager does on its own (a request's lazy load, seed 003's unload) are
    announced like the management API's start and stop."""
    r = api.post("/api/models", json={"name": "lazy", "framework": "transformers",
                                      "config": {"model_path": str(tiny_models_dir / TINY_TEXT)}})
    assert r.status_code == 201, r.text
    monitor = Monitor(server, api.s.headers["Authorization"][7:], ["model_status"])
    try:
        r = api.post("/v1/completions", json={"model": "lazy", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert monitor.wait(lambda f: f["type"] == "model_status_update" and f["data"]["model_name"] == "lazy"
                            and f["data"]["status"] == "running")
        assert api.delete("/models/lazy").json()["message"] == "Model lazy unloaded"
        assert monitor.wait(lambda f: f["type"] == "model_status_update" and f["data"]["model_name"] == "lazy"
                            and f["data"]["previous_status"] == "running")
        seen = [(f["data"]["previous_status"], f["data"]["status"]) for f in monitor.of("model_status_update")
                if f["data"]["model_name"] == "lazy"]
        assert seen[:2] == [(None, "starting"), ("starting", "running")], seen
        assert seen[2][0] == "running" and seen[2][1] in ("created", "stopped"), seen
        assert api.get("/api/models/lazy").json()["status"] == seen[2][1]
    finally:
        monitor.close()
        api.delete("/api/models/lazy")


def test_ws_handshake_needs_a_valid_token(api, server):
    for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer not-a-token"}}):
        with pytest.raises(InvalidStatus) as info:
            connect(f"{server.ws_url}/ws/monitor", proxy=None, **kwargs)
        assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        connect(f"{server.ws_url}/ws/monitor?token=forged", proxy=None)
    ws = connect(f"{server.ws_url}/ws/monitor", proxy=None,
                 additional_headers={"Authorization": api.s.headers["Authorization"]})
    ws.send(json.dumps({"action": "subscribe", "events": ["system_alerts"]}))
    assert json.loads(ws.recv(timeout=10)) == {"type": "subscribed", "data": {"events": ["system_alerts"]}}
    ws.close()


def test_ws_protocol_samples_pings_and_errors(api, server):
    monitor = Monitor(server, api.s.headers["Authorization"][7:])
    try:
        monitor.send("{not json")
        monitor.send(json.dumps({"action": "dance"}))
        monitor.send(json.dumps({"action": "subscribe", "events": ["weather"]}))
        monitor.send(json.dumps({"action": "subscribe", "events": "gpu_metrics"}))
        monitor.send(json.dumps(["subscribe"]))
        assert monitor.wait(lambda f: len(monitor.of("error")) >= 5, 10)
        codes = [f["data"]["code"] for f in monitor.of("error")]
        assert codes == ["INVALID_MESSAGE", "UNKNOWN_ACTION", "UNKNOWN_EVENT", "INVALID_MESSAGE", "INVALID_MESSAGE"]
        assert monitor.wait(lambda f: f["type"] == "ping", 5)  # idle: pinged every management.ws_ping_s
        monitor.send(json.dumps({"action": "ping"}))
        assert monitor.wait(lambda f: f["type"] == "pong", 5)

        monitor.send(json.dumps({"action": "subscribe", "events": ["gpu_metrics"]}))
        assert monitor.wait(lambda f: len(monitor.of("system_metrics_update")) >= 2, 10)
        m = monitor.of("system_metrics_update")[-1]["data"]
        assert 0 <= m["cpu_percent"] <= 100 and 0 < m["memory_percent"] < 100 and m["memory_total"] > 0
        assert m["gpu_count"] == 0 and monitor.of("gpu_metrics_update") == []  # this machine has no GPU
        monitor.send(json.dumps({"action": "unsubscribe", "events": ["gpu_metrics"]}))
        assert monitor.wait(lambda f: f["type"] == "unsubscribed", 5)
        time.sleep(0.5)
        n = len(monitor.of("system_metrics_update"))
        time.sleep(2.5)
        assert len(monitor.of("system_metrics_update")) == n  # no more after unsubscribing
    finally:
        monitor.close()


def test_a_slow_ws_client_does_not_block_the_others(api, server):
    """Each connection's queue holds management.ws_queue (16 here) events. A client that does not read
    holds up no one: the fast client keeps getting every sample, and a burst larger than the queue
    (40 alerts fire within a sample or two) drops the oldest events and says so with a `lagged` frame."""
    token = api.s.headers["Authorization"][7:]
    sock = socket.socket()  # the slow client: a small receive buffer, and it reads nothing until the end
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    slow = connect(f"{server.ws_url}/ws/monitor?token={token}", sock=sock, compression=None, max_queue=1,
                   proxy=None, ping_interval=None)
    slow.send(json.dumps({"action": "subscribe", "events": ["system_alerts", "gpu_metrics", "model_status"]}))
    fast = Monitor(server, token, ["system_alerts", "gpu_metrics"])
    ids: list[str] = []
    try:
        ids = [api.post("/api/config/alerts", json={"name": f"burst {i}", "condition": "cpu_percent >= 0",
                                                    "severity": "info"}).json()["id"] for i in range(40)]
        # the newest events of the burst arrive; the oldest were dropped, and the client is told
        assert fast.wait(lambda f: f["type"] == "system_alert" and f["data"]["rule_id"] == ids[-1], 30)
        assert fast.wait(lambda f: f["type"] == "lagged", 5)
        got = {f["data"]["rule_id"] for f in fast.of("system_alert")} & set(ids)
        dropped = sum(f["data"]["dropped"] for f in fast.of("lagged"))  # alerts, and samples beside them
        assert ids[-1] in got and len(got) < 40 and len(got) + dropped >= 40, (len(got), dropped)
        # the fast client goes on getting each sample on time while the slow one still reads nothing
        n = len(fast.of("system_metrics_update"))
        assert fast.wait(lambda f: len(fast.of("system_metrics_update")) >= n + 3, 15)  # 1 s samples
        # the slow client, reading at last: the lagged notice, then the newest events
        frames = [json.loads(slow.recv(timeout=10))]
        while frames[-1]["type"] != "lagged":
            frames.append(json.loads(slow.recv(timeout=10)))
        assert frames[-1]["data"]["dropped"] > 0
    finally:
        for rule_id in ids:
            api.delete(f"/api/config/alerts/{rule_id}")
        slow.close()
        fast.close()


# ---- PostgreSQL, and a restart ---------------------------------------------------------------
def test_rules_and_history_on_postgresql_survive_a_restart(postgres_cluster, hook, smtp, tmp_path):
    env = {**alert_env(hook, smtp), "CHATVLM_DATABASE__URL": postgres_cluster.new_database()}
    with RemoteServer(models_dir=tmp_path, env=env, data_dir=tmp_path / "data") as srv:
        api = Api(srv.url)
        rule = api.post("/api/config/alerts", json={"name": "pg", "condition": "memory_percent > 0",
                                                    "notification_channels": ["webhook", "email"]}).json()
        assert wait_until(lambda: for_rule(hook, rule["id"]), 30)
        (fired,) = for_rule(hook, rule["id"])
        assert wait_until(lambda: mails_for(smtp, {fired["alert_id"]}), 30)
    with RemoteServer(models_dir=tmp_path, env=env, data_dir=tmp_path / "data") as srv:
        api = Api(srv.url)
        assert api.get(f"/api/config/alerts/{rule['id']}").json()["condition"] == "memory_percent > 0"
        items = api.get("/api/alerts/history", params={"rule_id": rule["id"]}).json()["items"]
        assert items[-1]["alert_id"] == fired["alert_id"] and items[-1]["notifications"]["webhook"]["ok"]
        # a new process knows no firing alert: the rule fires again there, and is notified
        assert wait_until(lambda: len(for_rule(hook, rule["id"])) == 2, 30)
        assert api.delete(f"/api/config/alerts/{rule['id']}").status_code == 200
        assert wait_until(lambda: len(for_rule(hook, rule["id"])) == 3, 30)
        assert for_rule(hook, rule["id"])[-1]["state"] == "resolved"
