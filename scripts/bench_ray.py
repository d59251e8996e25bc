"""Ray Serve replicas on this machine, measured side by side in one run:

1. the proxy's added latency: sequential ``GET /healthz`` (the cheapest route: what differs is the
   path, not the work) through Ray Serve's HTTP proxy to one replica, alternating request by
   request with the same call straight to a server started with ``python api.py``;
2. throughput of two replicas against one: concurrent ``/ocr`` (RapidOCR, a small line image)
   through the proxy, the same clients and request count for both.

Replicas share state as in production: a throw-away PostgreSQL (database.url) and Redis
(rate_limit.storage_url, with a limit too high to bite), on a two-node loopback Ray cluster
(127.0.0.2 head, 127.0.0.3 worker; see tests/ray_cluster.py).

    python scripts/bench_ray.py [--requests 300] [--ocr 60] [--clients 4]

Loopback only, bounded loops; everything started is stopped at the end.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.postgres import PostgresCluster, pg_bin  # noqa: E402
from tests.ray_cluster import HEAD, RayCluster  # noqa: E402
from tests.redis_server import RedisServer, redis_bin  # noqa: E402
from tests.server_process import RemoteServer, free_port  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def line_png() -> bytes:
    img = Image.new("RGB", (900, 160), "white")
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 40)
    ImageDraw.Draw(img).text((30, 50), "Replicas share one database", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def latencies(urls: list[str], n: int) -> list[list[float]]:
    """``n`` sequential requests to each URL, alternating one by one (noise falls on all alike)."""
    sessions = [requests.Session() for _ in urls]
    out: list[list[float]] = [[] for _ in urls]
    for _ in range(n):
        for i, (url, s) in enumerate(zip(urls, sessions)):
            t = time.perf_counter()
            r = s.get(url + "/healthz", timeout=30)
            out[i].append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return out


def ocr_throughput(url: str, image: bytes, total: int, clients: int) -> tuple[float, dict[str, int]]:
    per_replica: dict[str, int] = {}

    def one(_: int) -> None:
        r = requests.post(url + "/ocr", files={"file": ("l.png", image)}, data={"model": "rapidocr"}, timeout=300)
        assert r.status_code == 200, r.text
        rid = r.headers.get("x-replica-id", "direct")
        per_replica[rid] = per_replica.get(rid, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(total)))
    return total / (time.perf_counter() - start), per_replica


def warm(url: str, image: bytes, replicas: int) -> None:
    """Until ``replicas`` distinct replicas have read an image (each loads its own RapidOCR)."""
    seen: set[str] = set()
    end = time.monotonic() + 300
    while len(seen) < replicas:
        assert time.monotonic() < end, "replicas did not warm up"
        with ThreadPoolExecutor(replicas * 2) as pool:
            for r in pool.map(lambda _: requests.post(url + "/ocr", files={"file": ("l.png", image)},
                                                      data={"model": "rapidocr"}, timeout=300), range(replicas * 2)):
                if r.status_code == 200:
                    seen.add(r.headers.get("x-replica-id", "direct"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--ocr", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    if not (pg_bin() and redis_bin()):
        sys.exit("needs PostgreSQL and redis-server (scripts/system_deps.sh test)")
    import ray
    from ray import serve

    from deploy.ray_serve import build_app

    pg, redis = PostgresCluster(pg_bin()), RedisServer(redis_bin())
    cluster = direct = None
    data = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    env = {"CHATVLM_DATABASE__URL": pg.new_database(), "CHATVLM_RATE_LIMIT__STORAGE_URL": redis.url,
           "CHATVLM_RATE_LIMIT__REQUESTS_PER_MINUTE": "1000000", "CHATVLM_MANAGEMENT__JWT_SECRET": "b" * 48,
           "CHATVLM_ADMIN_PASSWORD": "bench-admin-pass", "CHATVLM_DATA_DIR": str(data),
           "CHATVLM_MODELS_DIR": str(data / "weights"), "CHATVLM_SERVER__LOG_LEVEL": "warning"}
    image = line_png()
    try:
        t = time.monotonic()
        cluster = RayCluster(env)
        ray.init(address=cluster.address, _node_ip_address=HEAD, logging_level="warning", log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": HEAD, "port": port})
        url = f"http://{HEAD}:{port}"
        serve.run(build_app({"replicas": 1, "num_cpus": 1}), name="chatvlm", route_prefix="/", blocking=False)
        print(f"cluster and one replica up in {time.monotonic() - t:.0f} s")
        # Ray sets OMP_NUM_THREADS to a replica's num_cpus (1): the direct server gets the same
        # and, like the Ray cluster, a session of its own: Linux shares the CPU between sessions
        # (autogroups) first, which on a busy machine decides more than the code does
        direct = RemoteServer(env={**env, "OMP_NUM_THREADS": "1"}, new_session=True)
        warm(url, image, 1)
        warm(direct.url, image, 1)

        latencies([url, direct.url], 20)
        via, straight = latencies([url, direct.url], args.requests)
        print(f"\nGET /healthz, {len(via)} sequential requests each, alternating "
              f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
        print(f"  direct uvicorn     p50 {pct(straight, 50) * 1e3:6.2f} ms  p95 {pct(straight, 95) * 1e3:6.2f} ms")
        print(f"  via Ray Serve      p50 {pct(via, 50) * 1e3:6.2f} ms  p95 {pct(via, 95) * 1e3:6.2f} ms")
        print(f"  proxy adds         p50 {(pct(via, 50) - pct(straight, 50)) * 1e3:6.2f} ms  "
              f"mean {(statistics.mean(via) - statistics.mean(straight)) * 1e3:6.2f} ms")

        # one /ocr at a time, alternating: the same work on both paths, the machine's noise on both
        paired: list[list[float]] = [[], []]
        for _ in range(10):
            for i, target in enumerate((url, direct.url)):
                t = time.perf_counter()
                r = requests.post(target + "/ocr", files={"file": ("l.png", image)}, data={"model": "rapidocr"},
                                  timeout=300)
                assert r.status_code == 200, r.text
                paired[i].append(time.perf_counter() - t)
        print(f"\n/ocr one at a time, 10 each, alternating: via Ray p50 {pct(paired[0], 50) * 1e3:.0f} ms, "
              f"direct p50 {pct(paired[1], 50) * 1e3:.0f} ms")
        direct_rps, _ = ocr_throughput(direct.url, image, args.ocr, args.clients)
        direct.stop()
        direct = None
        one_rps, one_split = ocr_throughput(url, image, args.ocr, args.clients)
        serve.run(build_app({"replicas": 2, "num_cpus": 1, "max_replicas_per_node": 1}), name="chatvlm",
                  route_prefix="/", blocking=False)
        warm(url, image, 2)
        two_rps, two_split = ocr_throughput(url, image, args.ocr, args.clients)
        print(f"\n/ocr (RapidOCR, 900x160 line), {args.ocr} requests from {args.clients} clients "
              f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
        print(f"  direct uvicorn     {direct_rps:6.2f} req/s")
        print(f"  Ray, 1 replica     {one_rps:6.2f} req/s   split {sorted(one_split.values())}")
        print(f"  Ray, 2 replicas    {two_rps:6.2f} req/s   split {sorted(two_split.values())}")
        print(f"  2 replicas / 1     {two_rps / one_rps:6.2f}x    Ray 1 replica / direct {one_rps / direct_rps:5.2f}x")
    finally:
        if direct is not None:
            direct.stop()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.stop()
        redis.stop()
        pg.stop()


if __name__ == "__main__":
    main()
