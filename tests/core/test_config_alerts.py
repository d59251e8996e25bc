"""Settings of the alert channels: webhooks on the allow list, the mail server, from the file or the environment."""
from __future__ import annotations

import json

import pytest

from core.config import ConfigError, load_settings
from tests.conftest import ROOT

EMPTY = ROOT / "tests" / "empty.yaml"
NO_MODELS = {"defaults": {"ocr": [], "chat": [], "text": []}}


def load(**overrides):
    return load_settings(EMPTY, **{**NO_MODELS, **overrides})


def test_defaults_send_nothing():
    a = load().alerts
    assert a.webhooks == [] and a.smtp is None and a.cooldown_s == 3600 and a.webhook_retries == 3


def test_channels_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHATVLM_ALERTS__WEBHOOKS", '["https://hooks.example.org/x?k=1"]')
    monkeypatch.setenv("CHATVLM_ALERTS__WEBHOOK_ALLOWED_HOSTS", '["HOOKS.example.org"]')
    monkeypatch.setenv("CHATVLM_ALERTS__SMTP", json.dumps({"host": "smtp.example.org", "port": 587, "starttls": True,
                                                           "username": "u", "password": "pw-secret",
                                                           "from": "a@example.org", "to": ["b@example.org"]}))
    a = load().alerts
    assert a.webhooks == ["https://hooks.example.org/x?k=1"]
    assert (a.smtp.port, a.smtp.starttls, a.smtp.from_, a.smtp.to) == (587, True, "a@example.org", ["b@example.org"])
    assert "pw-secret" not in repr(a.smtp)


@pytest.mark.parametrize("alerts, words", [
    ({"webhooks": ["https://evil.example.org/x"], "webhook_allowed_hosts": ["hooks.example.org"]},
     "not in alerts.webhook_allowed_hosts"),
    ({"webhooks": ["ftp://hooks.example.org/x"], "webhook_allowed_hosts": ["hooks.example.org"]}, "http(s) URL"),
    ({"smtp": {"host": "h", "from": "a@b", "to": []}}, "alerts.smtp.to"),
    ({"smtp": {"host": "h", "from": "a@b", "to": ["not an address"]}}, "e-mail address"),
    ({"smtp": {"host": "h", "to": ["a@b"]}}, "from"),
    ({"builtin_channels": ["pager"]}, "builtin_channels"),
    ({"webhook_retries": 11}, "webhook_retries"),
])
def test_bad_channels_stop_start_up(alerts, words):
    with pytest.raises(ConfigError) as info:
        load(alerts=alerts)
    assert words in str(info.value), str(info.value)
