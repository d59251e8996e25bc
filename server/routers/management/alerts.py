"""Alert rules (``/api/config/alerts``) and the alert history (``/api/alerts/history``)."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from core.errors import InvalidParameter
from management.alerts.rules import Rule
from server.routers.management.alerts_schemas import (AlertEventOut, AlertHistoryPage, AlertRuleList, AlertRuleOut,
                                                      CreateAlertRule, UpdateAlertRule)
from server.routers.management.common import (AdminUser, CurrentUser, ManagementDep, MessageResponse,
                                              error_responses)
from store.alerts import AlertRuleRecord

router = APIRouter(tags=["management: alerts"])


def _firing(mgmt, rule_id: str) -> list[str]:
    return sorted(subject for rid, subject in mgmt.alerts.evaluator.active if rid == rule_id)


def _out(mgmt, rec: AlertRuleRecord) -> AlertRuleOut:
    return AlertRuleOut(id=rec.id, name=rec.name, condition=rec.condition, severity=rec.severity,
                        enabled=rec.enabled, notification_channels=rec.notification_channels,
                        firing=_firing(mgmt, rec.id), created_at=rec.created_at, updated_at=rec.updated_at)


def _builtin_out(mgmt, rule: Rule) -> AlertRuleOut:
    return AlertRuleOut(id=rule.id, name=rule.name, condition=rule.condition_text, severity=rule.severity,
                        enabled=True, notification_channels=list(rule.channels), builtin=True,
                        firing=_firing(mgmt, rule.id))


@router.get("/config/alerts", response_model=AlertRuleList, responses=error_responses())
async def list_rules(_: CurrentUser, mgmt: ManagementDep) -> AlertRuleList:
    """The alert rules, and the built-in threshold rules beside them."""
    items = [_out(mgmt, r) for r in mgmt.alerts.rules.all()]
    builtin = [_builtin_out(mgmt, r) for r in mgmt.alerts.evaluator.current_rules() if r.builtin]
    return AlertRuleList(items=items, total=len(items), builtin=builtin)


@router.post("/config/alerts", response_model=AlertRuleOut, status_code=201,
             responses=error_responses(400, 403, 409, 422))
async def create_rule(body: CreateAlertRule, _: AdminUser, mgmt: ManagementDep) -> AlertRuleOut:
    """Create a rule; a condition that does not parse is 422 INVALID_CONDITION with the failing position."""
    rec = await mgmt.alerts.rules.create(name=body.name, condition=body.condition, severity=body.severity,
                                         enabled=body.enabled, channels=list(body.notification_channels))
    return _out(mgmt, rec)


@router.get("/config/alerts/{rule_id}", response_model=AlertRuleOut, responses=error_responses(404))
async def get_rule(rule_id: str, _: CurrentUser, mgmt: ManagementDep) -> AlertRuleOut:
    """One rule, with the subjects it fires for now."""
    return _out(mgmt, mgmt.alerts.rules.get(rule_id))


@router.put("/config/alerts/{rule_id}", response_model=AlertRuleOut,
            responses=error_responses(400, 403, 404, 422))
async def update_rule(rule_id: str, body: UpdateAlertRule, _: AdminUser, mgmt: ManagementDep) -> AlertRuleOut:
    """Change a rule (only the fields given). Disabling it, or changing its condition, resolves what it fired."""
    changes = body.model_dump(exclude_unset=True)
    if not changes or any(v is None for v in changes.values()):
        raise InvalidParameter("give at least one field to change, none of them null", code="INVALID_REQUEST")
    return _out(mgmt, await mgmt.alerts.rules.update(rule_id, changes))


@router.delete("/config/alerts/{rule_id}", response_model=MessageResponse, responses=error_responses(403, 404))
async def delete_rule(rule_id: str, _: AdminUser, mgmt: ManagementDep) -> MessageResponse:
    """Delete a rule; its firing alerts resolve at the next sample. Its history is kept."""
    rec = await mgmt.alerts.rules.delete(rule_id)
    return MessageResponse(message=f"alert rule '{rec.id}' deleted")


@router.get("/alerts/history", response_model=AlertHistoryPage, responses=error_responses(422))
async def history(_: CurrentUser, mgmt: ManagementDep,
                  rule_id: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9:_.-]+$")] = None,
                  state: Literal["firing", "repeat", "resolved"] | None = None,
                  start_time: datetime | None = None, end_time: datetime | None = None,
                  page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
                  size: Annotated[int, Query(ge=1, le=100)] = 20) -> AlertHistoryPage:
    """Alert events, newest first: firings, repeats after the cooldown, resolutions, and how each was notified."""
    for name, value in (("start_time", start_time), ("end_time", end_time)):
        if value is not None and value.tzinfo is None:
            raise InvalidParameter(f"{name} needs a time zone (e.g. 2026-12-01T12:00:00Z)", param=name,
                                   code="INVALID_REQUEST")
    if start_time and end_time and end_time < start_time:
        raise InvalidParameter("end_time is before start_time", param="end_time", code="INVALID_REQUEST")
    events, total = await mgmt.alerts.rules.history(rule_id=rule_id, state=state, since=start_time, until=end_time,
                                                    limit=size, offset=(page - 1) * size)
    items = [AlertEventOut(id=e.id, alert_id=e.alert_id, rule_id=e.rule_id, rule_name=e.rule_name,
                           condition=e.condition, severity=e.severity, state=e.state, subject=e.subject,
                           value=e.value, message=e.message, notifications=e.notifications, timestamp=e.ts)
             for e in events]
    return AlertHistoryPage(items=items, total=total, page=page, size=size,
                            pages=math.ceil(total / size) if total else 0)
