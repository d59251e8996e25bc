"""Rate limits and the login throttle on a real Redis server shared by two limiters and by two
real server processes: one limit for a client across both; a Redis outage fails open, fast."""
from __future__ import annotations

import time
import uuid

import requests

from core.config import RateLimitSettings
from management.throttle import LoginThrottle
from server.ratelimit import RateLimiter
from tests.server_process import RemoteServer, free_port

PASSWORD = "admin-password-123"


def test_two_limiters_on_one_redis_count_one_limit(redis_server):
    settings = RateLimitSettings(requests_per_minute=3, images_per_minute=4, storage_url=redis_server.url)
    one, two = RateLimiter(settings), RateLimiter(settings)
    client = f"addr:{uuid.uuid4().hex}"
    results = [limiter.hit_request(client)[0] for limiter in (one, two, one, two)]
    assert results == [True, True, True, False]
    ok, window = two.hit_request(client)
    assert not ok and window.limit == 3 and window.remaining == 0 and window.retry_after() >= 1
    assert one.hit_request(f"addr:{uuid.uuid4().hex}")[0]  # another client is not affected
    assert one.hit_images(client, 3)[0] and not two.hit_images(client, 2)[0]
    assert two.image_window(client).remaining == 1


def test_login_throttle_is_shared(redis_server):
    one, two = LoginThrottle(2, 100, redis_server.url), LoginThrottle(2, 100, redis_server.url)
    user = f"user-{uuid.uuid4().hex[:8]}"
    one.check(user, "10.0.0.1")
    one.failed(user, "10.0.0.1")
    two.failed(user, "10.0.0.2")
    try:
        two.check(user, "10.0.0.3")
    except Exception as exc:  # noqa: BLE001 - asserted just below
        assert type(exc).__name__ == "RateLimited" and int(exc.headers["Retry-After"]) >= 1
    else:
        raise AssertionError("the second replica did not see the first one's failures")
    one.succeeded(user)
    two.check(user, "10.0.0.3")


def test_redis_down_fails_open_fast():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=1, storage_url=dead))
    throttle = LoginThrottle(1, 1, dead)
    start = time.monotonic()
    for _ in range(3):
        assert limiter.hit_request("addr:x") == (True, None)
        throttle.failed("u", "a")
        throttle.check("u", "a")
    assert time.monotonic() - start < 5


def test_two_servers_share_one_limit(redis_server, tmp_path):
    env = {"CHATVLM_RATE_LIMIT__REQUESTS_PER_MINUTE": "6", "CHATVLM_RATE_LIMIT__STORAGE_URL": redis_server.url,
           "CHATVLM_ADMIN_PASSWORD": PASSWORD}
    with RemoteServer(models_dir=tmp_path / "w", env=env) as a, RemoteServer(models_dir=tmp_path / "w", env=env) as b:
        seen = []
        for i in range(6):
            r = requests.get((a if i % 2 else b).url + "/models", timeout=30)
            assert r.status_code == 200, r.text
            seen.append(int(r.headers["x-ratelimit-remaining"]))
        assert seen == [5, 4, 3, 2, 1, 0]  # one count across both servers
        for server in (a, b):
            r = requests.get(server.url + "/models", timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert requests.get(a.url + "/health", timeout=30).status_code == 200  # probes are never limited
        # Failed logins through one server count at the other (5 per user and minute by default).
        for server in (a, b, a, b, a):
            r = requests.post(server.url + "/api/auth/token", json={"username": "admin", "password": "wrong-pass"},
                              timeout=30)
            assert r.status_code in (401, 429)
        r = requests.post(b.url + "/api/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=30)
        assert r.status_code == 429, r.text
