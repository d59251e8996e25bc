"""``chatvlm ocr``: read many files through a backend, a few at a time, into a sink, with progress.

A failed file is recorded and the run goes on. Ctrl-C (SIGINT) stops scheduling, cancels the
requests in flight (their answers are never written) and leaves every output whole, so a rerun
carries on from the last record.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Any

from chatvlm.backends import Failure, OcrOptions
from chatvlm.inputs import InputFile, content_hash
from ocr.page_ranges import parse_pages


@dataclass
class Summary:
    total: int = 0
    read: int = 0
    skipped: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # path, code, message
    submitted: int = 0  # --no-wait: left running as jobs on the server
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)


@dataclass(frozen=True)
class _Job:
    file: InputFile
    sha256: str
    key: str
    pages: int


def resume_key(sha256: str, opts: OcrOptions) -> str:
    """The same bytes read with the same options give the same key, wherever the file lies."""
    return hashlib.sha256(json.dumps({"sha256": sha256, "options": opts.key()}, sort_keys=True).encode()).hexdigest()


def _page_count(data: bytes, fmt: str | None, selected: list[int] | None) -> int:
    if fmt != "PDF":
        return 1
    from ocr.pdf import page_count

    try:
        n = page_count(data)
    except Exception:  # an unreadable PDF fails when it is read; count it as one page
        return 1
    return len([p for p in selected if p < n]) if selected is not None else n


def plan(files: list[InputFile], opts: OcrOptions) -> list[_Job]:
    selected = parse_pages(opts.pages)
    jobs = []
    for f in files:
        data = f.path.read_bytes()
        sha = content_hash(data)
        jobs.append(_Job(f, sha, resume_key(sha, opts), _page_count(data, f.format, selected)))
    return jobs


async def _read_one(backend: Any, job: _Job, opts: OcrOptions, sink: Any, record: dict[str, Any],
                    on_pages: Any, job_pages: int, wait: bool) -> dict[str, Any] | None:
    """The file's answer; None when it was left running as a job (--no-wait)."""
    f = job.file
    if f.format is None:
        raise Failure("UNSUPPORTED_FILE", "not a readable image (JPG, PNG, BMP, TIFF) or PDF")
    data = await asyncio.to_thread(f.path.read_bytes)
    if f.format != "PDF" and opts.pages is not None:
        opts = replace(opts, pages=None)  # --pages picks PDF pages; the images of a mixed folder are read whole
    if f.format == "PDF" and job_pages and job.pages >= job_pages:
        # A long PDF is read as a job, page by page. Its id is recorded at once, so a run that is
        # interrupted (or --no-wait) is carried on by the next one instead of starting again.
        def on_job(job_id: str) -> None:
            sink.write_pending({**record, "status": "submitted", "job_id": job_id})

        return await backend.ocr_job(data, f.path.name, opts, job_id=sink.pending.get(job.key), on_job=on_job,
                                     on_pages=on_pages, wait=wait)
    return await backend.ocr(data, f.path.name, opts)


async def run(jobs: list[_Job], backend: Any, opts: OcrOptions, sink: Any, concurrency: int,
              progress: Any = None, on_failure: Any = None, job_pages: int = 0, wait: bool = True) -> Summary:
    summary = Summary(total=len(jobs))
    started = time.perf_counter()
    files_task = pages_task = None
    if progress is not None:
        files_task = progress.add_task("files", total=len(jobs))
        pages_task = progress.add_task("pages", total=sum(j.pages for j in jobs))

    def advance(job: _Job, pages_seen: int = 0) -> None:
        if progress is not None:
            progress.advance(files_task)
            progress.advance(pages_task, max(0, job.pages - pages_seen))

    def page_counter(job: _Job) -> tuple[Any, list[int]]:
        seen = [0]

        def on_pages(done: int, total: int) -> None:  # a job's pages, as they finish
            if progress is not None and done > seen[0]:
                progress.advance(pages_task, min(done, job.pages) - seen[0])
                seen[0] = min(done, job.pages)
        return on_pages, seen

    queue: asyncio.Queue[_Job] = asyncio.Queue()
    for job in jobs:
        if job.key in sink.done:
            summary.skipped += 1
            advance(job)
        else:
            queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            record = {"path": str(job.file.path), "name": job.file.name.as_posix(), "sha256": job.sha256,
                      "key": job.key, "options": opts.key()}
            on_pages, seen = page_counter(job)
            try:
                result = await _read_one(backend, job, opts, sink, record, on_pages, job_pages, wait)
            except Failure as exc:
                summary.failed.append((str(job.file.path), exc.code, exc.message))
                if on_failure is not None:
                    on_failure(job.file.path, exc)
                sink.write({**record, "status": "error", "error": {"code": exc.code, "message": exc.message}}, None)
            else:
                if result is None:
                    summary.submitted += 1
                    advance(job, seen[0])
                    continue  # its "submitted" record is written; the next run collects it
                summary.read += 1
                sink.write({**record, "status": "ok", "model": result.get("model"),
                            "pages": result.get("pages")}, result)
            advance(job, seen[0])

    loop = asyncio.get_running_loop()
    workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]

    def interrupt() -> None:
        summary.interrupted = True
        for w in workers:
            w.cancel()  # sink writes have no await inside: a record is never cut in two

    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (NotImplementedError, RuntimeError):  # not the main thread: Ctrl-C raises as usual
        pass
    try:
        await asyncio.gather(*workers, return_exceptions=True)
        for w in workers:
            if not w.cancelled() and w.exception() is not None:
                raise w.exception()
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError):
            pass
        summary.seconds = time.perf_counter() - started
    return summary
