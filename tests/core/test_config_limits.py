"""The settings added for hardening: their defaults and the start-up errors for bad values."""
from __future__ import annotations

import pytest

from core.config import ConfigError, load_settings
from tests.conftest import ROOT

CONFIG = ROOT / "config.yaml"


def test_hardening_defaults():
    s = load_settings(CONFIG)
    assert s.image_urls.enabled is False and s.image_urls.allowed_domains == []
    assert (s.server.drain_announce_s, s.server.graceful_timeout_s, s.server.idle_trim_s) == (0, 10, 2.0)
    assert s.server.malloc_arena_max == 0 and s.limits.decode_queue == 32


@pytest.mark.parametrize("image_urls, named", [
    ({"enabled": True}, "allowed_domains"),
    ({"enabled": True, "allowed_domains": ["*"]}, "'*'"),
    ({"enabled": True, "allowed_domains": ["img.example.com:8443"]}, "img.example.com:8443"),
    ({"enabled": True, "allowed_domains": ["https://img.example.com"]}, "https://img.example.com"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_bad_image_url_settings_stop_start_up(image_urls, named):
    with pytest.raises(ConfigError) as err:
        load_settings(CONFIG, image_urls=image_urls)
    assert named in str(err.value)


def test_image_url_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHATVLM_IMAGE_URLS__ENABLED", "true")
    monkeypatch.setenv("CHATVLM_IMAGE_URLS__ALLOWED_DOMAINS", '["*.example.com", "img.test"]')
    s = load_settings(CONFIG)
    assert s.image_urls.enabled and s.image_urls.allowed_domains == ["*.example.com", "img.test"]
