"""Where jobs live: in the management database (store/jobs.py), so every replica that shares
``database.url`` sees every job.

What goes where, and why the database rather than a shared directory:
    jobs        the job record (status, progress, parameters, owner, timestamps, who runs it)
    job_pages   each finished page, as the service serialised it (text, blocks, boxes: kilobytes)
    job_uploads the uploaded document, deleted when the job ends (at most ``jobs.max_file_mb``)
Replicas then need nothing shared but the database: no network filesystem to mount and keep
consistent. The upload cap (100 MB by default) keeps each blob well within what SQLite and
PostgreSQL store comfortably, and it lives only while its job runs.

A job runs in the replica that accepted it, under a lease that replica renews
(``jobs.lease_s``). When a replica stops cleanly it releases its jobs; when it dies, its leases
lapse. Either way another replica (or the same one, restarted) claims and resumes them.
"""
from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from store import jobs as repo
from store.db import Database

FINISHED = repo.FINISHED


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


def worker_name() -> str:
    """This process's name as a job holder: unique even when two replicas share a host and pid."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class DbJobStore:
    """Blocking calls (the service runs them on worker threads); ``bind`` gives it its database."""

    def __init__(self, lease_s: float, worker: str | None = None) -> None:
        self.lease_s = lease_s
        self.worker = worker or worker_name()
        self._db: Database | None = None

    def bind(self, db: Database) -> None:
        self._db = db

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the job store is used before the database was opened")
        return self._db

    def create(self, job: Job, upload: bytes) -> None:
        self.db.call(repo.add, asdict(job), upload, self.worker, time.time() + self.lease_s)

    def save(self, job: Job) -> bool:
        """Write the job; False when the stored job had already finished (it is left as it was)."""
        return self.db.call(repo.save, asdict(job))

    def get(self, job_id: str) -> Job | None:
        record = self.db.call(repo.get, job_id)
        return Job(**record) if record else None

    def holds(self, job_id: str) -> bool:
        """Whether this process still holds the job (its lease was not taken over)."""
        return self.db.call(repo.worker_of, job_id) == self.worker

    def all(self) -> list[Job]:
        return [Job(**r) for r in self.db.call(repo.all_jobs)]

    def unfinished(self) -> list[Job]:
        return [Job(**r) for r in self.db.call(repo.unfinished)]

    def finished_before(self, when: float) -> list[str]:
        return self.db.call(repo.expired, when)

    def claim(self) -> list[str]:
        """Take the unfinished jobs no live replica holds; returns their ids, oldest first."""
        now = time.time()
        return self.db.call(repo.claim, self.worker, now, now + self.lease_s)

    def renew(self) -> int:
        return self.db.call(repo.renew, self.worker, time.time() + self.lease_s)

    def release(self) -> int:
        return self.db.call(repo.release, self.worker)

    def upload(self, job_id: str) -> bytes | None:
        return self.db.call(repo.upload, job_id)

    def drop_upload(self, job_id: str) -> None:
        self.db.call(repo.drop_upload, job_id)

    def save_page(self, job_id: str, index: int, page: dict[str, Any]) -> None:
        self.db.call(repo.save_page, job_id, index, page)

    def pages(self, job_id: str, skip: Collection[int] = ()) -> list[dict[str, Any]]:
        return self.db.call(repo.pages, job_id, skip)

    def delete(self, job_id: str) -> None:
        self.db.call(repo.remove, job_id)
