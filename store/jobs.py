"""Repository functions for OCR jobs: records as plain dicts of the ``jobs`` columns, finished
pages as JSON rows, uploads as one blob each (deleted when the job ends).

A finished job (succeeded, failed, cancelled) is final: ``save`` never changes it again, so a
cancel made through one replica is not overwritten by the progress of the replica running it.
Replicas hold the jobs they run under a lease they renew; a job whose lease ran out (its
replica stopped or died) is claimed by the first replica that asks.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from store.tables import JobPageRow, JobRow, JobUploadRow

FINISHED = ("succeeded", "failed", "cancelled")
_FIELDS = ("id", "owner", "client", "status", "created", "finished", "pages_total", "pages_done", "error",
           "filename", "params", "model", "requested_model", "fallback_reason", "callback_url")


def _dict(row: JobRow) -> dict[str, Any]:
    return {f: getattr(row, f) for f in _FIELDS}


def add(s: Session, record: dict[str, Any], upload: bytes, worker: str, lease_until: float) -> None:
    s.add(JobRow(**{f: record[f] for f in _FIELDS}, worker=worker, lease_until=lease_until))
    s.add(JobUploadRow(job_id=record["id"], data=upload))


def save(s: Session, record: dict[str, Any]) -> bool:
    """Write the record unless the stored job has already finished; True when it was written."""
    values = {f: record[f] for f in _FIELDS if f not in ("id", "owner", "client", "created")}
    result = s.execute(update(JobRow).where(JobRow.id == record["id"], JobRow.status.not_in(FINISHED))
                       .values(**values))
    return bool(result.rowcount)


def get(s: Session, job_id: str) -> dict[str, Any] | None:
    row = s.get(JobRow, job_id)
    return _dict(row) if row else None


def worker_of(s: Session, job_id: str) -> str | None:
    return s.scalar(select(JobRow.worker).where(JobRow.id == job_id))


def all_jobs(s: Session) -> list[dict[str, Any]]:
    return [_dict(r) for r in s.scalars(select(JobRow).order_by(JobRow.created))]


def unfinished(s: Session) -> list[dict[str, Any]]:
    return [_dict(r) for r in s.scalars(select(JobRow).where(JobRow.status.not_in(FINISHED)))]


def expired(s: Session, finished_before: float) -> list[str]:
    return list(s.scalars(select(JobRow.id).where(JobRow.status.in_(FINISHED), JobRow.finished < finished_before)))


def claim(s: Session, worker: str, now: float, lease_until: float) -> list[str]:
    """Take the unfinished jobs nobody holds (no lease, or a lapsed one); returns their ids."""
    free = (JobRow.lease_until.is_(None)) | (JobRow.lease_until < now)
    rows = s.execute(update(JobRow).where(JobRow.status.not_in(FINISHED), free)
                     .values(worker=worker, lease_until=lease_until).returning(JobRow.id, JobRow.created))
    return [r.id for r in sorted(rows, key=lambda r: r.created)]


def renew(s: Session, worker: str, lease_until: float) -> int:
    result = s.execute(update(JobRow).where(JobRow.worker == worker, JobRow.status.not_in(FINISHED))
                       .values(lease_until=lease_until))
    return result.rowcount or 0


def release(s: Session, worker: str) -> int:
    """Give up this worker's unfinished jobs (a clean stop): the next replica to look takes them."""
    result = s.execute(update(JobRow).where(JobRow.worker == worker, JobRow.status.not_in(FINISHED))
                       .values(worker=None, lease_until=None))
    return result.rowcount or 0


def upload(s: Session, job_id: str) -> bytes | None:
    return s.scalar(select(JobUploadRow.data).where(JobUploadRow.job_id == job_id))


def drop_upload(s: Session, job_id: str) -> None:
    s.execute(delete(JobUploadRow).where(JobUploadRow.job_id == job_id))


def save_page(s: Session, job_id: str, index: int, page: dict[str, Any]) -> None:
    s.merge(JobPageRow(job_id=job_id, page=index, data=page))


def pages(s: Session, job_id: str, skip: Collection[int] = ()) -> list[dict[str, Any]]:
    query = select(JobPageRow.data).where(JobPageRow.job_id == job_id)
    if skip:
        query = query.where(JobPageRow.page.not_in(list(skip)))
    return list(s.scalars(query.order_by(JobPageRow.page)))



def remove(s: Session, job_id: str) -> None:
    for table in (JobPageRow, JobUploadRow):
        s.execute(delete(table).where(table.job_id == job_id))
    s.execute(delete(JobRow).where(JobRow.id == job_id))
