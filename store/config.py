"""Repository functions for the live configuration's overrides (PUT /api/config)."""
from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from store.tables import ConfigOverrideRow, utcnow


def overrides(s: Session) -> dict[str, Any]:
    return {r.key: r.value for r in s.scalars(select(ConfigOverrideRow))}


def save(s: Session, values: dict[str, Any], by: str) -> None:
    """Upsert each key; a value of None removes the override (back to config.yaml's value)."""
    now = utcnow()
    for key, value in values.items():
        row = s.get(ConfigOverrideRow, key)
        if value is None:
            if row is not None:
                s.execute(delete(ConfigOverrideRow).where(ConfigOverrideRow.key == key))
        elif row is None:
            s.add(ConfigOverrideRow(key=key, value=value, updated_at=now, updated_by=by))
        else:
            row.value, row.updated_at, row.updated_by = value, now, by
