"""The job service in process, on the real OCR service (Tesseract) and a real SQLite database: a
cancel that lands while a page is being read ends the job "cancelled", never "failed"."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest

from core.config import load_settings
from jobs.store import Job
from scripts.make_doc_pages import draw_png, make_page, scanned_pdf
from server.deps import build_services
from store.db import Database, sqlite_url

pytestmark = pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract is not installed")


async def _until(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.05)


def test_a_cancel_during_a_page_ends_the_job_cancelled(tmp_path, monkeypatch):
    """The canceller stops the running page, whose reader then fails with ``Cancelled``. Before the
    fix the worker stored that failure first whenever the canceller's own write came a moment later
    (CI saw it once). Here the canceller's write waits until the page being read has ended (stopped,
    or read to the end), then a moment more, so that it always comes later; the job has pages
    enough that the worker cannot finish them all meanwhile."""
    settings = load_settings(models_dir=tmp_path / "weights", data_dir=tmp_path / "data")
    services = build_services(settings)
    jobs = services.jobs
    db = Database(sqlite_url(tmp_path / "jobs"))
    db.migrate()
    save, read_page = jobs.store.save, jobs.ocr.read_page
    page_ended = threading.Event()

    async def watched_read_page(*args, **kwargs):
        try:
            return await read_page(*args, **kwargs)
        finally:
            page_ended.set()

    def held_back_cancel_save(job: Job) -> bool:  # runs on a worker thread (asyncio.to_thread)
        if job.status == "cancelled":
            page_ended.wait(60)
            time.sleep(0.3)
        return save(job)

    monkeypatch.setattr(jobs.ocr, "read_page", watched_read_page)
    monkeypatch.setattr(jobs.store, "save", held_back_cancel_save)
    pages = [draw_png(make_page(i, "en", two_column=False, seed=5)) for i in range(6)]

    async def scenario() -> tuple[Job, Job]:
        await services.manager.start([])
        await jobs.start(db)
        try:
            job, _ = await jobs.submit(scanned_pdf(pages), filename="doc.pdf", model="tesseract", language=None,
                                       format="text", region=None, pages=None, force_ocr=False, callback_url=None,
                                       owner=None, client="test")

            async def reading() -> bool:  # a page is being read: the worker holds the job's token
                return job.id in jobs._tokens and (await jobs.get(job.id, None)).status == "running"

            await _until(reading)
            page_ended.clear()
            answered = await jobs.cancel(await jobs.get(job.id, None))

            async def idle() -> bool:
                return job.id not in jobs._here

            await _until(idle)
            return answered, await jobs.get(job.id, None)
        finally:
            await jobs.stop()
            await services.manager.shutdown()

    try:
        answered, stored = asyncio.run(scenario())
    finally:
        db.dispose()
    assert answered.status == "cancelled" and answered.error is None
    assert stored.status == "cancelled" and stored.error is None and stored.pages_done < 6
