"""Repository functions for users."""
from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from store.records import UserRecord
from store.tables import UserRow, utcnow


def _record(row: UserRow) -> UserRecord:
    return UserRecord(username=row.username, role=row.role, password_hash=row.password_hash,
                      created_at=row.created_at)


def count(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(UserRow)) or 0


def get(s: Session, username: str) -> UserRecord | None:
    row = s.scalar(select(UserRow).where(UserRow.username == username))
    return _record(row) if row else None


def list_all(s: Session) -> list[UserRecord]:
    return [_record(r) for r in s.scalars(select(UserRow).order_by(UserRow.id))]


def add(s: Session, username: str, password_hash: str, role: str) -> UserRecord:
    now = utcnow()
    row = UserRow(username=username, password_hash=password_hash, role=role, created_at=now, updated_at=now)
    s.add(row)
    s.flush()  # a duplicate name raises IntegrityError here, inside the caller's transaction
    return _record(row)


def set_password(s: Session, username: str, password_hash: str) -> bool:
    row = s.scalar(select(UserRow).where(UserRow.username == username))
    if row is None:
        return False
    row.password_hash, row.updated_at = password_hash, utcnow()
    return True


def remove(s: Session, username: str) -> bool:
    return s.execute(delete(UserRow).where(UserRow.username == username)).rowcount > 0


def count_role(s: Session, role: str) -> int:
    return s.scalar(select(func.count()).select_from(UserRow).where(UserRow.role == role)) or 0
