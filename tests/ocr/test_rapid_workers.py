"""RapidOCR in worker processes (``workers: process``), for real: same blocks as thread mode, a
worker killed with SIGKILL, cancellation and deadlines, unload, and memory per worker."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from PIL import Image

from core.errors import Cancelled, ModelUnavailable
from core.types import CancelToken
from models.adapter import ModelSpec, OcrOptions
from ocr.rapid import RapidOcrAdapter
from tests.ocr import SAMPLES, expected, load_rgb


def _adapter(tmp: Path, mode: str = "process", concurrency: int = 1, **options) -> RapidOcrAdapter:
    spec = ModelSpec(id="rapidocr", name="RapidOCR", kind="rapidocr", data_dir=tmp, concurrency=concurrency,
                     options={"intra_op_threads": 1, "workers": mode, **options})
    a = RapidOcrAdapter(spec)
    a.load()
    return a


def _big_page() -> Image.Image:
    """Four receipts side by side and stacked: a call long enough to be caught in the middle."""
    receipt = load_rgb("receipt_en.png")
    w, h = receipt.size
    page = Image.new("RGB", (2 * w, 2 * h), "white")
    for i in range(4):
        page.paste(receipt, ((i % 2) * w, (i // 2) * h))
    return page


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _wait_busy(pid: int, before: float, timeout: float = 60) -> None:
    """Until the worker has spent CPU on the call sent to it (an idle worker spends none)."""
    deadline = time.monotonic() + timeout
    while _cpu(pid) - before < 0.05:
        assert time.monotonic() < deadline, "the worker never started the call"
        time.sleep(0.01)


def _call_in_thread(adapter, image, cancel) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = adapter.ocr(image, OcrOptions(), cancel)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out["error"] = exc
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rapid_workers")
    thread, process = _adapter(tmp, "thread", 2), _adapter(tmp, "process", 2)
    yield thread, process
    thread.unload()
    process.unload()


def test_same_blocks_in_both_modes(both) -> None:
    thread, process = both
    names = sorted(n for n in expected() if (SAMPLES / n).suffix in (".png", ".jpg"))
    images = [load_rgb(n) for n in names] + [_big_page()]
    alone = []
    for image in images:
        a = thread.ocr(image, OcrOptions(), CancelToken())
        b = process.ocr(image, OcrOptions(), CancelToken())
        assert a.blocks and a.blocks == b.blocks
        assert a.text == b.text
        alone.append(a.blocks)
    # Two calls at once, each on its own worker, give the same answers as one at a time.
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda im: process.ocr(im, OcrOptions(), CancelToken()).blocks, images))
    assert together == alone


def test_one_process_per_concurrent_call_and_their_memory(both) -> None:
    _, process = both
    pool = process.worker_pool
    assert pool is not None
    pids = pool.pids()
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:
        proc = psutil.Process(pid)
        assert proc.ppid() == os.getpid()
        assert "ocr.workers" in " ".join(proc.cmdline())
    rss = pool.rss_bytes()
    assert all(r > 50 * 2**20 for r in rss.values()), rss  # onnxruntime, the models, numpy, OpenCV
    assert process.memory_bytes() >= sum(rss.values()) * 0.9


def test_worker_killed_in_the_middle_of_a_call(tmp_path) -> None:
    a = _adapter(tmp_path)
    try:
        pool = a.worker_pool
        for _ in range(5):
            [pid] = pool.pids()
            before = _cpu(pid)
            t, out = _call_in_thread(a, _big_page(), CancelToken())
            _wait_busy(pid, before)
            if not t.is_alive():  # the call ended before this (starved) thread could catch it
                continue
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            t.join(30)
            assert not t.is_alive()
            if "result" not in out:
                break
            # It ended in the instant before the kill: the worker died idle; the next call
            # waits for its replacement.
            assert a.ocr(load_rgb("receipt_en.png"), OcrOptions(), CancelToken()).text
        else:
            pytest.fail("no call was caught in the middle in five tries")
        err = out.get("error")
        assert isinstance(err, ModelUnavailable), out
        assert err.status_code == 503 and err.headers.get("Retry-After")
        assert "worker process stopped" in err.message
        assert out["at"] - killed_at < 5
        assert _gone(pid)
        # The next call waits for the replacement and succeeds.
        result = a.ocr(load_rgb("receipt_en.png"), OcrOptions(), CancelToken())
        assert result.text.startswith("CORNER MARKET")
        [new_pid] = pool.pids()
        assert new_pid != pid
    finally:
        a.unload()


def test_worker_killed_while_idle_is_replaced_before_any_call_fails(tmp_path) -> None:
    a = _adapter(tmp_path)
    try:
        [pid] = a.worker_pool.pids()
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(10) if not _gone(pid) else None
        result = a.ocr(load_rgb("line_zh.png"), OcrOptions(), CancelToken())
        assert result.blocks
        assert a.worker_pool.pids() != [pid]
    finally:
        a.unload()


def test_cancel_returns_at_once_and_the_worker_serves_the_next_call(tmp_path) -> None:
    a = _adapter(tmp_path, worker_cancel_grace_s=120)
    try:
        [pid] = a.worker_pool.pids()
        cancel = CancelToken()
        before = _cpu(pid)
        t, out = _call_in_thread(a, _big_page(), cancel)
        _wait_busy(pid, before)
        cancel.cancel()
        cancelled_at = time.monotonic()
        t.join(10)
        assert isinstance(out.get("error"), Cancelled), out
        assert out["at"] - cancelled_at < 2.0  # the worker is still on the page
        # Queued work is dropped: a call whose client left while it waited for the busy worker.
        gone = CancelToken()
        t2, out2 = _call_in_thread(a, load_rgb("line_zh.png"), gone)
        time.sleep(0.1)
        gone.cancel()
        t2.join(5)
        assert isinstance(out2.get("error"), Cancelled), out2
        # The worker finishes the abandoned image, drops its answer and serves the next call.
        result = a.ocr(load_rgb("receipt_en.png"), OcrOptions(), CancelToken())
        assert result.text.startswith("CORNER MARKET")
        assert a.worker_pool.pids() == [pid]
    finally:
        a.unload()


def test_deadline_while_running_and_a_worker_stuck_past_the_grace_is_replaced(tmp_path) -> None:
    a = _adapter(tmp_path, worker_cancel_grace_s=0.2)
    try:
        [pid] = a.worker_pool.pids()
        started = time.monotonic()
        with pytest.raises(Cancelled):  # the service turns a passed deadline into a 504
            a.ocr(_big_page(), OcrOptions(), CancelToken(deadline=started + 0.3))
        assert time.monotonic() - started < 2.0
        deadline = time.monotonic() + 10
        while not _gone(pid):  # still busy after the grace: killed
            assert time.monotonic() < deadline, "the stuck worker was not killed"
            time.sleep(0.05)
        result = a.ocr(load_rgb("receipt_en.png"), OcrOptions(), CancelToken())
        assert result.text.startswith("CORNER MARKET")
        [new_pid] = a.worker_pool.pids()
        assert new_pid != pid
    finally:
        a.unload()


def test_unload_stops_the_processes(tmp_path) -> None:
    a = _adapter(tmp_path, concurrency=2)
    pids = a.worker_pool.pids()
    assert len(pids) == 2
    # A terminal's Ctrl-C or a service manager's SIGTERM to every process: the parent decides.
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert not any(_gone(pid) for pid in pids)
    assert a.ocr(load_rgb("line_zh.png"), OcrOptions(), CancelToken()).blocks
    a.unload()
    assert a.worker_pool is None and a.memory_bytes() == 0
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(ModelUnavailable):
        a.ocr(load_rgb("line_zh.png"), OcrOptions(), CancelToken())
