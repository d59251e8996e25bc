"""Alert rules: created, changed and deleted through the API, kept in the store, and cached here
(parsed) for the evaluator, which reads them on every sample without touching the database."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.errors import Conflict, InvalidParameter, NotFound
from management.alerts.condition import Condition, ConditionError, parse
from store import alerts as repo
from store.alerts import AlertEventRecord, AlertRuleRecord
from store.db import Database

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Rule:
    """A rule ready to evaluate: its record and its parsed condition."""

    id: str
    name: str
    condition_text: str
    condition: Condition
    severity: str
    enabled: bool
    channels: tuple[str, ...]
    builtin: bool = False
    record: AlertRuleRecord | None = None


def parse_condition(text: str) -> Condition:
    """The parsed condition, or 422 INVALID_CONDITION naming the position where it fails."""
    try:
        return parse(text)
    except ConditionError as exc:
        raise InvalidParameter(f"condition: {exc}", param="condition", code="INVALID_CONDITION",
                               details={"condition": text, "position": exc.position, "reason": exc.reason}) from None


def _rule(rec: AlertRuleRecord) -> Rule:
    return Rule(rec.id, rec.name, rec.condition, parse(rec.condition), rec.severity, rec.enabled,
                tuple(rec.notification_channels), record=rec)


class AlertRules:
    def __init__(self, max_rules: int) -> None:
        self.max_rules = max_rules
        self.db: Database | None = None
        self._rules: dict[str, Rule] = {}
        self._changes = 0  # bumped by every change made here: a refresh read before one is discarded

    def load(self, db: Database) -> None:
        """Read every rule (blocking; at start-up)."""
        self.db = db
        self._rules = {rec.id: _rule(rec) for rec in db.call(repo.list_rules)}

    def enabled(self) -> list[Rule]:
        return [r for r in self._rules.values() if r.enabled]

    def all(self) -> list[AlertRuleRecord]:
        return [r.record for r in self._rules.values()]

    def get(self, rule_id: str) -> AlertRuleRecord:
        rule = self._rules.get(rule_id)
        if rule is None:
            raise NotFound(f"alert rule '{rule_id[:64]}' not found", param="rule_id", code="ALERT_RULE_NOT_FOUND")
        return rule.record

    async def create(self, *, name: str, condition: str, severity: str, enabled: bool,
                     channels: list[str]) -> AlertRuleRecord:
        parse_condition(condition)
        if len(self._rules) >= self.max_rules:
            raise Conflict(f"there are already {self.max_rules} alert rules (alerts.max_rules)",
                           code="TOO_MANY_ALERT_RULES")
        rec = AlertRuleRecord(id=f"alert-{uuid.uuid4().hex[:12]}", name=name, condition=condition,
                              severity=severity, enabled=enabled, notification_channels=list(dict.fromkeys(channels)))
        rec = await self.db.run(repo.add_rule, rec)
        self._changes += 1
        self._rules[rec.id] = _rule(rec)
        return rec

    async def update(self, rule_id: str, changes: dict[str, Any]) -> AlertRuleRecord:
        self.get(rule_id)
        if "condition" in changes:
            parse_condition(changes["condition"])
        if "notification_channels" in changes:
            changes["notification_channels"] = list(dict.fromkeys(changes["notification_channels"]))
        rec = await self.db.run(repo.update_rule, rule_id, changes)
        self._changes += 1
        if rec is None:  # deleted meanwhile
            self._rules.pop(rule_id, None)
            self.get(rule_id)
        self._rules[rule_id] = _rule(rec)
        return rec

    async def delete(self, rule_id: str) -> AlertRuleRecord:
        rec = self.get(rule_id)
        await self.db.run(repo.remove_rule, rule_id)
        self._changes += 1
        self._rules.pop(rule_id, None)
        return rec

    async def history(self, *, rule_id: str | None, state: str | None, since: datetime | None,
                      until: datetime | None, limit: int, offset: int) -> tuple[list[AlertEventRecord], int]:
        return await self.db.run(repo.history, rule_id=rule_id, state=state, since=since, until=until,
                                 limit=limit, offset=offset)

    async def refresh(self) -> None:
        """Re-read the rules: replicas sharing a database see each other's changes at the next sample."""
        seen = self._changes
        recs = await self.db.run(repo.list_rules)
        if seen != self._changes:
            return  # a change made here meanwhile: the cache is newer than what was read
        self._rules = {rec.id: self._rules[rec.id] if rec.id in self._rules and self._rules[rec.id].record == rec
                       else _rule(rec) for rec in recs}
