"""Asynchronous OCR jobs for long documents, in domain types (no HTTP here).

A job reads its document one page at a time (one page rendered, read and stored before the
next is rendered: memory stays flat on a 500-page PDF), through the same OCR service as
``/ocr``. Jobs run as background tasks owned by the app's lifespan (``start``/``stop``), a
bounded number at once (``jobs.workers``), behind bounds per client (429) and in total (503).
Each finished page is stored at once, so after a restart a job that was running resumes
from the first page it had not finished; one whose upload is gone fails with that reason.

Jobs live in the database (jobs/store.py), so with replicas sharing ``database.url`` any replica
answers for any job, and the bounds count every replica's jobs. A job runs in the replica that
accepted it, under a lease renewed every ``jobs.lease_s / 3``; the jobs of a replica that stopped
(released at once) or died (lease lapsed) are claimed and resumed by another one.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

from core import request_context
from core.config import JobsSettings, LimitsSettings
from core.errors import BadRequest, ChatVLMError, NotFound, Overloaded, PayloadTooLarge, RateLimited
from core.imaging import sniff_format
from core.types import CancelToken, Capability, OcrBlock
from jobs.store import DbJobStore, Job
from store.db import Database
from models.adapter import OcrOptions
from ocr import pdf
from ocr.document.adapter import vector_enabled
from ocr.formats import PAGE_SEPARATOR, page_dict
from ocr.pages import ImageDecoder, PageOutcome
from ocr.service import OcrOutcome, OcrRequest, OcrService

log = logging.getLogger("chatvlm.jobs")
EXPIRY_CHECK_S = 60.0
JOB_ROUTE = "/jobs/ocr (job)"


class JobService:
    def __init__(self, store: DbJobStore, ocr: OcrService, settings: JobsSettings, limits: LimitsSettings) -> None:
        self.store = store
        self.ocr = ocr
        self.settings = settings
        # Jobs take documents of their own size and page count, not the /ocr limits.
        self.decoder = ImageDecoder(limits.model_copy(update={"max_file_mb": settings.max_file_mb,
                                                              "max_pdf_pages": settings.max_pages}))
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tokens: dict[str, CancelToken] = {}
        self._here: set[str] = set()  # jobs queued or running in this process (never adopted twice)
        self._tasks: list[asyncio.Task] = []
        self._callbacks: set[asyncio.Task] = set()
        # Called with each finished job's request context and status (the request records' writer).
        self.on_record: Callable[[request_context.RequestContext, int], None] | None = None

    # ---- lifespan ----------------------------------------------------------------
    async def start(self, db: Database) -> None:
        """Resume the unfinished jobs no live replica holds, then start the workers."""
        self.store.bind(db)
        await self._adopt()
        self._tasks = [asyncio.create_task(self._worker(), name=f"job-worker-{i}") for i in range(self.settings.workers)]
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="job-expiry"))
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="job-leases"))

    async def stop(self) -> None:
        for token in self._tokens.values():
            token.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._callbacks, return_exceptions=True)
        if self._tasks:
            try:  # unfinished jobs go back to the pool: the next replica to look resumes them
                await asyncio.to_thread(self.store.release)
            except Exception:  # noqa: BLE001 - the database may be gone at shutdown; the leases then lapse
                log.warning("could not release this replica's jobs; their leases will lapse", exc_info=True)
        self._tasks = []

    async def _adopt(self) -> None:
        """Claim the jobs whose holder stopped or died, and queue them here."""
        for job_id in await asyncio.to_thread(self.store.claim):
            if job_id in self._here:
                continue  # our own lease lapsed (a database hiccup) and we took it back: it runs already
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is None or job.done:
                continue
            if await asyncio.to_thread(self.store.upload, job.id) is None:
                await self._finish(job, "failed", "the server restarted and the job's upload was lost")
                continue
            job.status = "queued"
            await asyncio.to_thread(self.store.save, job)
            self._enqueue(job.id)
            log.info("resuming job %s at page %d of %d", job.id, job.pages_done, job.pages_total)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                await asyncio.to_thread(self.store.renew)
                await self._adopt()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup: retried at the next turn
                log.warning("renewing job leases failed", exc_info=True)

    # ---- submit ------------------------------------------------------------------
    async def submit(self, data: bytes, *, filename: str, model: str | None, language: str | None, format: str,
                     region: tuple[int, int, int, int] | None, pages: list[int] | None, force_ocr: bool,
                     callback_url: str | None, owner: str | None, client: str) -> tuple[Job, int]:
        """Check and store a job; returns it and its place in the queue (0: it starts now)."""
        request = OcrRequest(language, format, region, pages, force_ocr)  # validates format and region
        chosen = self.ocr.selector.resolve(Capability.OCR, model, language, format)
        request_context.note_model(chosen.model_id)
        if callback_url:
            self._check_callback(callback_url)
        if len(data) > self.settings.max_file_bytes:
            raise PayloadTooLarge(f"file is larger than {self.settings.max_file_mb:g} MB", param="file",
                                  code="FILE_TOO_LARGE")
        indices = await self._page_list(data, pages)
        active = await asyncio.to_thread(self.store.unfinished)  # every replica's
        if sum(j.client == client for j in active) >= self.settings.max_per_client:
            raise RateLimited(f"at most {self.settings.max_per_client} unfinished jobs per client; wait for one to end",
                              headers={"Retry-After": "10"}, code="TOO_MANY_JOBS")
        if len(active) >= self.settings.max_total:
            raise Overloaded("the job queue is full; retry later", headers={"Retry-After": "30"})
        job = Job(id=secrets.token_hex(12), owner=owner, client=client, filename=filename,
                  pages_total=len(indices), model=chosen.model_id, requested_model=chosen.requested_model,
                  fallback_reason=chosen.fallback_reason, callback_url=callback_url,
                  params={"language": request.language, "format": request.format,
                          "region": list(region) if region else None, "pages": indices, "force_ocr": force_ocr})
        await asyncio.to_thread(self.store.create, job, data)
        position = sum(1 for j in active if j.status == "queued")
        self._enqueue(job.id)
        return job, position

    def _check_callback(self, url: str) -> None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        allowed = {h.lower() for h in self.settings.callback_allowed_hosts}
        if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
            raise BadRequest("callback_url must be an http(s) URL", param="callback_url", code="INVALID_CALLBACK_URL")
        if host not in allowed:
            raise BadRequest(f"callback host '{host}' is not in jobs.callback_allowed_hosts", param="callback_url",
                             code="CALLBACK_NOT_ALLOWED")

    async def _page_list(self, data: bytes, pages: list[int] | None) -> list[int]:
        """The 0-based pages the job will read, checked against the document and jobs.max_pages."""
        self.decoder._check_size(data)
        if sniff_format(data) == "PDF":
            n = await asyncio.to_thread(pdf.page_count, data)
        else:
            n = len((await self.decoder.decode(data, target_max_pixels=64 * 64, all_frames=True)).pages)
        indices = pdf.check_pages(pages, n, "document") if pages is not None else list(range(n))
        if len(indices) > self.settings.max_pages:
            raise PayloadTooLarge(f"{len(indices)} pages were asked for; a job reads at most {self.settings.max_pages}",
                                  param="file", code="TOO_MANY_PAGES")
        return indices

    # ---- queries -----------------------------------------------------------------
    async def get(self, job_id: str, owner: str | None) -> Job:
        """The job, or 404 when it does not exist, has expired, or belongs to another API key."""
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None or (job.owner is not None and job.owner != owner):
            raise NotFound(f"job '{job_id[:40]}' not found (unknown, expired, or not yours)", param="job_id",
                           code="JOB_NOT_FOUND")
        return job

    def pages(self, job: Job, skip: Collection[int] = ()) -> list[dict[str, Any]]:
        """The job's finished pages (blocking), but those in ``skip``."""
        return self.store.pages(job.id, skip)

    def outcome(self, job: Job) -> OcrOutcome:
        """The finished job as /ocr's outcome."""
        pages = [_page_outcome(p) for p in self.store.pages(job.id)]
        fmt = job.params.get("format", "text")
        return OcrOutcome(text=PAGE_SEPARATOR.join(p.text for p in pages if p.text), model=job.model or "",
                          blocks=[b for p in pages for b in p.blocks],
                          image_size=pages[0].image_size if pages else (0, 0), pages=len(pages),
                          processing_time=(job.finished or time.time()) - job.created,
                          language=job.params.get("language"), format=fmt, page_results=pages,
                          requested_model=job.requested_model, fallback_reason=job.fallback_reason)

    async def cancel(self, job: Job) -> Job:
        """Cancel through any replica: the one running the job sees it before its next page.

        The end is stored before this replica's running page is stopped: the page's reader then
        fails with ``Cancelled``, and that failure must find the job finished already."""
        if not job.done:
            job = await self._finish(job, "cancelled", None)
            token = self._tokens.get(job.id)
            if token is not None:
                token.cancel()
        return job

    # ---- work --------------------------------------------------------------------
    def _enqueue(self, job_id: str) -> None:
        self._here.add(job_id)
        self._queue.put_nowait(job_id)

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._work(job_id)
            finally:
                self._here.discard(job_id)

    async def _work(self, job_id: str) -> None:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None or job.done or not await asyncio.to_thread(self.store.holds, job_id):
            return  # gone, finished, or taken over by another replica while it waited here
        token = self._tokens[job_id] = CancelToken()
        # A job's run is a request of its own in the request records (route JOB /jobs/ocr).
        ctx, ctx_token = request_context.open_context(JOB_ROUTE, "JOB")
        ctx.model = job.model
        status: int | None = 200
        try:
            await self._run(job, token)
        except asyncio.CancelledError:
            status = None
            raise  # shutdown: the job stays "running" in the database; stop() hands it over
        except ChatVLMError as exc:
            status = exc.status_code
            if not token.cancelled:  # a stopped page is the canceller's (or the shutdown's) to end
                await self._finish(await self._current(job), "failed", exc.message)
        except Exception:  # noqa: BLE001 - a bug fails this job only, logged with its id
            status = 500
            log.exception("job %s failed", job_id)
            await self._finish(await self._current(job), "failed", "internal error while reading the document")
        finally:
            self._tokens.pop(job_id, None)
            request_context.close_context(ctx_token)
            if status is not None and self.on_record is not None:
                self.on_record(ctx, status)

    async def _run(self, job: Job, token: CancelToken) -> None:
        data = await asyncio.to_thread(self.store.upload, job.id)
        if data is None:
            raise BadRequest("the job's upload was lost")
        job.status = "running"
        await asyncio.to_thread(self.store.save, job)
        entry = self.ocr.selector.entry(job.model or "")
        generative = Capability.GENERATE in entry.capabilities
        p = job.params
        options = OcrOptions(language=p.get("language"), format=p.get("format", "text"))
        region = tuple(p["region"]) if p.get("region") else None
        done = {page["page"] for page in await asyncio.to_thread(self.store.pages, job.id)}
        for index in p["pages"]:
            if index in done:
                continue
            if token.cancelled or (await self._current(job)).status == "cancelled":
                return
            if not await asyncio.to_thread(self.store.holds, job.id):
                log.warning("job %s was taken over by another replica (this one's lease lapsed)", job.id)
                return
            doc = await self.decoder.decode_pages(data, target_max_pixels=entry.spec.max_pixels, only_page=index,
                                                  text_layer=not generative and not p.get("force_ocr"),
                                                  render_text_pages=Capability.LAYOUT in entry.capabilities,
                                                  structure=Capability.LAYOUT in entry.capabilities
                                                  and vector_enabled(entry.spec.options) and region is None)
            page = await self.ocr.read_page(job.model or "", doc.pages[0], index, options, region, token)
            del doc
            await asyncio.to_thread(self.store.save_page, job.id, index, page_dict(page))
            job.pages_done += 1
            if not await asyncio.to_thread(self.store.save, job):
                return  # finished meanwhile (cancelled through this or another replica)
        await self._finish(job, "succeeded", None)

    async def _current(self, job: Job) -> Job:
        return await asyncio.to_thread(self.store.get, job.id) or job

    async def _finish(self, job: Job, status: str, error: str | None) -> Job:
        ended = replace(job, status=status, error=error, finished=time.time())
        if not await asyncio.to_thread(self.store.save, ended):
            return await self._current(job)  # it had finished already: the first end stands
        await asyncio.to_thread(self.store.drop_upload, job.id)
        job = ended
        if job.callback_url:
            task = asyncio.get_running_loop().create_task(self._callback(job))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
        return job

    async def _callback(self, job: Job) -> None:
        import httpx

        body = {"job_id": job.id, "status": job.status, "pages_done": job.pages_done,
                "pages_total": job.pages_total, "error": job.error, "result": f"/jobs/{job.id}/result"}
        try:
            async with httpx.AsyncClient(timeout=self.settings.callback_timeout_s, follow_redirects=False) as client:
                await client.post(job.callback_url or "", json=body)
        except httpx.HTTPError as exc:
            log.warning("callback of job %s failed: %s", job.id, type(exc).__name__)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.to_thread(self.expire)
            await asyncio.sleep(min(EXPIRY_CHECK_S, self.settings.retention_s / 4))

    def expire(self, now: float | None = None) -> int:
        """Delete finished jobs older than jobs.retention_s; returns how many."""
        now = time.time() if now is None else now
        gone = 0
        for job_id in self.store.finished_before(now - self.settings.retention_s):
            self.store.delete(job_id)
            gone += 1
        return gone


def _page_outcome(d: dict[str, Any]) -> PageOutcome:
    blocks = [OcrBlock(b["text"], box=tuple(b["box"]) if b.get("box") else None, confidence=b.get("confidence"),
                       category=b.get("category"), page=b.get("page", d["page"]),
                       cells=tuple(b["cells"]) if b.get("cells") else None) for b in d["blocks"]]
    return PageOutcome(d["page"], d["text"], blocks, tuple(d["image_size"]))
