"""Alert rules and the alert history (issue 11, notifications).

Revision ID: 0003_alerts
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from store.tables import UTCDateTime

revision = "0003_alerts"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_rules",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("condition", sa.String(200), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("notification_channels", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "alert_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("alert_id", sa.String(40), nullable=False),
        sa.Column("rule_id", sa.String(64), nullable=False),
        sa.Column("rule_name", sa.String(200), nullable=False),
        sa.Column("condition", sa.String(200), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("notifications", sa.JSON, nullable=False),
        sa.Column("ts", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_alert_events_ts", "alert_events", ["ts"])
    op.create_index("ix_alert_events_rule", "alert_events", ["rule_id", "ts"])


def downgrade() -> None:
    op.drop_index("ix_alert_events_rule", "alert_events")
    op.drop_index("ix_alert_events_ts", "alert_events")
    op.drop_table("alert_events")
    op.drop_table("alert_rules")
