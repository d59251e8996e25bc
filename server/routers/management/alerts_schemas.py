"""Schemas of the alert routes: rules (seed 004's fields) and the alert history."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from management.alerts.condition import METRICS

Severity = Literal["info", "warning", "critical"]
Channel = Literal["webhook", "email"]

CONDITION_DOC = ("`<metric> <op> <number> [for <duration>]`, e.g. `gpu_utilization > 90 for 5m`. Metrics: "
                 + ", ".join(f"`{m}` ({d})" for m, (_, d) in METRICS.items())
                 + ". Ops: > >= < <= == !=. Durations: 30s, 5m, 1h (at most 7 days).")


NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # no control characters (PostgreSQL refuses NUL in text)


# The grammar as a pattern, for the OpenAPI schema only (clients and schema-driven tests): the
# server parses the condition itself, and a bad one gets 422 INVALID_CONDITION with its position.
CONDITION_PATTERN = (r"^[ \t]*(" + "|".join(METRICS) + r")[ \t]*(>=|<=|==|!=|>|<)[ \t]*-?[0-9]+(\.[0-9]+)?"
                     r"([ \t]+for[ \t]+[0-9]+[smh])?[ \t]*$")
_CONDITION_SCHEMA = {"pattern": CONDITION_PATTERN, "examples": ["gpu_utilization > 90 for 5m", "model_error == 1"]}


class _RuleFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateAlertRule(_RuleFields):
    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    condition: str = Field(min_length=1, max_length=200, description=CONDITION_DOC,
                           json_schema_extra=_CONDITION_SCHEMA)
    severity: Severity = "warning"
    enabled: bool = True
    notification_channels: list[Channel] = Field([], max_length=2, description="webhook (alerts.webhooks) and/or "
                                                 "email (alerts.smtp); none: history and /ws/monitor only")


class UpdateAlertRule(_RuleFields):
    """Only the fields given change; at least one."""

    name: str | None = Field(None, min_length=1, max_length=200, pattern=NAME_PATTERN)
    condition: str | None = Field(None, min_length=1, max_length=200, description=CONDITION_DOC,
                                  json_schema_extra=_CONDITION_SCHEMA)
    severity: Severity | None = None
    enabled: bool | None = None
    notification_channels: list[Channel] | None = Field(None, max_length=2)


class AlertRuleOut(BaseModel):
    id: str
    name: str
    condition: str
    severity: Severity
    enabled: bool
    notification_channels: list[str]
    builtin: bool = Field(False, description="a built-in threshold rule (config alert_thresholds): read-only")
    firing: list[str] = Field(description="Subjects the rule fires for now: system, gpu:<index>, model:<name>")
    created_at: datetime | None = None
    updated_at: datetime | None = None


class AlertRuleList(BaseModel):
    items: list[AlertRuleOut] = Field(description="The rules created through this API")
    total: int
    builtin: list[AlertRuleOut] = Field(description="The built-in threshold rules (alert_thresholds)")


class AlertEventOut(BaseModel):
    id: int
    alert_id: str = Field(description="One firing, from its first event to its resolution")
    rule_id: str
    rule_name: str
    condition: str
    severity: Severity
    state: Literal["firing", "repeat", "resolved"] = Field(description="repeat: notified again after cooldown_s")
    subject: str
    value: float | None
    message: str
    notifications: dict = Field(description="Per channel: ok, attempts, status or error (filled in once sent)")
    timestamp: datetime


class AlertHistoryPage(BaseModel):
    items: list[AlertEventOut]
    total: int
    page: int
    size: int
    pages: int
