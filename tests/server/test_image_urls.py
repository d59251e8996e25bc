"""http(s) image URLs through the app's OpenAI surface: off by default, refused in OpenAI's
error shape when not allowed, and a real fetch from a local https server reaching the model."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from core.remote_images import ImageFetcher
from server.app import create_app
from tests.conftest import fake_settings
from tests.image_server import ImageServer


@pytest.fixture(scope="module")
def server():
    srv = ImageServer().start()
    yield srv
    srv.stop()


def client(tmp_path, image_urls=None, *, server=None) -> TestClient:
    settings = fake_settings(tmp_path, {"fast": {}}, **({"image_urls": image_urls} if image_urls else {}))
    app = create_app(settings)
    if server is not None:  # the real fetcher, pointed at the local server (test CA, 127.0.0.1 allowed)
        services = app.state.services
        services.image_fetcher = ImageFetcher(settings.image_urls, services.image_fetcher.max_bytes,
                                              address_policy=lambda ip: str(ip) == "127.0.0.1",
                                              ssl_context=server.client_ssl, resolver=server.resolver())
    return TestClient(app, raise_server_exceptions=False)


def chat(url: str, **extra) -> dict:
    return {"model": "fast", "max_tokens": 64, **extra, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def openai_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert err["param"] == "messages.0.content.1.image_url.url"
    return err


def test_off_by_default(tmp_path, fake_kind):
    with client(tmp_path) as c:
        r = c.post("/v1/chat/completions", json=chat("https://img.test/img.png"))
        err = openai_error(r, 400, "IMAGE_URL_NOT_ALLOWED")
        assert err["type"] == "invalid_request_error" and "not enabled" in err["message"]


ON = {"enabled": True, "allowed_domains": ["img.test"]}


def test_not_allowed_domain_and_literal_addresses(tmp_path, fake_kind):
    with client(tmp_path, ON) as c:
        for url in ("https://other.test/img.png", "https://10.0.0.1/img.png", "https://192.168.1.1/img.png",
                    "https://169.254.169.254/latest/meta-data/", "https://[::1]/x", "http://img.test/img.png"):
            err = openai_error(c.post("/v1/chat/completions", json=chat(url)), 400, "IMAGE_URL_NOT_ALLOWED")
            assert "10.0.0.1" not in err["message"] and "169.254" not in err["message"]


def test_production_fetcher_refuses_a_name_on_loopback(tmp_path, fake_kind):
    # The app's own fetcher (default address policy, system resolver): localhost is 127.0.0.1.
    with client(tmp_path, {"enabled": True, "allowed_domains": ["localhost"]}) as c:
        err = openai_error(c.post("/v1/chat/completions", json=chat("https://localhost/img.png")),
                           400, "IMAGE_URL_NOT_ALLOWED")
        assert "not public" in err["message"]


def test_fetched_image_reaches_the_model(tmp_path, fake_kind, server):
    with client(tmp_path, ON, server=server) as c:
        r = c.post("/v1/chat/completions", json=chat("https://img.test/img.png"))
        assert r.status_code == 200, r.text
        assert "[8x6]" in r.json()["choices"][0]["message"]["content"]  # the fake echoes image sizes
        r = c.post("/v1/chat/completions", json=chat("https://img.test/missing"))
        openai_error(r, 400, "IMAGE_FETCH_FAILED")
        r = c.post("/v1/chat/completions", json=chat("https://img.test/chunked/1000"))
        openai_error(r, 413, "FILE_TOO_LARGE")  # 16 MB streamed past the 10 MB cap
        r = c.post("/v1/chat/completions", json=chat("https://img.test/img.png", stream=True))
        assert r.status_code == 200 and "[8x6]" in "".join(
            line for line in r.text.splitlines() if line.startswith("data: {"))
        many = {"model": "fast", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"https://img.test/img.png?{i}"}} for i in range(11)]}]}
        r = c.post("/v1/chat/completions", json=many)
        assert r.status_code == 400 and r.json()["error"]["code"] == "TOO_MANY_IMAGE_URLS"


def test_a_request_refused_anyway_costs_no_fetch(tmp_path, fake_kind, server):
    """The checks that need no image run before any fetch: /slow would hold the request 30 s."""
    import time

    with client(tmp_path, ON, server=server) as c:
        started = time.monotonic()
        r = c.post("/v1/chat/completions", json=chat("https://img.test/slow", n=2))
        assert r.status_code == 400 and r.json()["error"]["code"] == "UNSUPPORTED_PARAMETER", r.text
        r = c.post("/v1/chat/completions", json={**chat("https://img.test/slow"), "model": "nope"})
        assert r.status_code == 404, r.text
        assert time.monotonic() - started < 5
