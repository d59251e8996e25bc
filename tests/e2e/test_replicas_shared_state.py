"""Two real server processes sharing one PostgreSQL database and one Redis, as replicas do: a model
created through one is served by the other, a job started through one is read, streamed and
cancelled through the other, a model started or stopped through one is started or stopped on the
other, and a client's rate limit is one limit across both."""
from __future__ import annotations

import io
import json
import time

import pytest
import requests

from PIL import Image, ImageDraw, ImageFont

from scripts.make_doc_pages import scanned_pdf
from tests.e2e.management_api import ADMIN_PASSWORD, Api, token
from tests.server_process import RemoteServer


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
def replicas(postgres_cluster, redis_server, tmp_path_factory):
    env = {"CHATVLM_DATABASE__URL": postgres_cluster.new_database(), "CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "CHATVLM_MANAGEMENT__JWT_SECRET": "s" * 48, "CHATVLM_MANAGEMENT__REGISTRY_REFRESH_S": "0.5",
           "CHATVLM_RATE_LIMIT__STORAGE_URL": redis_server.url, "CHATVLM_RATE_LIMIT__REQUESTS_PER_MINUTE": "1000",
           "CHATVLM_JOBS__LEASE_S": "3", "CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "300"}
    weights = tmp_path_factory.mktemp("weights")
    with RemoteServer(models_dir=weights, env=env) as a, RemoteServer(models_dir=weights, env=env) as b:
        yield a, b


@pytest.fixture(scope="module")
def pages():
    return [text_image(f"Shared replicas page {i} reads well") for i in range(3)]


def until(check, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_a_model_created_through_one_is_served_by_the_other(replicas, pages):
    a, b = replicas
    api_a, api_b = Api(a.url), Api(b.url)
    assert api_a.post("/api/models", json={"name": "shared-ocr", "framework": "rapidocr"}).status_code == 201
    until(lambda: api_b.get("/api/models/shared-ocr").status_code == 200)
    r = requests.post(b.url + "/ocr", files={"file": ("p.png", png(pages[0]))}, data={"model": "shared-ocr"}, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == "shared-ocr" and r.json()["text"].strip(), r.text
    assert api_b.delete("/api/models/shared-ocr").status_code in (200, 204)
    until(lambda: requests.post(a.url + "/ocr", files={"file": ("p.png", png(pages[0]))}, data={"model": "shared-ocr"},
                                timeout=120).status_code == 404)


def test_a_job_started_through_one_is_read_and_cancelled_through_the_other(replicas, pages):
    a, b = replicas
    r = requests.post(a.url + "/jobs/ocr", files={"file": ("d.pdf", scanned_pdf(pages[:2]))}, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    events = []
    with requests.get(f"{b.url}/jobs/{job_id}/events", stream=True, timeout=240) as s:
        event = None
        for line in s.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
                if event == "end":
                    break
    assert events[-1][1]["status"] == "succeeded"
    assert sorted(d["page"] for e, d in events if e == "page") == [0, 1]
    result = requests.get(f"{b.url}/jobs/{job_id}/result", timeout=30).json()
    assert result["pages"] == 2 and result["text"].strip()
    # a long job started on b, cancelled through a: b stops before its next page
    r = requests.post(b.url + "/jobs/ocr", files={"file": ("d.pdf", scanned_pdf(pages * 4))}, timeout=60)
    long_id = r.json()["job_id"]
    until(lambda: requests.get(f"{a.url}/jobs/{long_id}", timeout=10).json()["status"] == "running", 120)
    assert requests.delete(f"{a.url}/jobs/{long_id}", timeout=10).json()["status"] == "cancelled"
    time.sleep(3)
    body = requests.get(f"{b.url}/jobs/{long_id}", timeout=10).json()
    assert body["status"] == "cancelled" and body["pages_done"] < 12


def test_one_rate_limit_across_both(replicas):
    a, b = replicas
    client = {"X-Forwarded-For": "ignored"}  # the limit is per client address: both see 127.0.0.1
    remaining = [int(requests.get(s.url + "/models", headers=client, timeout=10).headers["x-ratelimit-remaining"])
                 for s in (a, b, a, b)]
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == 4
    assert remaining[0] - remaining[-1] >= 3  # each server's request counted once in one shared window


def test_a_user_deleted_through_one_loses_its_token_on_the_other(replicas):
    a, b = replicas
    admin_a = Api(a.url)
    assert admin_a.post("/api/users", json={"username": "roamer", "password": "roamer-pass-1"}).status_code == 201
    bearer = {"Authorization": "Bearer " + token(a.url, "roamer", "roamer-pass-1")}
    until(lambda: requests.get(b.url + "/api/users/me", headers=bearer, timeout=10).status_code == 200)
    assert admin_a.delete("/api/users/roamer").status_code in (200, 204)
    until(lambda: requests.get(b.url + "/api/users/me", headers=bearer, timeout=10).status_code == 401)


def test_a_start_or_stop_through_one_is_followed_by_the_other(replicas, pages):
    """The desired state is shared: a model started through one replica loads on the other at its next
    registry refresh (no request needed), and one stopped through the other stops on the first and
    stays stopped there (503 MODEL_NOT_RUNNING, no lazy load)."""
    a, b = replicas
    api_a, api_b = Api(a.url), Api(b.url)
    assert api_a.post("/api/models", json={"name": "follow-ocr", "framework": "rapidocr"}).status_code == 201
    until(lambda: api_b.get("/api/models/follow-ocr").status_code == 200)
    assert api_b.get("/api/models/follow-ocr").json()["status"] == "created"
    assert api_a.post("/api/models/follow-ocr/start").status_code == 202
    until(lambda: api_b.get("/api/models/follow-ocr").json()["status"] == "running", 120)
    assert "follow-ocr" in requests.get(b.url + "/health", timeout=10).json()["loaded_models"]
    assert api_b.post("/api/models/follow-ocr/stop").status_code == 202
    until(lambda: api_a.get("/api/models/follow-ocr").json()["status"] == "stopped", 60)
    assert "follow-ocr" not in requests.get(a.url + "/health", timeout=10).json()["loaded_models"]
    r = requests.post(a.url + "/ocr", files={"file": ("p.png", png(pages[0]))}, data={"model": "follow-ocr"}, timeout=60)
    assert r.status_code == 503 and r.json()["code"] == "MODEL_NOT_RUNNING", r.text
    assert api_a.delete("/api/models/follow-ocr").status_code in (200, 204)
