"""Two replicas of the server on a real two-node Ray cluster (127.0.0.2 and 127.0.0.3), sharing a
throw-away PostgreSQL and Redis, reached through Ray Serve's HTTP proxy: both answer; a model
created through one is served by the other; a job started through one is read through the
other (SSE through the proxy); WebSocket frames pass the proxy; killing one replica's actor
fails only the requests it held (5xx, never a hang) while the other keeps serving; one client's
rate limit holds across the replicas. Then the shipped YAML config deploys a second application
on the same cluster with the real `serve run deploy/ray_serve.yaml`, which answers through the
proxy. Everything is stopped at the end."""
from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from PIL import Image, ImageDraw, ImageFont

from scripts.make_doc_pages import scanned_pdf
from tests.e2e.management_api import ADMIN_PASSWORD, token
from tests.server_process import ROOT, free_port

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (requirements.txt)")
RPM = 600


def text_image(text: str) -> Image.Image:
    """A small line image: quick to read on a busy CPU."""
    img = Image.new("RGB", (900, 160), "white")
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 40)
    ImageDraw.Draw(img).text((30, 50), text, fill="black", font=font)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(postgres_cluster, redis_server, tmp_path_factory):
    from tests.ray_cluster import RayCluster

    env = {"CHATVLM_DATABASE__URL": postgres_cluster.new_database(), "CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "CHATVLM_MANAGEMENT__JWT_SECRET": "j" * 48, "CHATVLM_MANAGEMENT__REGISTRY_REFRESH_S": "0.5",
           "CHATVLM_RATE_LIMIT__STORAGE_URL": redis_server.url, "CHATVLM_RATE_LIMIT__REQUESTS_PER_MINUTE": str(RPM),
           "CHATVLM_JOBS__LEASE_S": "3", "CHATVLM_DATA_DIR": str(tmp_path_factory.mktemp("replica_data")),
           "CHATVLM_MODELS_DIR": str(tmp_path_factory.mktemp("weights")), "CHATVLM_SERVER__LOG_LEVEL": "warning",
           "OMP_NUM_THREADS": "1"}
    cluster = RayCluster(env)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def serve_url(cluster):
    from ray import serve

    from deploy.ray_serve import build_app
    from tests.ray_cluster import HEAD

    try:
        ray.init(address=cluster.address, _node_ip_address=HEAD, logging_level="warning", log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": HEAD, "port": port})
        serve.run(build_app({"replicas": 2, "num_cpus": 1, "max_replicas_per_node": 1}), name="chatvlm",
                  route_prefix="/", blocking=False)
        url = f"http://{HEAD}:{port}"
        end = time.monotonic() + 180
        while True:
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < end, cluster.logs()
            time.sleep(0.5)
        yield url
    finally:
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="module")
def page_png():
    return png(text_image("Ray Serve replicas read this line"))


def replica(r: requests.Response) -> str:
    return r.headers["x-replica-id"]


def by_other(fn, first: str, timeout: float = 60.0) -> requests.Response:
    """Repeat ``fn`` until another replica than ``first`` answers 200."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = fn()
        if r.status_code == 200 and replica(r) != first:
            return r
        time.sleep(0.2)
    raise AssertionError(f"no other replica answered 200 (last: {r.status_code} {r.text[:200]})")


def test_cluster(serve_url, page_png):
    url = serve_url
    # both replicas answer, each with its id
    ids = {replica(requests.get(url + "/health", timeout=10)) for _ in range(30)}
    assert len(ids) == 2, ids

    # a model created through one replica is served by the other
    auth = {"Authorization": "Bearer " + token(url)}
    r = requests.post(url + "/api/models", json={"name": "ray-ocr", "framework": "rapidocr"}, headers=auth,
                      timeout=60)
    assert r.status_code == 201, r.text
    ocr = by_other(lambda: requests.post(url + "/ocr", files={"file": ("p.png", page_png)},
                                         data={"model": "ray-ocr"}, timeout=120), replica(r), 120)
    assert ocr.json()["model"] == "ray-ocr" and ocr.json()["text"].strip()

    # a job started through one replica is read through the other, its SSE stream too
    r = requests.post(url + "/jobs/ocr", files={"file": ("d.pdf", scanned_pdf([Image.open(io.BytesIO(page_png))] * 2))},
                      data={"model": "ray-ocr"}, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    by_other(lambda: requests.get(f"{url}/jobs/{job_id}", timeout=10), replica(r))
    events = []
    with requests.get(f"{url}/jobs/{job_id}/events", stream=True, timeout=180) as s:
        event = None
        for line in s.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
                if event == "end":
                    break
    assert events[-1][1]["status"] == "succeeded" and sorted(d["page"] for e, d in events if e == "page") == [0, 1]
    result = by_other(lambda: requests.get(f"{url}/jobs/{job_id}/result", timeout=30), "")
    assert result.json()["pages"] == 2

    # WebSocket frames pass the proxy (a bad session id is answered with an error frame, then close)
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws") + "/ws/chat/bad!id/", open_timeout=30) as ws:
        frame = json.loads(ws.recv(timeout=30))
        assert frame["type"] == "error" and "INVALID_SESSION_ID" in json.dumps(frame)
        assert ws.response.headers.get("x-replica-id") in ids

    # kill one replica's actor under load: only requests it held fail, with a 5xx, never a hang
    victim = replica(requests.get(url + "/health", timeout=10))
    outcomes: list[tuple[float, int | str, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                r = requests.post(url + "/ocr", files={"file": ("p.png", page_png)}, data={"model": "ray-ocr"},
                                  timeout=60)
                outcomes.append((t, r.status_code, r.headers.get("x-replica-id")))
            except requests.RequestException as exc:
                outcomes.append((t, type(exc).__name__, None))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        time.sleep(3)
        name = next(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                    if n["name"].startswith("SERVE_REPLICA::") and n["name"].endswith(victim))
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        time.sleep(8)
        stop.set()
    failures = [o for o in outcomes if o[1] != 200]
    after = [o for o in outcomes if o[0] > killed_at + 1]
    assert all(isinstance(code, int) and code >= 500 for _, code, _ in failures), failures  # no hang, no timeout
    assert len(failures) <= 4, failures  # at most what the victim held: 4 clients, one request each
    assert after and all(code == 200 for _, code, _ in after), after  # the other one kept serving
    assert {rid for _, code, rid in after} - {victim}

    print(f"\nkill: {len(outcomes)} requests, {len(failures)} failed ({sorted(set(f[1] for f in failures))}), "
          f"{len(after)} after the kill all 200")

    # Serve replaces the killed replica (probes are not rate limited)
    end = time.monotonic() + 180
    while len({replica(requests.get(url + "/health", timeout=10)) for _ in range(10)} - {victim}) < 2:
        assert time.monotonic() < end, "the killed replica was not replaced"
        time.sleep(1)

    # One client's rate limit across the two replicas. The earlier requests may have left the
    # window by now, and a sliding window lets a few past RPM when these cross a minute's
    # boundary: a quarter more than RPM, still far from the 2 x RPM two windows of their own allow.
    seen: dict[str, list[int]] = {}
    for _ in range(RPM + RPM // 4):
        r = requests.get(url + "/models", timeout=10)
        if r.status_code == 429:
            break
        seen.setdefault(replica(r), []).append(int(r.headers["x-ratelimit-remaining"]))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    # Both served, neither reached the limit on its own: both counted into one window.
    assert len(seen) == 2 and all(len(passed) < RPM for passed in seen.values()), {k: len(v) for k, v in seen.items()}
    assert requests.get(url + "/models", timeout=10).status_code == 429


def serve_config(path: Path, proxy_port: int) -> Path:
    """deploy/ray_serve.yaml as shipped, with only what a test on a running cluster must change: the
    proxy where the cluster's is (the head's loopback address), a name and route of its own beside
    the application already there, one replica of half a CPU (what the nodes have left). The
    example's runtime_env (its database and Redis) is dropped: the nodes carry the test's settings
    in their environment, which replicas inherit."""
    from tests.ray_cluster import HEAD

    cfg = yaml.safe_load((ROOT / "deploy" / "ray_serve.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"] = {**cfg["http_options"], "host": HEAD, "port": proxy_port}
    (app,) = cfg["applications"]
    assert app["import_path"] == "deploy.ray_serve:build_app"
    args = {k: v for k, v in app["args"].items() if k not in ("min_replicas", "max_replicas", "target_ongoing_requests")}
    app.update(name="chatvlm-yaml", route_prefix="/yaml", args={**args, "replicas": 1, "num_cpus": 0.5})
    app.pop("runtime_env", None)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_serve_run_with_the_yaml_config(cluster, serve_url, tmp_path):
    """`serve run deploy/ray_serve.yaml` (the real CLI, reaching the cluster through Ray Client) deploys
    the application the config describes; it answers through the proxy, with its replica id."""
    from ray import serve

    from tests.ray_cluster import HEAD, ray_cli

    config = serve_config(tmp_path / "ray_serve.yaml", int(serve_url.rsplit(":", 1)[1]))
    command = [*ray_cli("ray.serve.scripts"), "run", "--non-blocking", "--address",
               f"ray://{HEAD}:{cluster.client_port}", str(config)]
    run = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=240)
    if run.returncode and "Starting Ray client server failed" in run.stderr:
        # Ray Client's per-connection server process did not come up (Ray's own start-up, once
        # seen on a loaded machine); a second connection starts a new one. Its log is kept.
        first = run.stderr[-1500:] + "".join(p.read_text(errors="replace")[-1500:]
                                             for p in Path(cluster.temp).rglob("ray_client_server_*.err"))
        run = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, first + "\n--- retry ---\n" + run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    try:
        end = time.monotonic() + 120
        while True:
            try:
                r = requests.get(serve_url + "/yaml/health", timeout=5)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < end, "the application from the YAML config did not answer"
            time.sleep(0.5)
        # its own replica (the rate limit test above used up this client's budget: /health is exempt)
        assert r.headers["x-replica-id"] not in {replica(requests.get(serve_url + "/health", timeout=10))
                                                 for _ in range(10)}
    finally:
        serve.delete("chatvlm-yaml")
