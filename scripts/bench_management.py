"""Management-service overhead, measured side by side in one run against a real server.

1. ``GET /api/models?page=1&size=100`` with 1,000 registered models (target: p95 <= 50 ms),
   beside ``GET /health`` on the same server as the floor of an HTTP round trip.
2. The cost of a token check against an API-key check: ``/v1/chat/completions`` (1 token on the
   tiny checkpoint) and ``GET /v1/models``, alternating an API key and a JWT on one server with keys
   on (target: the token adds <= 1 ms), plus each check alone in-process (microseconds per call).

    python scripts/bench_management.py [--models 1000] [--requests 300]

Loopback only, bounded loops.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.server_process import RemoteServer  # noqa: E402

PASSWORD = "bench-admin-password"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 50) * 1000:6.2f} ms  p95 {pct(values, 95) * 1000:6.2f} ms"


def timed(session: requests.Session, method: str, url: str, **kw) -> float:
    t = time.perf_counter()
    r = session.request(method, url, timeout=60, **kw)
    elapsed = time.perf_counter() - t
    assert r.status_code == 200, r.text[:300]
    return elapsed


def login(url: str) -> str:
    r = requests.post(url + "/api/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=30)
    r.raise_for_status()
    return r.json()["access_token"]


def bench_listing(n_models: int, n_requests: int) -> dict:
    weights = Path(tempfile.mkdtemp(prefix="bench-mgmt-"))
    with RemoteServer(models_dir=weights, env={"CHATVLM_ADMIN_PASSWORD": PASSWORD}) as srv:
        s = requests.Session()
        s.headers["Authorization"] = "Bearer " + login(srv.url)
        started = time.perf_counter()
        for i in range(n_models):
            r = s.post(srv.url + "/api/models", json={
                "name": f"bench-{i:04d}", "framework": "rapidocr" if i % 2 else "tesseract",
                "description": "benchmark model", "tags": ["bench", f"group-{i % 10}"],
                "config": {"n_ctx": 2048, "temperature": 0.7}}, timeout=60)
            assert r.status_code == 201, r.text
        create_s = time.perf_counter() - started
        page = s.get(srv.url + "/api/models", params={"page": 1, "size": 100}, timeout=60).json()
        assert page["total"] >= n_models and len(page["items"]) == 100
        for _ in range(20):  # warm-up
            timed(s, "GET", srv.url + "/api/models", params={"page": 1, "size": 100})
        listing, health, filtered = [], [], []
        for _ in range(n_requests):  # interleaved, so load on the machine hits both alike
            listing.append(timed(s, "GET", srv.url + "/api/models", params={"page": 1, "size": 100}))
            health.append(timed(s, "GET", srv.url + "/health"))
            filtered.append(timed(s, "GET", srv.url + "/api/models",
                                  params={"page": 3, "size": 100, "framework": "tesseract", "status": "created"}))
    return {"create_s": create_s, "listing": listing, "health": health, "filtered": filtered}


def bench_token(n_requests: int) -> dict:
    from scripts.make_tiny_models import build_tiny_models

    weights = Path(tempfile.mkdtemp(prefix="bench-mgmt-tiny-"))
    build_tiny_models(weights, ["qwen2_5_0_5b"])
    env = {"CHATVLM_ADMIN_PASSWORD": PASSWORD, "CHATVLM_API_KEYS": "bench-api-key"}
    body = {"model": "qwen2_5_0_5b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with RemoteServer(models_dir=weights, env=env) as srv:
        jwt = login(srv.url)
        by_key, by_token = requests.Session(), requests.Session()
        by_key.headers["Authorization"] = "Bearer bench-api-key"
        by_token.headers["Authorization"] = f"Bearer {jwt}"
        out: dict[str, list[float]] = {"chat_key": [], "chat_token": [], "list_key": [], "list_token": []}
        for _ in range(20):
            timed(by_key, "POST", srv.url + "/v1/chat/completions", json=body)
            timed(by_token, "POST", srv.url + "/v1/chat/completions", json=body)
        for i in range(n_requests):
            order = ((by_key, "key"), (by_token, "token")) if i % 2 else ((by_token, "token"), (by_key, "key"))
            for session, label in order:
                out[f"chat_{label}"].append(timed(session, "POST", srv.url + "/v1/chat/completions", json=body))
                out[f"list_{label}"].append(timed(session, "GET", srv.url + "/v1/models"))
    return out


def bench_checks(n: int = 20000) -> dict:
    """Each check alone, in-process: the API-key digest match and the JWT verification."""
    from core.config import ManagementSettings
    from management.identity import Identity
    from server.auth import KeyRing, digest

    ring = KeyRing([digest("bench-api-key").hex()])
    identity = Identity(ManagementSettings(jwt_secret="s" * 48), Path(tempfile.mkdtemp()))
    identity._secret, identity._roles = "s" * 48, {"admin": "admin"}
    token = identity.issue("admin").access_token
    assert ring.match("bench-api-key") and identity.verify(token)
    results = {}
    for label, fn, arg in (("api_key", ring.match, "bench-api-key"), ("jwt", identity.verify, token)):
        t = time.perf_counter()
        for _ in range(n):
            fn(arg)
        results[label] = (time.perf_counter() - t) / n
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    lst = bench_listing(args.models, args.requests)
    print(f"\n1. GET /api/models, page 1 of size 100, {args.models} models ({args.requests} requests each; "
          f"creating them took {lst['create_s']:.1f} s)")
    print(f"   /api/models page 1          {ms(lst['listing'])}")
    print(f"   /api/models filtered page 3 {ms(lst['filtered'])}")
    print(f"   /health (floor)             {ms(lst['health'])}")
    p95 = pct(lst["listing"], 95) * 1000
    print(f"   p95 {p95:.2f} ms: {'meets' if p95 <= 50 else 'MISSES'} the 50 ms target; "
          f"{pct(lst['listing'], 50) / pct(lst['health'], 50):.1f}x /health at p50")

    tok = bench_token(args.requests)
    print(f"\n2. Token check against API-key check ({args.requests} alternating requests each)")
    for route, a, b in (("/v1/chat/completions", "chat_key", "chat_token"), ("/v1/models", "list_key", "list_token")):
        key_med, tok_med = statistics.median(tok[a]), statistics.median(tok[b])
        print(f"   {route:22s} API key {ms(tok[a])} | JWT {ms(tok[b])} | median difference "
              f"{(tok_med - key_med) * 1000:+.3f} ms ({tok_med / key_med:.3f}x)")
    checks = bench_checks()
    print(f"   in-process: API-key match {checks['api_key'] * 1e6:.1f} us, JWT verify {checks['jwt'] * 1e6:.1f} us "
          f"per call (JWT adds {(checks['jwt'] - checks['api_key']) * 1e6:.1f} us; target <= 1000 us)")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
