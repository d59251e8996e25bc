"""Plain records the repositories return: services never hold ORM objects tied to a session."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class UserRecord:
    username: str
    role: str
    password_hash: str
    created_at: datetime


@dataclass(frozen=True)
class ModelRecord:
    id: str
    name: str
    display_name: str
    description: str
    framework: str
    kind: str
    path: str | None
    priority: int
    config: dict[str, Any] = field(default_factory=dict)
    resource_requirements: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class TaskRecord:
    id: str
    model_name: str
    action: str
    status: str  # pending | running | succeeded | failed
    error: str | None
    error_code: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class LogRecord:
    id: int
    model_name: str
    ts: datetime
    level: str
    message: str
