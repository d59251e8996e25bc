"""Repository functions for lifecycle tasks (start, stop, restart)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.records import TaskRecord
from store.tables import TaskRow, utcnow


def _record(row: TaskRow) -> TaskRecord:
    return TaskRecord(id=row.id, model_name=row.model_name, action=row.action, status=row.status,
                      error=row.error, error_code=row.error_code, created_at=row.created_at,
                      started_at=row.started_at, finished_at=row.finished_at)


def add(s: Session, task_id: str, model_name: str, action: str) -> TaskRecord:
    row = TaskRow(id=task_id, model_name=model_name, action=action, status="pending", created_at=utcnow())
    s.add(row)
    s.flush()
    return _record(row)


def get(s: Session, task_id: str) -> TaskRecord | None:
    row = s.get(TaskRow, task_id)
    return _record(row) if row else None


def mark(s: Session, task_id: str, status: str, *, error: str | None = None, error_code: str | None = None,
         at: datetime | None = None) -> None:
    row = s.get(TaskRow, task_id)
    if row is None:
        return
    row.status = status
    now = at or utcnow()
    if status == "running":
        row.started_at = now
    elif status in ("succeeded", "failed"):
        row.finished_at = now
        row.error, row.error_code = error, error_code


def fail_unfinished(s: Session, reason: str) -> int:
    """Tasks a previous process left pending or running (it stopped or was killed): failed."""
    result = s.execute(update(TaskRow).where(TaskRow.status.in_(("pending", "running")))
                       .values(status="failed", error=reason, error_code="INTERRUPTED", finished_at=utcnow()))
    return result.rowcount or 0


def list_for(s: Session, model_name: str, limit: int = 20) -> list[TaskRecord]:
    rows = s.scalars(select(TaskRow).where(TaskRow.model_name == model_name)
                     .order_by(TaskRow.created_at.desc()).limit(limit))
    return [_record(r) for r in rows]
