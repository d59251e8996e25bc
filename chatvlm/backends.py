"""The two ways the CLI reaches the work: the in-process services (``LocalBackend``, the same
``build_services`` the server uses) or a running server's HTTP API (``RemoteBackend``, through
``scripts.chatvlm_client``). Both answer OCR in the API's JSON shape, so the output files do
not depend on the way taken."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Failure(Exception):
    """One request failed: the server's stable code and its message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class OcrOptions:
    model: str | None = None
    language: str | None = None
    format: str = "text"
    pages: str | None = None  # as given, e.g. "1-3,5": part of the resume key

    def key(self) -> dict[str, Any]:
        return {"model": self.model, "language": self.language, "format": self.format, "pages": self.pages}


POLL_S = 0.3
RETRY_FULL_S = 2.0  # a job queue that is full (TOO_MANY_JOBS, 503) is asked again after this


class JobGone(Exception):
    """The job a previous run recorded no longer exists or was cancelled: submit it again."""


async def follow_job(get, result, job_id: str, on_pages, wait: bool) -> dict[str, Any] | None:
    """Poll a job (``get`` gives its status as a dict) until it ends, reporting pages as they finish;
    its answer (``result``), None when not waiting and it is still running."""
    while True:
        status = await get(job_id)
        if on_pages is not None:
            on_pages(status["pages_done"], status["pages_total"])
        if status["status"] == "succeeded":
            return await result(job_id)
        if status["status"] == "cancelled":
            raise JobGone(job_id)
        if status["status"] == "failed":
            raise Failure("JOB_FAILED", f"job {job_id} failed: {status.get('error') or 'no reason given'}")
        if not wait:
            return None
        await asyncio.sleep(POLL_S)


class LocalBackend:
    """The server's own services, built in this process; models load on first use."""

    def __init__(self, config: Path | None = None, models_dir: Path | None = None,
                 request_timeout_s: float | None = None) -> None:
        from chatvlm.settings import config_path
        from core.config import load_settings

        limits = {"request_timeout_s": request_timeout_s} if request_timeout_s else None
        self.settings = load_settings(config_path(config), models_dir=models_dir, limits=limits)
        self.services: Any = None

    async def __aenter__(self) -> "LocalBackend":
        from api import _prepare_environment
        from server.deps import build_services

        _prepare_environment(self.settings)
        self.services = build_services(self.settings)
        await self.services.manager.start([])
        self.jobs = None
        return self

    async def _jobs(self) -> Any:
        """The job service on the CLI's own folder (never a server's: both would run its jobs), started
        on first use; it carries on with the jobs an interrupted run left, from their next page."""
        if self.jobs is None:
            from jobs.service import JobService
            from jobs.store import DbJobStore
            from store.db import Database, sqlite_url

            cfg = self.settings.jobs.model_copy(update={"max_per_client": 100_000, "max_total": 100_000})
            self.jobs_db = Database(sqlite_url(self.settings.data_dir / "cli-jobs"))
            await asyncio.to_thread(self.jobs_db.migrate)
            self.jobs = JobService(DbJobStore(cfg.lease_s), self.services.ocr, cfg, self.settings.limits)
            await self.jobs.start(self.jobs_db)
        return self.jobs

    async def __aexit__(self, *exc: Any) -> None:
        if self.jobs is not None:
            await self.jobs.stop()  # an unfinished job stays in the database: the next run resumes it
            self.jobs_db.dispose()
        await self.services.manager.shutdown()
        await self.services.image_fetcher.close()

    async def warm(self, model: str | None) -> None:
        """Load the named model before the run starts (its rate and ETA are then the reading's own, as
        against a running server); a model that cannot load fails each file with its reason."""
        from core.errors import ChatVLMError

        if model:
            try:
                await self.services.manager.ensure_loaded(model)
            except ChatVLMError:
                pass

    async def ocr_job(self, data: bytes, filename: str, opts: OcrOptions, *, job_id: str | None, on_job,
                      on_pages, wait: bool = True) -> dict[str, Any] | None:
        """A long document read as a job (page by page, resumable); ``job_id``: carry on with that one."""
        from core.errors import ChatVLMError, NotFound
        from jobs.service import JobService
        from ocr.page_ranges import parse_pages

        jobs: JobService = await self._jobs()

        async def get(jid: str) -> dict[str, Any]:
            job = await jobs.get(jid, None)
            return {"status": job.status, "pages_done": job.pages_done, "pages_total": job.pages_total,
                    "error": job.error}

        async def result(jid: str) -> dict[str, Any]:
            return _outcome_json(await asyncio.to_thread(jobs.outcome, await jobs.get(jid, None)))

        try:
            if job_id is not None:
                try:
                    return await follow_job(get, result, job_id, on_pages, wait)
                except (NotFound, JobGone):
                    pass  # expired or cancelled: read it again
            job, _ = await jobs.submit(data, filename=filename, model=opts.model, language=opts.language,
                                       format=opts.format, region=None, pages=parse_pages(opts.pages),
                                       force_ocr=False, callback_url=None, owner=None, client="cli")
            on_job(job.id)
            return await follow_job(get, result, job.id, on_pages, wait)
        except ChatVLMError as exc:
            raise Failure(exc.code, exc.message) from None
        except JobGone as exc:
            raise Failure("JOB_CANCELLED", f"job {exc} was cancelled") from None

    async def ocr(self, data: bytes, filename: str, opts: OcrOptions) -> dict[str, Any]:
        from core.errors import ChatVLMError

        try:
            from ocr.page_ranges import parse_pages

            outcome = await self.services.ocr.ocr(data, model=opts.model, language=opts.language,
                                                  format=opts.format, pages=parse_pages(opts.pages))
        except ChatVLMError as exc:
            raise Failure(exc.code, exc.message) from None
        return _outcome_json(outcome)

    async def chat_stream(self, prompt: str, image: bytes | None, model: str | None,
                          temperature: float | None, max_tokens: int | None) -> AsyncIterator[str]:
        from core.errors import ChatVLMError
        from llm.types import ChatMessage, GenerateInput, ImagePart

        llm = self.services.llm
        content: Any = (ImagePart(image), prompt) if image is not None else prompt
        try:
            model_id = llm.select(model, images=image is not None)
            params = llm.params_for(model_id, temperature=temperature, max_new_tokens=max_tokens)
            _, deltas = await llm.stream(GenerateInput(messages=[ChatMessage("user", content)], model=model_id,
                                                       params=params))
            async for delta in deltas:
                if delta.text:
                    yield delta.text
        except ChatVLMError as exc:
            raise Failure(exc.code, exc.message) from None

    async def models(self) -> list[dict[str, Any]]:
        from server.model_listing import model_rows

        return [{"id": r.id, "name": r.name, "kind": r.kind, "tasks": r.tasks, "installed": r.installed,
                 "loaded": r.loaded, "status": r.status, "reason": r.reason} for r in model_rows(self.services)]

    async def load(self, model: str) -> dict[str, Any]:
        from core.errors import ChatVLMError
        from core.system import human_bytes

        try:
            state = await self.services.manager.ensure_loaded(model)
        except ChatVLMError as exc:
            raise Failure(exc.code, exc.message) from None
        return {"status": "success", "message": f"Model {model} loaded", "load_time": round(state.load_seconds, 3),
                "memory_usage": human_bytes(state.memory_bytes)}

    async def unload(self, model: str) -> dict[str, Any]:
        from core.errors import ChatVLMError

        try:
            was = await self.services.manager.unload(model)
        except ChatVLMError as exc:
            raise Failure(exc.code, exc.message) from None
        return {"status": "success", "message": f"Model {model} {'unloaded' if was else 'was not loaded'}"}


def _outcome_json(o: Any) -> dict[str, Any]:
    """An OcrOutcome as the server's /ocr answers it: the same builder, so the same JSON."""
    from server.routers.vision import ocr_response

    return ocr_response(o).model_dump(mode="json")


class RemoteBackend:
    """A running server, through ``ChatVLMClient`` (requests) on worker threads, one client each."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, workers: int = 4) -> None:
        self.url = url
        self.api_key = api_key
        self.timeout = timeout
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="chatvlm-http")

    async def __aenter__(self) -> "RemoteBackend":
        return self

    async def warm(self, model: str | None) -> None:
        """Nothing to do: a server loads its models itself."""

    async def __aexit__(self, *exc: Any) -> None:
        # An interrupted run does not wait for the requests still out; their answers are dropped.
        self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def _client(self):
        from scripts.chatvlm_client import ChatVLMClient

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = ChatVLMClient(self.url, timeout=self.timeout, api_key=self.api_key)
        return client

    async def _call(self, fn, *args: Any) -> Any:
        from scripts.chatvlm_client import APIError
        import requests

        def run() -> Any:
            try:
                return fn(self._client(), *args)
            except APIError as exc:
                raise Failure(exc.code or f"HTTP_{exc.status}", exc.message) from None
            except requests.RequestException as exc:
                raise Failure("CONNECTION_FAILED", f"cannot reach {self.url}: {type(exc).__name__}") from None

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def ocr(self, data: bytes, filename: str, opts: OcrOptions) -> dict[str, Any]:
        return await self._call(lambda c: c.ocr_document(data, filename, opts.model, opts.language, opts.format,
                                                         opts.pages))

    async def ocr_job(self, data: bytes, filename: str, opts: OcrOptions, *, job_id: str | None, on_job,
                      on_pages, wait: bool = True) -> dict[str, Any] | None:
        """A long document through the job API (POST /jobs/ocr, GET /jobs/{id}, /jobs/{id}/result); an
        interrupted run leaves the job running on the server, and ``job_id`` carries on with it."""
        get = lambda jid: self._call(lambda c: c.job(jid))  # noqa: E731
        result = lambda jid: self._call(lambda c: c.job_result(jid))  # noqa: E731
        if job_id is not None:
            try:
                return await follow_job(get, result, job_id, on_pages, wait)
            except JobGone:
                pass
            except Failure as exc:
                if exc.code != "JOB_NOT_FOUND":  # expired: read it again
                    raise
        while True:
            try:
                accepted = await self._call(lambda c: c.submit_ocr_job(data, filename, opts.model, opts.language,
                                                                       opts.format, opts.pages))
                break
            except Failure as exc:
                if exc.code not in ("TOO_MANY_JOBS", "OVERLOADED", "HTTP_503"):
                    raise
                await asyncio.sleep(RETRY_FULL_S)  # the server's job queue is full for now
        on_job(accepted["job_id"])
        try:
            return await follow_job(get, result, accepted["job_id"], on_pages, wait)
        except JobGone:
            raise Failure("JOB_CANCELLED", f"job {accepted['job_id']} was cancelled on the server") from None

    async def chat_stream(self, prompt: str, image: bytes | None, model: str | None,
                          temperature: float | None, max_tokens: int | None) -> AsyncIterator[str]:
        from scripts.chatvlm_client import APIError

        # requests streams synchronously: pieces cross to the event loop through a queue.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def send(item: tuple) -> None:
            if not stop.is_set():
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the loop has closed: nobody is reading any more
                    stop.set()

        def pump() -> None:
            gen = self._client().chat_stream(prompt, image, model, temperature, max_tokens)
            try:
                for piece in gen:
                    if stop.is_set():
                        break
                    send(("piece", piece))
                send(("end", None))
            except APIError as exc:
                send(("error", Failure(exc.code or f"HTTP_{exc.status}", exc.message)))
            except Exception as exc:  # connection lost: say so rather than hang
                send(("error", Failure("CONNECTION_FAILED", f"the stream from {self.url} broke: {type(exc).__name__}")))
            finally:
                gen.close()  # closes the response: the server stops generating

        loop.run_in_executor(self._pool, pump)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            stop.set()  # a consumer that left early: the pump closes the response at its next piece

    async def models(self) -> list[dict[str, Any]]:
        body = await self._call(lambda c: c.models())
        return [{k: m.get(k) for k in ("id", "name", "kind", "tasks", "installed", "loaded", "status", "reason")}
                for m in body.get("available", [])]

    async def load(self, model: str) -> dict[str, Any]:
        return await self._call(lambda c: c.load(model))

    async def unload(self, model: str) -> dict[str, Any]:
        return await self._call(lambda c: c.unload(model))
