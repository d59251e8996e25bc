"""Monitoring history (system, GPU and model samples), per-request records and live configuration.

Revision ID: 0002_monitoring
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from store.tables import UTCDateTime

revision = "0002_monitoring"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "monitor_system",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("cpu_percent", sa.Float, nullable=False),
        sa.Column("memory_percent", sa.Float, nullable=False),
        sa.Column("disk_percent", sa.Float, nullable=False),
        sa.Column("memory_used", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_monitor_system_ts", "monitor_system", ["ts"])
    op.create_table(
        "monitor_gpu",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("gpu_index", sa.Integer, nullable=False),
        sa.Column("utilization", sa.Float, nullable=False),
        sa.Column("memory_used", sa.BigInteger, nullable=False),
        sa.Column("memory_total", sa.BigInteger, nullable=False),
        sa.Column("temperature", sa.Float, nullable=True),
        sa.Column("power", sa.Float, nullable=True),
    )
    op.create_index("ix_monitor_gpu_ts", "monitor_gpu", ["ts"])
    op.create_table(
        "monitor_model",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("avg_latency", sa.Float, nullable=True),
        sa.Column("tokens_per_second", sa.Float, nullable=True),
        sa.Column("queue_depth", sa.Integer, nullable=False),
    )
    op.create_index("ix_monitor_model_ts", "monitor_model", ["ts"])
    op.create_table(
        "request_records",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("duration", sa.Float, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
    )
    op.create_index("ix_request_records_ts", "request_records", ["ts"])
    op.create_index("ix_request_records_model_ts", "request_records", ["model", "ts"])
    f = sa.Float
    op.create_table(
        "monitor_system_1h",
        sa.Column("bucket", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("samples", sa.Integer, nullable=False),
        *(sa.Column(c, f, nullable=False) for c in ("cpu_sum", "cpu_max", "mem_sum", "mem_max", "mem_used_sum",
                                                  "disk_sum")),
    )
    op.create_table(
        "monitor_gpu_1h",
        sa.Column("bucket", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("gpu_index", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("samples", sa.Integer, nullable=False),
        *(sa.Column(c, f, nullable=False) for c in ("util_sum", "util_max", "mem_used_sum", "mem_used_max",
                                                  "mem_total_max", "temp_sum")),
        sa.Column("temp_n", sa.Integer, nullable=False),
        sa.Column("temp_max", f, nullable=True),
        sa.Column("power_sum", f, nullable=False),
        sa.Column("power_n", sa.Integer, nullable=False),
    )
    op.create_table(
        "monitor_model_1h",
        sa.Column("bucket", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("lat_sum", f, nullable=False),
        sa.Column("lat_n", sa.Integer, nullable=False),
        sa.Column("tps_sum", f, nullable=False),
        sa.Column("tps_n", sa.Integer, nullable=False),
        sa.Column("queue_sum", f, nullable=False),
        sa.Column("queue_max", sa.Integer, nullable=False),
    )
    op.create_table(
        "config_overrides",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("config_overrides")
    for table in ("monitor_model_1h", "monitor_gpu_1h", "monitor_system_1h"):
        op.drop_table(table)
    op.drop_index("ix_request_records_model_ts", "request_records")
    op.drop_index("ix_request_records_ts", "request_records")
    op.drop_table("request_records")
    for table in ("monitor_model", "monitor_gpu", "monitor_system"):
        op.drop_index(f"ix_{table}_ts", table)
        op.drop_table(table)
