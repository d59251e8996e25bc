"""Where jobs live: one folder per job under ``<data_dir>/jobs/``.

The interface (``JobStore``) is what the job service uses; ``FileJobStore`` keeps it in files
until the management database lands (store/ layer), when a database-backed store can take its
place without the service changing. Every write goes to a temporary file first and is renamed
into place, so a crash never leaves a half-written record behind.

    <id>/job.json      the job record (status, counts, parameters, owner)
    <id>/upload.bin    the uploaded document (deleted when the job ends)
    <id>/pages/N.json  each finished page, as the service serialised it
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Job:
    id: str
    owner: str | None            # the API key's id when keys are on (None: auth off)
    client: str                  # who the per-client bound counts against (key or address)
    status: str = "queued"       # queued | running | succeeded | failed | cancelled
    created: float = field(default_factory=time.time)
    finished: float | None = None
    pages_total: int = 0
    pages_done: int = 0
    error: str | None = None
    filename: str = "upload"
    params: dict[str, Any] = field(default_factory=dict)  # model, language, format, region, pages, force_ocr
    model: str | None = None     # the model that serves
    requested_model: str | None = None
    fallback_reason: str | None = None
    callback_url: str | None = None

    @property
    def done(self) -> bool:
        return self.status in FINISHED


class JobStore(Protocol):
    def create(self, job: Job, upload: bytes) -> None: ...
    def save(self, job: Job) -> None: ...
    def get(self, job_id: str) -> Job | None: ...
    def all(self) -> list[Job]: ...
    def upload(self, job_id: str) -> bytes | None: ...
    def drop_upload(self, job_id: str) -> None: ...
    def save_page(self, job_id: str, index: int, page: dict[str, Any]) -> None: ...
    def pages(self, job_id: str) -> list[dict[str, Any]]: ...
    def delete(self, job_id: str) -> None: ...


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileJobStore:
    def __init__(self, root: Path) -> None:
        self.root = root  # made on the first job: building the store touches no disk

    def _dir(self, job_id: str) -> Path:
        if not job_id.isalnum():  # ids are hex: nothing else may name a folder
            raise KeyError(job_id)
        return self.root / job_id

    def create(self, job: Job, upload: bytes) -> None:
        d = self._dir(job.id)
        (d / "pages").mkdir(parents=True)  # parents: the store's root too, on the first job
        _write(d / "upload.bin", upload)
        self.save(job)

    def save(self, job: Job) -> None:
        _write(self._dir(job.id) / "job.json", json.dumps(asdict(job)).encode())

    def get(self, job_id: str) -> Job | None:
        try:
            raw = (self._dir(job_id) / "job.json").read_bytes()
        except (KeyError, FileNotFoundError, NotADirectoryError):
            return None
        return Job(**json.loads(raw))

    def all(self) -> list[Job]:
        jobs = []
        if not self.root.is_dir():
            return jobs
        for d in self.root.iterdir():
            job = self.get(d.name) if d.is_dir() else None
            if job is not None:
                jobs.append(job)
        return jobs

    def upload(self, job_id: str) -> bytes | None:
        try:
            return (self._dir(job_id) / "upload.bin").read_bytes()
        except FileNotFoundError:
            return None

    def drop_upload(self, job_id: str) -> None:
        (self._dir(job_id) / "upload.bin").unlink(missing_ok=True)

    def save_page(self, job_id: str, index: int, page: dict[str, Any]) -> None:
        _write(self._dir(job_id) / "pages" / f"{index:06d}.json", json.dumps(page, ensure_ascii=False).encode())

    def pages(self, job_id: str) -> list[dict[str, Any]]:
        d = self._dir(job_id) / "pages"
        if not d.is_dir():
            return []
        return [json.loads(p.read_bytes()) for p in sorted(d.glob("*.json"))]

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)
