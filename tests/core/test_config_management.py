"""Settings of the management service: database URL, first admin password, secrets."""
from __future__ import annotations

import pytest

from core.config import ConfigError, load_settings
from tests.conftest import ROOT

EMPTY = ROOT / "tests" / "empty.yaml"
NO_MODELS = {"defaults": {"ocr": [], "chat": [], "text": []}}


def load(**overrides):
    return load_settings(EMPTY, **{**NO_MODELS, **overrides})


def test_defaults(monkeypatch):
    monkeypatch.delenv("CHATVLM_ADMIN_PASSWORD", raising=False)
    s = load()
    assert s.database.url is None and s.management.token_ttl_s == 3600 and s.management.admin_password is None
    assert "secret" not in repr(s.management) or s.management.jwt_secret is None


def test_admin_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHATVLM_ADMIN_PASSWORD", "from-env-123")
    assert load().management.admin_password == "from-env-123"
    monkeypatch.setenv("CHATVLM_MANAGEMENT__ADMIN_PASSWORD", "nested-wins-1")
    assert load().management.admin_password == "nested-wins-1"


def test_database_urls(monkeypatch):
    monkeypatch.setenv("CHATVLM_DATABASE__URL", "postgresql://u:p@h:5432/d")
    s = load()
    assert s.database.url == "postgresql+psycopg://u:p@h:5432/d" and "u:p@" not in repr(s)
    monkeypatch.setenv("CHATVLM_DATABASE__URL", "mysql://u@h/d")
    with pytest.raises(ConfigError, match="database.url"):
        load()


@pytest.mark.parametrize("override", [{"management": {"jwt_secret": "short"}},
                                      {"management": {"admin_password": "short"}},
                                      {"management": {"token_ttl_s": 5}},
                                      {"management": {"unknown": 1}}])
def test_bad_values_stop_start_up(override):
    with pytest.raises(ConfigError):
        load(**override)
