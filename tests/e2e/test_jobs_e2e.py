"""Asynchronous OCR jobs through real servers: lifecycle with SSE page events, the callback to a
local receiver, refused callbacks, cancel, expiry, a restart in the middle of a job, per-key
visibility and the per-client bound."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import requests

from scripts.make_doc_pages import draw_pdf, draw_png, make_page, scanned_pdf
from tests.e2e.conftest import similarity
from tests.server_process import RemoteServer, free_port

SEED = 202


@pytest.fixture(scope="module")
def pdf_pages():
    return [draw_png(make_page(i, "en", two_column=False, seed=SEED)) for i in range(4)]


@pytest.fixture(scope="module")
def pdf4(pdf_pages):
    return scanned_pdf(pdf_pages)


class Receiver:
    """A local HTTP endpoint that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("content-length", 0))
                outer.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.http = HTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("jobs_data")
    env = {"CHATVLM_DATA_DIR": str(data), "CHATVLM_JOBS__CALLBACK_ALLOWED_HOSTS": '["127.0.0.1"]',
           "CHATVLM_JOBS__MAX_PER_CLIENT": "3", "CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "300"}
    with RemoteServer(models_dir=tmp_path_factory.mktemp("nw"), env=env) as server:
        yield server


def submit(server, data: bytes, headers=None, **fields) -> requests.Response:
    return requests.post(f"{server.url}/jobs/ocr", files={"file": ("doc.pdf", data)}, data=fields,
                         headers=headers or {}, timeout=60)


def wait(server, job_id: str, until=("succeeded", "failed", "cancelled"), timeout=240, headers=None) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        body = requests.get(f"{server.url}/jobs/{job_id}", headers=headers or {}, timeout=10).json()
        if body["status"] in until:
            return body
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {body}")


def test_job_lifecycle_events_result_and_callback(jobs_server, pdf4):
    receiver = Receiver()
    try:
        r = submit(jobs_server, pdf4, format="markdown", pages="1-3",
                   callback_url=f"http://127.0.0.1:{receiver.port}/done")
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert set(accepted) == {"job_id", "status", "position"} and accepted["status"] == "queued"
        job_id = accepted["job_id"]
        early = requests.get(f"{jobs_server.url}/jobs/{job_id}/result", timeout=10)
        assert early.status_code in (409, 200)
        # the SSE stream gives each finished page, then the end
        pages, end = [], None
        with requests.get(f"{jobs_server.url}/jobs/{job_id}/events", stream=True, timeout=240) as s:
            event = None
            for line in s.iter_lines(decode_unicode=True):
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "page":
                    pages.append(json.loads(line[5:]))
                elif line.startswith("data:") and event == "end":
                    end = json.loads(line[5:])
                    break
        assert end["status"] == "succeeded" and end["pages_done"] == end["pages_total"] == 3
        assert sorted(p["page"] for p in pages) == [0, 1, 2]
        body = requests.get(f"{jobs_server.url}/jobs/{job_id}/result", timeout=30).json()
        assert body["model"] == "doc_cpu" and body["pages"] == 3 and body["markdown"].startswith("# ")
        # the same body as /ocr gives for the same pages
        direct = requests.post(f"{jobs_server.url}/ocr", files={"file": ("doc.pdf", pdf4)},
                               data={"format": "markdown", "pages": "1-3"}, timeout=120).json()
        assert set(body) == set(direct) and similarity(body["markdown"], direct["markdown"]) > 0.98
        for _ in range(50):
            if receiver.bodies:
                break
            time.sleep(0.1)
        assert receiver.bodies and receiver.bodies[0]["job_id"] == job_id
        assert receiver.bodies[0]["status"] == "succeeded"
    finally:
        receiver.close()


def test_a_born_digital_pdf_with_a_ruled_table(jobs_server):
    """The text layer's path through a job: its table cells' boxes are stored as JSON (they once
    carried numpy integers from OpenCV, and the job failed where /ocr succeeded)."""
    pdf = draw_pdf([make_page(0, "en", two_column=False, seed=SEED)])
    job_id = submit(jobs_server, pdf, format="json").json()["job_id"]
    done = wait(jobs_server, job_id)
    assert done["status"] == "succeeded" and done["pages_done"] == 1, done
    body = requests.get(f"{jobs_server.url}/jobs/{job_id}/result", timeout=30).json()
    blocks = [b for p in body["pages"] for b in p["blocks"]] if isinstance(body["pages"], list) else body["blocks"]
    tables = [b for b in blocks if b.get("category") == "Table" and b.get("cells")]
    assert tables and all(isinstance(v, int) for t in tables for c in t["cells"] for v in c["box"])


def test_bad_jobs_are_refused(jobs_server, pdf4):
    for url, code in (("http://169.254.169.254/latest", "CALLBACK_NOT_ALLOWED"), ("ftp://127.0.0.1/x", "INVALID_CALLBACK_URL"),
                      ("http://user:pw@127.0.0.1/", "INVALID_CALLBACK_URL")):
        r = submit(jobs_server, pdf4, callback_url=url)
        assert r.status_code == 400 and r.json()["code"] == code, r.text
    r = submit(jobs_server, pdf4, pages="9")
    assert r.status_code == 400 and "4 page" in r.json()["detail"]
    r = submit(jobs_server, b"not a document")
    assert r.status_code == 415
    r = requests.get(f"{jobs_server.url}/jobs/{'0' * 24}", timeout=10)
    assert r.status_code == 404 and r.json()["code"] == "JOB_NOT_FOUND"
    r = requests.get(f"{jobs_server.url}/jobs/../../etc", timeout=10)
    assert r.status_code == 404


def test_cancel_and_the_per_client_bound(jobs_server, pdf4):
    ids = [submit(jobs_server, pdf4, model="tesseract" if i else "doc_cpu", format="json").json()["job_id"]
           for i in range(3)]
    r = submit(jobs_server, pdf4)
    assert r.status_code == 429 and r.json()["code"] == "TOO_MANY_JOBS" and "Retry-After" in r.headers
    for job_id in ids:
        body = requests.delete(f"{jobs_server.url}/jobs/{job_id}", timeout=10).json()
        assert body["status"] in ("cancelled", "succeeded")
    body = wait(jobs_server, ids[0])
    assert body["status"] == "cancelled"
    r = requests.get(f"{jobs_server.url}/jobs/{ids[0]}/result", timeout=10)
    assert r.status_code == 409 and r.json()["code"] == "JOB_NOT_FINISHED"
    assert submit(jobs_server, pdf4, pages="1").status_code == 202  # room again


def test_expiry(tmp_path, pdf_pages):
    env = {"CHATVLM_DATA_DIR": str(tmp_path / "d"), "CHATVLM_JOBS__RETENTION_S": "2"}
    with RemoteServer(models_dir=tmp_path / "nw", env=env) as server:
        job_id = submit(server, scanned_pdf(pdf_pages[:1])).json()["job_id"]
        assert wait(server, job_id)["status"] == "succeeded"
        assert requests.get(f"{server.url}/jobs/{job_id}/result", timeout=10).status_code == 200
        end = time.monotonic() + 10
        while time.monotonic() < end and requests.get(f"{server.url}/jobs/{job_id}", timeout=10).status_code == 200:
            time.sleep(0.3)
        r = requests.get(f"{server.url}/jobs/{job_id}/result", timeout=10)
        assert r.status_code == 404
        assert not (tmp_path / "d" / "jobs" / job_id).exists()


def test_restart_in_the_middle_of_a_job(tmp_path, pdf_pages):
    env = {"CHATVLM_DATA_DIR": str(tmp_path / "d"), "CHATVLM_JOBS__WORKERS": "1"}
    pdf = scanned_pdf(pdf_pages * 2)  # 8 pages
    with RemoteServer(models_dir=tmp_path / "nw", env=env) as server:
        job_id = submit(server, pdf, model="doc_cpu").json()["job_id"]
        wait(server, job_id, until=("running",))
        end = time.monotonic() + 120
        while requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()["pages_done"] < 1:
            assert time.monotonic() < end
            time.sleep(0.2)
    with RemoteServer(models_dir=tmp_path / "nw", env=env) as server:  # the same data directory
        body = requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
        assert body["status"] in ("queued", "running", "succeeded") and body["pages_done"] >= 1
        body = wait(server, job_id)
        assert body["status"] == "succeeded" and body["pages_done"] == body["pages_total"] == 8
        result = requests.get(f"{server.url}/jobs/{job_id}/result", timeout=30).json()
        assert [p["page"] for p in result["page_results"]] == list(range(8))


def test_jobs_of_another_key_are_404(tmp_path, pdf_pages):
    env = {"CHATVLM_DATA_DIR": str(tmp_path / "d"), "CHATVLM_API_KEYS": "key-one-123456,key-two-654321"}
    one, two = {"X-API-Key": "key-one-123456"}, {"Authorization": "Bearer key-two-654321"}
    with RemoteServer(models_dir=tmp_path / "nw", env=env) as server:
        job_id = submit(server, scanned_pdf(pdf_pages[:1]), headers=one).json()["job_id"]
        assert wait(server, job_id, headers=one)["status"] == "succeeded"
        for path in ("", "/result", "/events"):
            r = requests.get(f"{server.url}/jobs/{job_id}{path}", headers=two, timeout=10)
            assert r.status_code == 404 and r.json()["code"] == "JOB_NOT_FOUND", path
        assert requests.delete(f"{server.url}/jobs/{job_id}", headers=two, timeout=10).status_code == 404
        assert requests.get(f"{server.url}/jobs/{job_id}", timeout=10).status_code == 401
        assert requests.get(f"{server.url}/jobs/{job_id}/result", headers=one, timeout=10).status_code == 200
