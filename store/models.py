"""Repository functions for API-created models and the desired state of every model."""
from __future__ import annotations

from dataclasses import asdict

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from store.records import ModelRecord
from store.tables import DesiredStateRow, ModelRow, utcnow


def _record(row: ModelRow) -> ModelRecord:
    return ModelRecord(id=row.id, name=row.name, display_name=row.display_name, description=row.description,
                       framework=row.framework, kind=row.kind, path=row.path, priority=row.priority,
                       config=dict(row.config or {}), resource_requirements=dict(row.resource_requirements or {}),
                       tags=list(row.tags or []), created_at=row.created_at, updated_at=row.updated_at)


def list_all(s: Session) -> list[ModelRecord]:
    return [_record(r) for r in s.scalars(select(ModelRow).order_by(ModelRow.created_at, ModelRow.name))]


def signature(s: Session) -> tuple:
    """(count, newest updated_at) of the API models: any create, update or delete changes it."""
    return tuple(s.execute(select(func.count(), func.max(ModelRow.updated_at)).select_from(ModelRow)).one())


def add(s: Session, rec: ModelRecord) -> ModelRecord:
    row = ModelRow(**asdict(rec))
    s.add(row)
    s.flush()  # a duplicate name raises IntegrityError inside the caller's transaction
    return _record(row)


def update(s: Session, rec: ModelRecord) -> ModelRecord | None:
    row = s.get(ModelRow, rec.id)
    if row is None:
        return None
    for key, value in asdict(rec).items():
        if key not in ("id", "created_at"):
            setattr(row, key, value)
    return _record(row)


def remove(s: Session, model_id: str) -> bool:
    row = s.get(ModelRow, model_id)
    if row is None:
        return False
    s.execute(delete(DesiredStateRow).where(DesiredStateRow.model_name == row.name))
    s.delete(row)
    return True


def desired_states(s: Session) -> dict[str, str]:
    return {r.model_name: r.desired for r in s.scalars(select(DesiredStateRow))}


def set_desired(s: Session, name: str, desired: str) -> None:
    row = s.get(DesiredStateRow, name)
    if row is None:
        s.add(DesiredStateRow(model_name=name, desired=desired, updated_at=utcnow()))
    else:
        row.desired, row.updated_at = desired, utcnow()
