"""SQLAlchemy tables. Their schema changes only through a migration under store/migrations."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, LargeBinary, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on both backends (SQLite keeps no zone: it is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ModelRow(Base):
    """A model created through the API (models of config.yaml live in the file)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text)
    framework: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    priority: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    resource_requirements: Mapped[dict[str, Any]] = mapped_column(JSON)
    tags: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DesiredStateRow(Base):
    """What the operator asked for a model (running or stopped), for config and API models alike."""

    __tablename__ = "desired_states"

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    desired: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TaskRow(Base):
    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_model_name", "model_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ModelLogRow(Base):
    __tablename__ = "model_logs"
    __table_args__ = (Index("ix_model_logs_model_id", "model_name", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(Text)


class JobRow(Base):
    """An OCR job (jobs/), shared by every replica on the database. ``worker`` is the replica that
    runs it, as long as it keeps renewing ``lease_until`` (epoch seconds)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status", "status"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    pages_total: Mapped[int] = mapped_column(Integer)
    pages_done: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    filename: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    requested_model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fallback_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobPageRow(Base):
    __tablename__ = "job_pages"

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    page: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class JobUploadRow(Base):
    """A job's uploaded document, kept until the job ends (at most jobs.max_file_mb)."""

    __tablename__ = "job_uploads"

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


# ---- monitoring (issue 11, data half): samples, request records, live configuration ----------------
# Sample times are integer UTC epoch seconds (bucketed in SQL as ``ts - ts % width`` on both backends);
# request records keep fractional seconds.

class SystemSampleRow(Base):
    __tablename__ = "monitor_system"
    __table_args__ = (Index("ix_monitor_system_ts", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    cpu_percent: Mapped[float] = mapped_column(Float)
    memory_percent: Mapped[float] = mapped_column(Float)
    disk_percent: Mapped[float] = mapped_column(Float)
    memory_used: Mapped[int] = mapped_column(BigInteger)


class GpuSampleRow(Base):
    __tablename__ = "monitor_gpu"
    __table_args__ = (Index("ix_monitor_gpu_ts", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    gpu_index: Mapped[int] = mapped_column(Integer)
    utilization: Mapped[float] = mapped_column(Float)
    memory_used: Mapped[int] = mapped_column(BigInteger)
    memory_total: Mapped[int] = mapped_column(BigInteger)
    temperature: Mapped[float | None] = mapped_column(Float, nullable=True)
    power: Mapped[float | None] = mapped_column(Float, nullable=True)


class ModelSampleRow(Base):
    __tablename__ = "monitor_model"
    __table_args__ = (Index("ix_monitor_model_ts", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    avg_latency: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    queue_depth: Mapped[int] = mapped_column(Integer)


class RequestRecordRow(Base):
    """One HTTP request (or background job) of any surface: route template, model, status, time, tokens."""

    __tablename__ = "request_records"
    __table_args__ = (Index("ix_request_records_ts", "ts"), Index("ix_request_records_model_ts", "model", "ts"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    ts: Mapped[float] = mapped_column(Float)  # when the request ended, UTC epoch seconds
    route: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(8))
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    duration: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ConfigOverrideRow(Base):
    """A live setting changed through PUT /api/config: wins over config.yaml, survives restarts."""

    __tablename__ = "config_overrides"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_by: Mapped[str] = mapped_column(String(64))


# Hourly rollups of the samples, kept by store.rollup as samples are written: queries at 1 h and 1 d
# buckets read these (168 rows per series for a week) instead of every raw sample.

class SystemHourRow(Base):
    __tablename__ = "monitor_system_1h"

    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    samples: Mapped[int] = mapped_column(Integer)
    cpu_sum: Mapped[float] = mapped_column(Float)
    cpu_max: Mapped[float] = mapped_column(Float)
    mem_sum: Mapped[float] = mapped_column(Float)
    mem_max: Mapped[float] = mapped_column(Float)
    mem_used_sum: Mapped[float] = mapped_column(Float)
    disk_sum: Mapped[float] = mapped_column(Float)


class GpuHourRow(Base):
    __tablename__ = "monitor_gpu_1h"

    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    gpu_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    samples: Mapped[int] = mapped_column(Integer)
    util_sum: Mapped[float] = mapped_column(Float)
    util_max: Mapped[float] = mapped_column(Float)
    mem_used_sum: Mapped[float] = mapped_column(Float)
    mem_used_max: Mapped[float] = mapped_column(Float)
    mem_total_max: Mapped[float] = mapped_column(Float)
    temp_sum: Mapped[float] = mapped_column(Float)
    temp_n: Mapped[int] = mapped_column(Integer)
    temp_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_sum: Mapped[float] = mapped_column(Float)
    power_n: Mapped[int] = mapped_column(Integer)


class ModelHourRow(Base):
    __tablename__ = "monitor_model_1h"

    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    lat_sum: Mapped[float] = mapped_column(Float)      # sum of a sample's mean latency x its requests
    lat_n: Mapped[int] = mapped_column(Integer)        # requests behind lat_sum
    tps_sum: Mapped[float] = mapped_column(Float)
    tps_n: Mapped[int] = mapped_column(Integer)
    queue_sum: Mapped[float] = mapped_column(Float)
    queue_max: Mapped[int] = mapped_column(Integer)
