"""Repository functions for per-model log lines (bounded per model)."""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from store.records import LogRecord
from store.tables import ModelLogRow


def add_many(s: Session, lines: Iterable[tuple[str, object, str, str]]) -> None:
    """(model_name, ts, level, message) tuples."""
    s.add_all(ModelLogRow(model_name=m, ts=ts, level=level, message=msg) for m, ts, level, msg in lines)


def recent(s: Session, model_name: str, limit: int) -> list[LogRecord]:
    """The last ``limit`` lines of a model, oldest first."""
    rows = list(s.scalars(select(ModelLogRow).where(ModelLogRow.model_name == model_name)
                          .order_by(ModelLogRow.id.desc()).limit(limit)))
    return [LogRecord(r.id, r.model_name, r.ts, r.level, r.message) for r in reversed(rows)]


def model_names(s: Session) -> list[str]:
    return list(s.scalars(select(ModelLogRow.model_name).distinct()))


def trim(s: Session, model_name: str, keep: int) -> int:
    """Drop all but the newest ``keep`` lines of a model."""
    cutoff = s.scalar(select(ModelLogRow.id).where(ModelLogRow.model_name == model_name)
                      .order_by(ModelLogRow.id.desc()).offset(keep).limit(1))
    if cutoff is None:
        return 0
    return s.execute(delete(ModelLogRow).where(ModelLogRow.model_name == model_name,
                                               ModelLogRow.id <= cutoff)).rowcount or 0


def remove_model(s: Session, model_name: str) -> None:
    s.execute(delete(ModelLogRow).where(ModelLogRow.model_name == model_name))


def count(s: Session, model_name: str) -> int:
    return s.scalar(select(func.count()).select_from(ModelLogRow).where(ModelLogRow.model_name == model_name)) or 0
