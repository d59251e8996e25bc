"""RapidOCR's worker processes under the real server and the real CLI: a worker killed during a
request gives a 503 and the next request works; no worker outlives the server or the CLI
(stopped, or killed with SIGKILL)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from tests.ocr import ROOT, SAMPLES, load_rgb
from tests.server_process import RemoteServer

MARK = "CHATVLM_TEST_WORKER_MARK"


def _workers(mark: str) -> list[psutil.Process]:
    """RapidOCR worker processes started under this mark (inherited through the environment)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "ocr.workers" in " ".join(proc.info["cmdline"] or ()) and proc.environ().get(MARK) == mark:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _wait_none(mark: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _workers(mark):
        assert time.monotonic() < deadline, [p.pid for p in _workers(mark)]
        time.sleep(0.1)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _big_page(variant: int = 0) -> bytes:
    """Four receipts on one page (a long call); ``variant`` changes one corner pixel."""
    receipt = load_rgb("receipt_en.png")
    w, h = receipt.size
    page = Image.new("RGB", (2 * w, 2 * h), "white")
    for i in range(4):
        page.paste(receipt, ((i % 2) * w, (i // 2) * h))
    page.putpixel((0, 0), (variant % 256, 255, 255))
    return _png(page)


def _ocr(server: RemoteServer, data: bytes) -> requests.Response:
    return requests.post(server.url + "/ocr", files={"file": ("page.png", data)}, params={"model": "rapidocr"},
                         timeout=300)


def _server(tmp_path: Path, mark: str) -> RemoteServer:
    return RemoteServer(models_dir=tmp_path / "no-weights",
                        env={MARK: mark, "CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "300"})


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def test_server_worker_killed_mid_request_then_stopped_server_leaves_no_worker(tmp_path) -> None:
    mark = uuid.uuid4().hex
    receipt = (SAMPLES / "receipt_en.png").read_bytes()
    with _server(tmp_path, mark) as server:
        r = _ocr(server, receipt)
        assert r.status_code == 200, r.text
        assert r.json()["text"].startswith("CORNER MARKET")
        workers = _workers(mark)
        assert len(workers) == 2  # config.yaml: concurrency 2
        assert all(p.ppid() == server.proc.pid for p in workers)
        # One request on one worker; kill whichever starts working on it.
        before = {p.pid: _cpu(p) for p in workers}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_ocr, server, _big_page())
            deadline = time.monotonic() + 60
            busy = None
            while busy is None:
                assert time.monotonic() < deadline and not pending.done(), "no worker took the request"
                busy = next((p for p in workers if _cpu(p) - before[p.pid] > 0.05), None)
                time.sleep(0.01)
            busy.send_signal(signal.SIGKILL)
            r = pending.result(timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers.get("Retry-After")
        assert "worker process stopped" in r.text
        # The next requests succeed (the replacement is waited for), on two live workers again.
        for _ in range(2):
            r = _ocr(server, receipt)
            assert r.status_code == 200, r.text
        after = _workers(mark)
        assert len(after) == 2 and busy.pid not in {p.pid for p in after}
    # RemoteServer's exit sends SIGTERM: the lifespan unloads the model and stops its workers.
    _wait_none(mark, 5)


def test_killed_server_leaves_no_worker(tmp_path) -> None:
    mark = uuid.uuid4().hex
    with _server(tmp_path, mark) as server:
        assert _ocr(server, (SAMPLES / "line_zh.png").read_bytes()).status_code == 200
        assert len(_workers(mark)) == 2
        # An OCR-only server never loads torch (its model load and its runner's idle release of
        # OpenMP pools used to import it: ~3 s on the first request, ~400 MB resident).
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "libtorch" not in maps
        server.kill()  # SIGKILL: no shutdown code runs; the workers see their socket close
        _wait_none(mark, 10)


def test_cli_in_process_leaves_no_worker(tmp_path) -> None:
    mark = uuid.uuid4().hex
    out = tmp_path / "out.jsonl"
    env = {**os.environ, MARK: mark, "CHATVLM_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-m", "chatvlm", "ocr", str(SAMPLES / "receipt_en.png"),
                           str(SAMPLES / "line_zh.png"), "--out", str(out), "--model", "rapidocr",
                           "--models-dir", str(tmp_path / "no-weights"), "--concurrency", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 2
    _wait_none(mark, 5)


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_cli_interrupted_leaves_no_worker(tmp_path, sig) -> None:
    """Ctrl-C in the middle of a run: the CLI ends cleanly and its workers with it."""
    mark = uuid.uuid4().hex
    folder = tmp_path / "pages"
    folder.mkdir()
    for i in range(6):
        (folder / f"p{i}.png").write_bytes(_big_page(i))
    env = {**os.environ, MARK: mark, "CHATVLM_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "chatvlm", "ocr", str(folder), "--out", str(tmp_path / "o.jsonl"),
                             "--model", "rapidocr", "--models-dir", str(tmp_path / "no-weights"), "--concurrency", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(_workers(mark)) < 2:  # loaded and reading
            assert time.monotonic() < deadline and proc.poll() is None, "no workers started"
            time.sleep(0.1)
        workers = _workers(mark)
        before = {p.pid: _cpu(p) for p in workers}
        while not any(_cpu(p) - before[p.pid] > 0.05 for p in workers):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _wait_none(mark, 10)


def test_deadline_gives_504_at_once_and_the_workers_stay(tmp_path) -> None:
    """A page that cannot be read within limits.request_timeout_s: 504 at the deadline, not when
    the worker is done; the worker finishes the page in the background and stays in the pool."""
    mark = uuid.uuid4().hex
    env = {MARK: mark, "CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "0.5", "CHATVLM_MANAGER__PRELOAD": '["rapidocr"]'}
    with RemoteServer(models_dir=tmp_path / "no-weights", env=env) as server:
        deadline = time.monotonic() + 120
        while len(_workers(mark)) < 2:  # the preload is under way (the server answers /health meanwhile)
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.1)
        pids = {p.pid for p in _workers(mark)}
        started = time.monotonic()
        r = _ocr(server, _big_page())
        took = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert took < 5, took
        assert {p.pid for p in _workers(mark)} == pids


def test_doc_cpu_answers_the_same_with_thread_and_process_workers(tmp_path) -> None:
    """The document pipeline reads through manager.run(rapidocr, "ocr", ...): its Markdown and
    JSON (blocks, categories, boxes) are the same whichever way RapidOCR runs."""
    import yaml
    from fastapi.testclient import TestClient

    from core.config import load_settings
    from server.app import create_app
    from scripts.make_doc_pages import draw_png, make_page

    page = _png(draw_png(make_page(0, "en", two_column=True, seed=101)))
    answers = {}
    for mode in ("thread", "process"):
        data = yaml.safe_load((ROOT / "config.yaml").read_text())
        data["models"]["rapidocr"]["options"]["workers"] = mode
        config = tmp_path / f"{mode}.yaml"
        config.write_text(yaml.safe_dump(data))
        settings = load_settings(config, models_dir=tmp_path / "no-weights", data_dir=tmp_path / mode)
        with TestClient(create_app(settings)) as client:
            for fmt in ("json", "markdown"):
                r = client.post("/ocr", files={"file": ("page.png", page)},
                                data={"model": "doc_cpu", "format": fmt})
                assert r.status_code == 200, r.text
                body = r.json()
                body.pop("processing_time", None)
                answers[(mode, fmt)] = body
    assert answers[("thread", "json")]["blocks"]
    assert answers[("thread", "json")] == answers[("process", "json")]
    assert answers[("thread", "markdown")] == answers[("process", "markdown")]
