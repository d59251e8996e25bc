"""Alert rules and the alert history (rows, records and repository functions).

Kept beside, not inside, store/tables.py: the tables share its ``Base`` and change only through
the migration 0003_alerts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String, Text, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from store.tables import Base, UTCDateTime, utcnow


class AlertRuleRow(Base):
    __tablename__ = "alert_rules"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    condition: Mapped[str] = mapped_column(String(200))
    severity: Mapped[str] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(Boolean)
    notification_channels: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AlertEventRow(Base):
    """One transition of an alert: it fired, it was notified again (cooldown), or it resolved."""

    __tablename__ = "alert_events"
    __table_args__ = (Index("ix_alert_events_ts", "ts"), Index("ix_alert_events_rule", "rule_id", "ts"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    alert_id: Mapped[str] = mapped_column(String(40))
    rule_id: Mapped[str] = mapped_column(String(64))
    rule_name: Mapped[str] = mapped_column(String(200))
    condition: Mapped[str] = mapped_column(String(200))
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))          # firing | repeat | resolved
    subject: Mapped[str] = mapped_column(String(200))       # system | gpu:<index> | model:<name>
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str] = mapped_column(Text)
    notifications: Mapped[dict[str, Any]] = mapped_column(JSON)  # channel -> {ok, attempts, error}
    ts: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class AlertRuleRecord:
    id: str
    name: str
    condition: str
    severity: str
    enabled: bool
    notification_channels: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class AlertEventRecord:
    id: int
    alert_id: str
    rule_id: str
    rule_name: str
    condition: str
    severity: str
    state: str
    subject: str
    value: float | None
    message: str
    notifications: dict[str, Any]
    ts: datetime


def _rule(r: AlertRuleRow) -> AlertRuleRecord:
    return AlertRuleRecord(r.id, r.name, r.condition, r.severity, r.enabled, list(r.notification_channels),
                           r.created_at, r.updated_at)


def _event(r: AlertEventRow) -> AlertEventRecord:
    return AlertEventRecord(r.id, r.alert_id, r.rule_id, r.rule_name, r.condition, r.severity, r.state, r.subject,
                            r.value, r.message, dict(r.notifications or {}), r.ts)


# ---- rules -----------------------------------------------------------------------------------
def add_rule(s: Session, rec: AlertRuleRecord) -> AlertRuleRecord:
    now = utcnow()
    row = AlertRuleRow(id=rec.id, name=rec.name, condition=rec.condition, severity=rec.severity,
                       enabled=rec.enabled, notification_channels=list(rec.notification_channels),
                       created_at=now, updated_at=now)
    s.add(row)
    s.flush()
    return _rule(row)


def list_rules(s: Session) -> list[AlertRuleRecord]:
    return [_rule(r) for r in s.scalars(select(AlertRuleRow).order_by(AlertRuleRow.created_at, AlertRuleRow.id))]


def count_rules(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(AlertRuleRow)) or 0


def get_rule(s: Session, rule_id: str) -> AlertRuleRecord | None:
    row = s.get(AlertRuleRow, rule_id)
    return _rule(row) if row else None


def update_rule(s: Session, rule_id: str, changes: dict[str, Any]) -> AlertRuleRecord | None:
    row = s.get(AlertRuleRow, rule_id)
    if row is None:
        return None
    for key, value in changes.items():
        setattr(row, key, list(value) if key == "notification_channels" else value)
    row.updated_at = utcnow()
    s.flush()
    return _rule(row)


def remove_rule(s: Session, rule_id: str) -> bool:
    return bool(s.execute(delete(AlertRuleRow).where(AlertRuleRow.id == rule_id)).rowcount)


# ---- history ---------------------------------------------------------------------------------
def add_event(s: Session, *, alert_id: str, rule_id: str, rule_name: str, condition: str, severity: str,
              state: str, subject: str, value: float | None, message: str, ts: datetime) -> int:
    row = AlertEventRow(alert_id=alert_id, rule_id=rule_id, rule_name=rule_name, condition=condition,
                        severity=severity, state=state, subject=subject, value=value, message=message,
                        notifications={}, ts=ts)
    s.add(row)
    s.flush()
    return row.id


def set_notifications(s: Session, event_id: int, notifications: dict[str, Any]) -> None:
    row = s.get(AlertEventRow, event_id)
    if row is not None:
        row.notifications = dict(notifications)


def history(s: Session, *, rule_id: str | None = None, state: str | None = None, since: datetime | None = None,
            until: datetime | None = None, limit: int = 100, offset: int = 0) -> tuple[list[AlertEventRecord], int]:
    """Newest first, and the total count matching the filters."""
    q = select(AlertEventRow)
    if rule_id is not None:
        q = q.where(AlertEventRow.rule_id == rule_id)
    if state is not None:
        q = q.where(AlertEventRow.state == state)
    if since is not None:
        q = q.where(AlertEventRow.ts >= since)
    if until is not None:
        q = q.where(AlertEventRow.ts <= until)
    total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = s.scalars(q.order_by(AlertEventRow.id.desc()).offset(offset).limit(limit))
    return [_event(r) for r in rows], total


def get_event(s: Session, event_id: int) -> AlertEventRecord | None:
    row = s.get(AlertEventRow, event_id)
    return _event(row) if row else None


def prune_history(s: Session, before: datetime, keep_alert_ids: set[str]) -> int:
    """Delete the events older than ``before``, except those of the alerts in ``keep_alert_ids``
    (still firing: their firing event is what the resolution will refer to). Returns rows deleted."""
    q = delete(AlertEventRow).where(AlertEventRow.ts < before)
    if keep_alert_ids:
        q = q.where(AlertEventRow.alert_id.not_in(sorted(keep_alert_ids)))
    return s.execute(q).rowcount or 0
