"""Rate limits: headers, 429 + Retry-After per surface, per-key counters, images, bounded memory."""
from __future__ import annotations

import base64
import io
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.testclient import WebSocketDenialResponse

from core.config import RateLimitSettings
from server.app import create_app
from server.ratelimit import RateLimiter
from tests.conftest import fake_settings


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "white").save(buf, "PNG")
    return buf.getvalue()


def away_from_minute_edge() -> None:
    # Sliding windows roll over on the minute: keep a short test inside one window.
    if time.time() % 60 > 56:
        time.sleep(60 - time.time() % 60 + 0.1)


def make_client(tmp_path, **overrides) -> TestClient:
    away_from_minute_edge()
    return TestClient(create_app(fake_settings(tmp_path, {"fast": {}}, **overrides)), raise_server_exceptions=False)


def test_headers_decrease_then_429(tmp_path, fake_kind):
    with make_client(tmp_path, rate_limit={"requests_per_minute": 3}) as c:
        seen = []
        for _ in range(3):
            r = c.get("/models")
            assert r.status_code == 200
            assert r.headers["x-ratelimit-limit"] == "3"
            assert int(r.headers["x-ratelimit-reset"]) >= int(time.time())
            seen.append(int(r.headers["x-ratelimit-remaining"]))
        assert seen == [2, 1, 0]
        r = c.get("/models")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert r.json()["code"] == "RATE_LIMITED" and "detail" in r.json()
        assert r.headers["x-ratelimit-remaining"] == "0"
        err = c.get("/v1/models").json()["error"]  # OpenAI shape
        assert err["type"] == "rate_limit_error" and err["code"] == "RATE_LIMITED"
        assert c.get("/api/v1/models").json()["error"]["code"] == "RATE_LIMITED"
        assert isinstance(c.get("/api/v1/llm/models/").json()["error"], str)
        for probe in ("/health", "/healthz", "/readyz"):  # never limited
            assert c.get(probe).status_code in (200, 503)
        with pytest.raises(WebSocketDenialResponse) as denied:
            with c.websocket_connect("/ws/chat/s1/"):
                pass
        assert denied.value.status_code == 429


def test_off_by_default(tmp_path, fake_kind):
    with make_client(tmp_path) as c:
        for _ in range(20):
            r = c.get("/models")
            assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers


def test_counters_are_per_key(tmp_path, fake_kind):
    with make_client(tmp_path, rate_limit={"requests_per_minute": 2}, auth={"api_keys": ["ka", "kb"]}) as c:
        a, b = {"Authorization": "Bearer ka"}, {"X-API-Key": "kb"}
        assert [c.get("/models", headers=a).status_code for _ in range(3)] == [200, 200, 429]
        r = c.get("/models", headers=b)
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "1"
        assert c.get("/models").status_code == 401  # auth comes before the limiter


def test_images_are_counted(tmp_path, fake_kind):
    with make_client(tmp_path, rate_limit={"images_per_minute": 3}) as c:
        files = [("files", ("a.png", png())), ("files", ("b.png", png()))]
        r = c.post("/batch/ocr", files=files)
        assert r.status_code == 200, r.text
        # Only the image limit is set: the main trio reports it, and the -images trio too.
        assert r.headers["x-ratelimit-remaining-images"] == "1" == r.headers["x-ratelimit-remaining"]
        assert r.headers["x-ratelimit-limit-images"] == "3"
        r = c.post("/batch/ocr", files=files)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["code"] == "RATE_LIMITED"
        assert c.post("/ocr", files={"file": ("a.png", png())}).status_code == 200
        assert c.get("/models").status_code == 200  # no images: not charged

    with make_client(tmp_path, rate_limit={"images_per_minute": 1, "requests_per_minute": 100}) as c:
        url = "data:image/png;base64," + base64.b64encode(png()).decode()
        part = {"type": "image_url", "image_url": {"url": url}}
        body = {"model": "fast", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                           part, part]}]}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers["x-ratelimit-limit"] == "100" and r.headers["x-ratelimit-limit-images"] == "1"


def test_memory_is_bounded_after_expiry():
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=5), period_s=1)
    for i in range(10_000):
        assert limiter.hit_request(f"addr:10.0.{i // 256}.{i % 256}")[0]
    assert limiter.tracked_keys() >= 10_000
    time.sleep(2.2)  # keys live two periods
    limiter.hit_request("addr:late")  # any hit arms the storage's expiry sweep
    time.sleep(0.2)
    assert limiter.tracked_keys() <= 2
    print(f"\nrate limiter: 10000 clients -> {limiter.tracked_keys()} keys after expiry")


def test_key_set_is_capped():
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=5, max_tracked_clients=100))
    for i in range(5_000):
        limiter.hit_request(f"addr:{i}")
        assert limiter.tracked_keys() <= 200
