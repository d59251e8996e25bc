"""The alert evaluator in-process: a real event hub, a real store (SQLite and PostgreSQL), psutil
samples, a real HTTP receiver for the webhook and a real SMTP server (aiosmtpd) for e-mail."""
from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from core.config import AlertsSettings, AlertThresholds
from management.alerts.channels import Notifier
from management.alerts.evaluator import AlertEvaluator
from management.monitor.host import HostReader
from management.alerts.rules import AlertRules
from management.events import ALERT, SAMPLE, EventHub, GpuFigures, ModelFigures, Sample
from store import alerts as repo
from store.db import Database
from tests.notify_receivers import SmtpReceiver, WebhookReceiver

# Built-in thresholds none of these samples can pass.
QUIET = AlertThresholds(gpu_utilization_high=100, gpu_temperature_high=200, gpu_memory_percent_high=100,
                        cpu_percent_high=100, memory_percent_high=100, disk_percent_high=100,
                        response_time_high=86400, error_rate_high=1, queue_depth_high=1_000_000)


@pytest.fixture
def receivers():
    hook, smtp = WebhookReceiver(), SmtpReceiver()
    yield hook, smtp
    hook.close()
    smtp.close()


def settings_for(hook: WebhookReceiver, smtp: SmtpReceiver, **extra) -> AlertsSettings:
    return AlertsSettings(webhooks=[hook.url], webhook_allowed_hosts=["127.0.0.1"], webhook_backoff_s=0.01,
                          smtp={"host": "127.0.0.1", "port": smtp.port, "from": "chatvlm@example.org",
                                "to": ["ops@example.org", "oncall@example.org"], "timeout_s": 5},
                          builtin_channels=[], **extra)


def psutil_sample(models: dict[str, str] | None = None, after: Sample | None = None, seconds: float = 1) -> Sample:
    """A real machine sample; ``after``: timestamped ``seconds`` after that one."""
    s = Sample(ts=datetime.now(timezone.utc), system=HostReader(Path.cwd()).read(),
               models={name: ModelFigures(status=status) for name, status in (models or {}).items()})
    return dataclasses.replace(s, ts=after.ts + timedelta(seconds=seconds)) if after is not None else s


class Harness:
    def __init__(self, url: str, cfg: AlertsSettings, thresholds=lambda: QUIET) -> None:
        self.db = Database(url)
        self.db.migrate()
        self.hub = EventHub()
        self.hub.bind(asyncio.get_running_loop())
        self.rules = AlertRules(100)
        self.rules.load(self.db)
        self.alerts_seen = self.hub.subscribe([ALERT])
        self.ev = AlertEvaluator(self.hub, self.rules, Notifier(cfg), cfg, thresholds)
        self.ev.db = self.db

    async def step(self, sample: Sample) -> None:
        await self.ev.evaluate(sample)
        await self.ev.drain()

    def history(self, **kw):
        return self.db.call(repo.history, limit=100, **kw)[0]

    def published(self) -> list[dict]:
        out = []
        while self.alerts_seen._queue:  # noqa: SLF001 - the test reads what the hub delivered so far
            out.append(self.alerts_seen._queue.popleft().data)
        return out


def _url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'alerts.db'}"


def test_fires_once_notifies_each_channel_once_and_resolves(database_url, receivers):
    asyncio.run(_fires_once(database_url, *receivers))


async def _fires_once(url, hook, smtp):
    h = Harness(url, settings_for(hook, smtp, cooldown_s=0))
    rule = await h.rules.create(name="always", condition="cpu_percent >= 0", severity="critical", enabled=True,
                                channels=["webhook", "email"])
    s = psutil_sample()
    for i in range(4):  # keeps firing: one notification only
        s = psutil_sample(after=s)
        await h.step(s)
    assert len(hook.accepted()) == 1 and len(smtp.messages) == 1
    payload = hook.accepted()[0]
    assert payload["state"] == "firing" and payload["rule_id"] == rule.id and payload["severity"] == "critical"
    assert payload["subject"] == "system" and payload["metric"] == "cpu_percent" and payload["value"] >= 0
    assert payload["condition"] == "cpu_percent >= 0" and payload["alert_id"].startswith("alert-")
    mail = smtp.messages[0]
    assert mail["Subject"] == "[chatvlm] CRITICAL firing: always" and mail["From"] == "chatvlm@example.org"
    assert mail["X-Envelope-To"] == "ops@example.org,oncall@example.org"
    assert payload["alert_id"] in mail.get_payload()
    (fired,) = h.history()
    assert fired.state == "firing" and fired.notifications["webhook"]["ok"]
    assert fired.notifications["webhook"]["targets"][0]["attempts"] == 1 and fired.notifications["email"]["ok"]
    assert [(e["state"], e["rule_id"]) for e in h.published()] == [("firing", rule.id)]

    await h.rules.update(rule.id, {"enabled": False})  # disabling resolves it at the next sample
    await h.step(psutil_sample(after=s))
    assert [p["state"] for p in hook.accepted()] == ["firing", "resolved"] and len(smtp.messages) == 2
    resolved = hook.accepted()[1]
    assert resolved["alert_id"] == payload["alert_id"] and "disabled" in resolved["message"]
    assert smtp.messages[1]["Subject"] == "[chatvlm] CRITICAL resolved: always"
    assert [e.state for e in h.history()] == ["resolved", "firing"]
    assert [e["state"] for e in h.published()] == ["resolved"]
    await h.step(psutil_sample(after=s, seconds=2))
    assert len(hook.accepted()) == 2 and len(smtp.messages) == 2  # nothing more
    h.db.dispose()


def test_model_error_per_model_and_clearing(tmp_path, receivers):
    asyncio.run(_model_error(tmp_path, *receivers))


async def _model_error(tmp_path, hook, smtp):
    h = Harness(_url(tmp_path), settings_for(hook, smtp))
    await h.rules.create(name="model down", condition="model_error == 1", severity="warning", enabled=True,
                         channels=["webhook"])
    s = psutil_sample({"a": "running", "b": "error"})
    await h.step(s)
    s = psutil_sample({"a": "error", "b": "error"}, after=s)
    await h.step(s)
    assert sorted(p["subject"] for p in hook.accepted()) == ["model:a", "model:b"]
    s = psutil_sample({"a": "running", "b": "error"}, after=s)  # a is repaired
    await h.step(s)
    last = hook.accepted()[-1]
    assert (last["state"], last["subject"]) == ("resolved", "model:a") and "cleared" in last["message"]
    s = psutil_sample({"a": "running"}, after=s)  # b is deleted
    await h.step(s)
    last = hook.accepted()[-1]
    assert (last["state"], last["subject"]) == ("resolved", "model:b") and "no longer reported" in last["message"]
    assert len(hook.accepted()) == 4 and smtp.messages == []  # the rule names only the webhook
    h.db.dispose()


def test_for_duration_cooldown_and_per_gpu(tmp_path, receivers):
    asyncio.run(_for_and_cooldown(tmp_path, *receivers))


async def _for_and_cooldown(tmp_path, hook, smtp):
    h = Harness(_url(tmp_path), settings_for(hook, smtp, cooldown_s=60))
    await h.rules.create(name="hot", condition="gpu_temperature > 80 for 30s", severity="warning", enabled=True,
                         channels=["webhook"])

    def with_gpus(base: Sample, *temps: float, seconds: float) -> Sample:
        gpus = tuple(GpuFigures(i, "test gpu", 50.0, 1 << 30, 4 << 30, t) for i, t in enumerate(temps))
        return dataclasses.replace(psutil_sample(after=base, seconds=seconds), gpus=gpus)

    s0 = psutil_sample()
    await h.step(with_gpus(s0, 85, 70, seconds=0))
    await h.step(with_gpus(s0, 85, 70, seconds=20))
    assert hook.accepted() == []  # held 20 s of the 30 s
    await h.step(with_gpus(s0, 85, 90, seconds=30))
    assert [(p["state"], p["subject"]) for p in hook.accepted()] == [("firing", "gpu:0")]
    await h.step(with_gpus(s0, 85, 90, seconds=60))  # gpu:1 has held 30 s now
    await h.step(with_gpus(s0, 85, 90, seconds=80))
    assert [(p["state"], p["subject"]) for p in hook.accepted()] == [("firing", "gpu:0"), ("firing", "gpu:1")]
    await h.step(with_gpus(s0, 85, 90, seconds=95))  # gpu:0 fired 65 s ago: notified again
    states = [(p["state"], p["subject"]) for p in hook.accepted()]
    assert states[-1] == ("repeat", "gpu:0") and len(states) == 3
    await h.step(with_gpus(s0, 85, 79, seconds=100))
    assert [(p["state"], p["subject"]) for p in hook.accepted()][-1] == ("resolved", "gpu:1")
    assert [e["state"] for e in h.published()] == ["firing", "firing", "resolved"]  # no repeat on the hub
    h.db.dispose()


def test_failing_channels_are_recorded_and_never_stop_the_evaluator(tmp_path, receivers):
    asyncio.run(_failing(tmp_path, *receivers))


async def _failing(tmp_path, hook, smtp):
    hook.replies = [500, 503, 500, 500]  # four failures: the first attempt and 3 retries
    cfg = settings_for(hook, smtp)
    cfg = cfg.model_copy(update={"smtp": cfg.smtp.model_copy(update={"port": 1})})  # nothing listens there
    h = Harness(_url(tmp_path), cfg)
    await h.rules.create(name="one", condition="cpu_percent >= 0", severity="info", enabled=True,
                         channels=["webhook", "email"])
    s = psutil_sample()
    await h.step(s)
    (event,) = h.history()
    target = event.notifications["webhook"]["targets"][0]
    assert not event.notifications["webhook"]["ok"] and target["attempts"] == 4 and target["error"] == "HTTP 500"
    assert not event.notifications["email"]["ok"] and "Error" in event.notifications["email"]["error"]
    assert len(hook.posts) == 4 and hook.accepted() == []
    # the evaluator goes on: a second rule fires at the next sample and is delivered
    await h.rules.create(name="two", condition="memory_percent >= 0", severity="info", enabled=True,
                         channels=["webhook"])
    await h.step(psutil_sample(after=s))
    assert [p["rule_name"] for p in hook.accepted()] == ["two"]
    h.db.dispose()


def test_redirects_are_not_followed_and_retries_recover(tmp_path, receivers):
    asyncio.run(_redirect(tmp_path, *receivers))


async def _redirect(tmp_path, hook, smtp):
    hook.replies = [302]
    h = Harness(_url(tmp_path), settings_for(hook, smtp))
    await h.rules.create(name="r", condition="disk_percent >= 0", severity="info", enabled=True, channels=["webhook"])
    s = psutil_sample()
    await h.step(s)
    assert [p["path"] for p in hook.posts] == ["/hook"]  # one attempt, the Location never fetched
    assert "redirects are not followed" in h.history()[0].notifications["webhook"]["targets"][0]["error"]
    hook.replies = [503]  # a passing failure: the retry delivers it
    await h.rules.update(h.rules.all()[0].id, {"condition": "disk_percent >= 1"})
    await h.step(psutil_sample(after=s))
    # the change resolves the old alert and fires the new one: two deliveries, one of them retried once
    firing, resolved = h.history()[:2]  # newest first: the resolution is recorded before the new firing
    assert (resolved.state, firing.state, firing.condition) == ("resolved", "firing", "disk_percent >= 1")
    assert "condition changed" in resolved.message
    attempts = sorted(e.notifications["webhook"]["targets"][0]["attempts"] for e in (resolved, firing))
    assert attempts == [1, 2] and resolved.notifications["webhook"]["ok"] and firing.notifications["webhook"]["ok"]
    h.db.dispose()


def test_builtin_thresholds_are_read_live_through_the_callable(tmp_path, receivers):
    asyncio.run(_builtin(tmp_path, *receivers))


async def _builtin(tmp_path, hook, smtp):
    current = {"t": QUIET}
    cfg = settings_for(hook, smtp).model_copy(update={"builtin_channels": ["webhook"]})
    h = Harness(_url(tmp_path), cfg, thresholds=lambda: current["t"])
    s = psutil_sample()
    await h.step(s)
    assert hook.accepted() == []
    current["t"] = QUIET.model_copy(update={"memory_percent_high": 0.0})  # any used memory passes 0
    s = psutil_sample(after=s)
    await h.step(s)
    (p,) = hook.accepted()
    assert p["rule_id"] == "builtin:memory_percent_high" and p["condition"] == "memory_percent > 0"
    current["t"] = QUIET
    await h.step(psutil_sample(after=s))
    assert [x["state"] for x in hook.accepted()] == ["firing", "resolved"]
    h.db.dispose()


def test_through_the_hub_as_a_lifespan_task(tmp_path, receivers):
    asyncio.run(_through_hub(tmp_path, *receivers))


async def _through_hub(tmp_path, hook, smtp):
    h = Harness(_url(tmp_path), settings_for(hook, smtp))
    await h.rules.create(name="hub", condition="cpu_percent >= 0", severity="info", enabled=True,
                         channels=["webhook"])
    h.ev.start(h.db)
    s = psutil_sample()
    h.hub.publish(SAMPLE, s)
    h.hub.publish(SAMPLE, "not a sample")  # a bad event is logged, and evaluation goes on
    h.hub.publish(SAMPLE, psutil_sample(after=s))
    for _ in range(200):
        if h.ev.samples >= 2 and hook.accepted():
            break
        await asyncio.sleep(0.05)
    await h.ev.drain()
    assert len(hook.accepted()) == 1 and h.ev.samples >= 2
    await h.ev.stop()
    h.db.dispose()


def test_email_with_starttls_and_login(tmp_path):
    asyncio.run(_starttls(tmp_path))


async def _starttls(tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    smtp, hook = SmtpReceiver(tls_context=server_ctx, logins={"chatvlm": "s3cret-pass"}), WebhookReceiver()
    try:
        good = {"host": "127.0.0.1", "port": smtp.port, "from": "chatvlm@example.org", "to": ["ops@example.org"],
                "starttls": True, "username": "chatvlm", "password": "s3cret-pass", "ca_file": str(ca_file),
                "timeout_s": 5}
        h = Harness(_url(tmp_path), AlertsSettings(smtp=good))
        await h.rules.create(name="tls", condition="cpu_percent >= 0", severity="info", enabled=True,
                             channels=["email"])
        await h.step(psutil_sample())
        assert len(smtp.messages) == 1 and smtp.logged_in == ["chatvlm"]
        assert h.history()[0].notifications["email"] == {"ok": True, "recipients": 1}
        # a wrong password, and a server certificate the client does not trust: recorded failures
        for bad in ({**good, "password": "wrong"}, {**good, "ca_file": None}, {**good, "starttls": False}):
            h2 = Harness(f"sqlite:///{tmp_path / 'other.db'}", AlertsSettings(smtp=bad))
            result = await h2.ev.notifier.send(["email"], {"alert_id": "a", "state": "firing", "severity": "info",
                                                          "rule_name": "r", "message": "m"})
            assert result["email"]["ok"] is False and "internal" not in result["email"]["error"], result
            h2.db.dispose()
        assert len(smtp.messages) == 1
        h.db.dispose()
    finally:
        smtp.close()
        hook.close()


def test_rules_are_re_read_so_replicas_agree(tmp_path):
    asyncio.run(_replicas(tmp_path))


async def _replicas(tmp_path):
    db = Database(_url(tmp_path))
    db.migrate()
    a, b = AlertRules(10), AlertRules(10)
    a.load(db)
    b.load(db)
    rec = await a.create(name="r", condition="cpu_percent > 1", severity="info", enabled=True, channels=[])
    assert b.enabled() == []
    await b.refresh()
    assert [r.id for r in b.enabled()] == [rec.id]
    await b.update(rec.id, {"enabled": False})
    await a.refresh()
    assert a.enabled() == [] and a.get(rec.id).enabled is False
    # a refresh that read before a change made here does not undo it
    refresh = asyncio.create_task(a.refresh())
    new = await a.create(name="n", condition="cpu_percent > 2", severity="info", enabled=True, channels=[])
    await refresh
    assert a.get(new.id).name == "n"
    with pytest.raises(Exception) as info:
        await a.create(name="x", condition="cpu_percent >", severity="info", enabled=True, channels=[])
    assert getattr(info.value, "code", None) == "INVALID_CONDITION" and info.value.details["position"] == 14
    db.dispose()


def test_history_is_pruned_after_history_days_but_firing_alerts_keep_theirs(database_url, receivers):
    asyncio.run(_history_pruned(database_url, *receivers))


async def _history_pruned(url, hook, smtp):
    h = Harness(url, settings_for(hook, smtp, cooldown_s=0, history_days=1))
    ended = await h.rules.create(name="ended", condition="cpu_percent >= 0", severity="info", enabled=True,
                                 channels=[])
    still = await h.rules.create(name="still", condition="memory_percent >= 0", severity="info", enabled=True,
                                 channels=[])
    old = psutil_sample()
    old = dataclasses.replace(old, ts=old.ts - timedelta(days=3))
    await h.step(old)  # both fire, three days ago (and the first prune finds nothing old yet)
    await h.rules.update(ended.id, {"enabled": False})
    await h.step(psutil_sample(after=old))  # `ended` resolves, three days ago; `still` keeps firing
    assert sorted((e.rule_id, e.state) for e in h.history()) == sorted(
        [(ended.id, "firing"), (ended.id, "resolved"), (still.id, "firing")])
    recent = psutil_sample()
    await h.step(recent)  # an hour has passed since the last prune: this sample prunes
    assert [(e.rule_id, e.state) for e in h.history()] == [(still.id, "firing")]
    assert await h.ev.prune(recent.ts) == 0
    await h.rules.update(still.id, {"enabled": False})
    await h.step(psutil_sample(after=recent))
    assert [(e.rule_id, e.state) for e in h.history()] == [(still.id, "resolved"), (still.id, "firing")]
    assert await h.ev.prune(recent.ts + timedelta(days=2)) == 2
    assert h.history() == []
    h.db.dispose()
