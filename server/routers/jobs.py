"""Asynchronous OCR jobs for long documents: submit, status, page events (SSE), result, cancel."""
from __future__ import annotations

import asyncio
import json
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from core.errors import Conflict
from jobs.store import Job
from server.auth import KEY_ID
from server.deps import ServicesDep
from server.ratelimit import client_identity
from server.routers.vision import (FormatParam, ForceOcrParam, PagesParam, RegionParam, _accepts, mark_fallback,
                                   ocr_response)
from server.schemas.vision import OcrResponse, error_responses
from server.uploads import LanguageParam, ModelParam, UploadRoute, filename_of, read_upload, upload_form_limits

router = APIRouter(tags=["jobs"])
_upload = APIRouter(tags=["jobs"], route_class=UploadRoute)
POLL_S = 0.25


class JobAccepted(BaseModel):
    job_id: str
    status: str
    position: int = Field(description="Jobs queued ahead of this one")


class JobStatus(BaseModel):
    job_id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    pages_done: int
    pages_total: int
    error: str | None = None
    model: str | None = None
    created: float
    finished: float | None = None


def _status(job: Job) -> JobStatus:
    return JobStatus(job_id=job.id, status=job.status, pages_done=job.pages_done, pages_total=job.pages_total,
                     error=job.error, model=job.model, created=job.created, finished=job.finished)


def _owner(request: Request) -> str | None:
    return request.scope.get(KEY_ID)


@_upload.post("/jobs/ocr", status_code=202, response_model=JobAccepted,
              responses=error_responses(400, 404, 413, 415, 422, 503),  # 429 (TOO_MANY_JOBS too): server/openapi.py
              form_limits=upload_form_limits(max_files=1), openapi_extra=_accepts("file", pdf=True))
async def submit(services: ServicesDep, request: Request,
                 file: Annotated[UploadFile, File(description="A PDF or image (jobs.max_file_mb, jobs.max_pages)")],
                 model: ModelParam, language: LanguageParam, format: FormatParam, region: RegionParam,
                 pages: PagesParam, force_ocr: ForceOcrParam, response: Response,
                 callback_url: Annotated[str | None, Form(max_length=2000, description="POSTed a JSON summary "
                                                          "when the job ends (hosts in jobs.callback_allowed_hosts)")] = None
                 ) -> JobAccepted:
    """Queue an OCR job for a long document; the same fields as /ocr. Poll GET /jobs/{job_id}."""
    cfg = services.settings.jobs
    data = await read_upload(file, cfg.max_file_bytes, cfg.max_file_mb)
    job, position = await services.jobs.submit(
        data, filename=filename_of(file), model=model, language=language, format=format, region=region, pages=pages,
        force_ocr=force_ocr, callback_url=callback_url or None, owner=_owner(request),
        client=client_identity(request.scope))
    mark_fallback(response, job.model or "", job.requested_model, job.fallback_reason)
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobAccepted(job_id=job.id, status=job.status, position=position)


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=error_responses(404))
async def status(services: ServicesDep, request: Request, job_id: str) -> JobStatus:
    """A job's status and progress."""
    return _status(await services.jobs.get(job_id, _owner(request)))


@router.get("/jobs/{job_id}/result", response_model=OcrResponse,
            responses=error_responses(404) | {409: {"description": "The job has not succeeded (yet)"}})
async def result(services: ServicesDep, request: Request, job_id: str, response: Response) -> OcrResponse:
    """The finished job's answer: the same body as /ocr."""
    job = await services.jobs.get(job_id, _owner(request))
    if job.status != "succeeded":
        raise Conflict(f"job is {job.status}" + (f": {job.error}" if job.error else ""), param="job_id",
                       code="JOB_NOT_FINISHED")
    o = await asyncio.to_thread(services.jobs.outcome, job)
    mark_fallback(response, o.model, o.requested_model, o.fallback_reason)
    return ocr_response(o)


@router.delete("/jobs/{job_id}", response_model=JobStatus, responses=error_responses(404))
async def cancel(services: ServicesDep, request: Request, job_id: str) -> JobStatus:
    """Cancel a job (a finished job is left as it is)."""
    return _status(await services.jobs.cancel(await services.jobs.get(job_id, _owner(request))))


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse, responses={
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "`page` events (each finished page, as in page_results), `status` events, then `end`"},
    **error_responses(404)})
async def events(services: ServicesDep, request: Request, job_id: str) -> EventSourceResponse:
    """Each finished page as it is stored, then the final status."""
    owner = _owner(request)
    await services.jobs.get(job_id, owner)  # 404 before the stream starts

    async def stream() -> AsyncIterator[ServerSentEvent]:
        sent: set[int] = set()
        last: str | None = None
        while True:
            job = await asyncio.to_thread(services.jobs.store.get, job_id)
            if job is None:
                yield ServerSentEvent(json.dumps({"status": "expired"}), event="end")
                return
            for page in await asyncio.to_thread(services.jobs.pages, job, sent):
                if page["page"] not in sent:
                    sent.add(page["page"])
                    yield ServerSentEvent(json.dumps(page, ensure_ascii=False), event="page")
            if job.status != last:
                last = job.status
                yield ServerSentEvent(json.dumps(_status(job).model_dump()), event="status")
            if job.done:
                yield ServerSentEvent(json.dumps(_status(job).model_dump()), event="end")
                return
            await asyncio.sleep(POLL_S)

    return EventSourceResponse(stream(), ping=15)


router.include_router(_upload)
