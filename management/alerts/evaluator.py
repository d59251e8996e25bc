"""The alert evaluator: a lifespan task that evaluates every enabled rule, and the built-in
threshold rules, on every SAMPLE the hub carries.

A rule is evaluated once per subject its metric has: the machine (``system``), each GPU
(``gpu:<index>``) or each model (``model:<name>``). A condition with ``for <duration>`` must hold
on consecutive samples for that long before it fires. Firing records an event, publishes an ALERT
on the hub (``/ws/monitor`` sends it as ``system_alert``) and notifies the rule's channels once; a
rule that keeps firing is notified again only after ``alerts.cooldown_s``. When the condition
clears (or the rule is changed, disabled or deleted, or its GPU or model is gone) the alert
resolves: recorded, published and notified. Notifications run as their own tasks: a slow or
failing channel is logged and recorded in the history, and never holds up the next sample.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from core.config import AlertsSettings, AlertThresholds
from management.alerts.channels import Notifier
from management.alerts.condition import Condition
from management.alerts.rules import AlertRules, Rule
from management.events import ALERT, SAMPLE, EventHub, Sample
from store import alerts as repo
from store.db import Database

PRUNE_EVERY_S = 3600.0  # the alert history is pruned at most this often

log = logging.getLogger("chatvlm.alerts")

# The built-in threshold rules: AlertThresholds field -> metric (each fires above its value).
BUILTIN = {
    "gpu_utilization_high": "gpu_utilization", "gpu_temperature_high": "gpu_temperature",
    "gpu_memory_percent_high": "gpu_memory_percent", "cpu_percent_high": "cpu_percent",
    "memory_percent_high": "memory_percent", "disk_percent_high": "disk_percent",
    "response_time_high": "response_time", "error_rate_high": "error_rate", "queue_depth_high": "queue_depth",
}


def builtin_rules(thresholds: AlertThresholds, channels: list[str]) -> list[Rule]:
    rules = []
    for field, metric in BUILTIN.items():
        value = float(getattr(thresholds, field))
        cond = Condition(metric, ">", value)
        rules.append(Rule(f"builtin:{field}", f"built-in: {field}", f"{metric} > {value:g}", cond, "warning", True,
                          tuple(channels), builtin=True))
    return rules


def values(metric: str, sample: Sample) -> Iterator[tuple[str, float | None]]:
    """(subject, value) pairs of a metric in a sample; None: no data this time (no requests, no sensor)."""
    if metric in ("cpu_percent", "memory_percent", "disk_percent"):
        yield "system", float(getattr(sample.system, metric))
    elif metric.startswith("gpu_"):
        for g in sample.gpus:
            v = {"gpu_utilization": g.utilization, "gpu_temperature": g.temperature,
                 "gpu_memory_percent": g.memory_percent}[metric]
            yield f"gpu:{g.index}", None if v is None else float(v)
    else:
        for name, m in sample.models.items():
            if metric == "model_error":
                v = 1.0 if m.status == "error" else 0.0
            elif metric == "response_time":
                v = m.avg_latency_s
            elif metric == "error_rate":
                v = m.error_rate if m.requests else None
            else:
                v = float(m.queue_depth)
            yield f"model:{name}", v


@dataclass
class Active:
    alert_id: str
    rule: Rule
    subject: str
    value: float
    fired_at: datetime
    notified_at: datetime


class AlertEvaluator:
    def __init__(self, hub: EventHub, rules: AlertRules, notifier: Notifier, settings: AlertsSettings,
                 thresholds: Callable[[], AlertThresholds]) -> None:
        self.hub = hub
        self.rules = rules
        self.notifier = notifier
        self.settings = settings
        self.thresholds = thresholds  # read at every sample: live configuration takes effect at once
        self.db: Database | None = None
        self.active: dict[tuple[str, str], Active] = {}
        self._since: dict[tuple[str, str], datetime] = {}   # when a condition started to hold
        self._task: asyncio.Task | None = None
        self._notifying: set[asyncio.Task] = set()
        self.samples = 0
        self._batch: list[tuple[dict, list[str], datetime]] = []
        self._pruned_at: datetime | None = None

    # ---- lifespan ------------------------------------------------------------------------------
    def start(self, db: Database) -> None:
        self.db = db
        sub = self.hub.subscribe([SAMPLE], maxsize=8)
        self._task = asyncio.create_task(self._run(sub), name="alert-evaluator")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # Notifications already under way get a moment to finish, then are cancelled.
        if self._notifying:
            _, pending = await asyncio.wait(self._notifying, timeout=2)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for the notifications under way (tests, and a clean stop)."""
        while self._notifying:
            await asyncio.gather(*list(self._notifying), return_exceptions=True)

    async def _run(self, sub) -> None:
        try:
            while True:
                event = await sub.get()
                try:
                    await self.rules.refresh()
                    await self.evaluate(event.data)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - one bad sample (or a store hiccup) must not stop alerting
                    log.exception("alert evaluation failed")
        finally:
            sub.close()

    # ---- evaluation ----------------------------------------------------------------------------
    def current_rules(self) -> list[Rule]:
        cfg = self.settings
        # Built-in rules notify only the channels that are set up (a user rule naming one that is
        # not gets that failure recorded in the history).
        configured = {"webhook": bool(cfg.webhooks), "email": cfg.smtp is not None}
        channels = [c for c in cfg.builtin_channels if configured[c]]
        return [*builtin_rules(self.thresholds(), channels), *self.rules.enabled()]

    async def evaluate(self, sample: Sample) -> None:
        self.samples += 1
        now = sample.ts
        rules = self.current_rules()
        by_id = {r.id: r for r in rules}
        seen: set[tuple[str, str]] = set()
        for rule in rules:
            for subject, value in values(rule.condition.metric, sample):
                key = (rule.id, subject)
                seen.add(key)
                active = self.active.get(key)
                if active is not None and active.rule.condition_text != rule.condition_text:
                    self._resolve(key, now, "the rule's condition changed")
                    active = None
                if value is None:
                    continue  # no data: nothing changes
                if not rule.condition.holds(value):
                    self._since.pop(key, None)
                    if active is not None:
                        active.value = value
                        self._resolve(key, now, "the condition cleared")
                    continue
                since = self._since.setdefault(key, now)
                if active is not None:
                    active.value, active.rule = value, rule
                    cooldown = self.settings.cooldown_s
                    if cooldown and (now - active.notified_at).total_seconds() >= cooldown:
                        active.notified_at = now
                        self._record(active, "repeat", now, self._message(rule, subject, value))
                elif (now - since).total_seconds() >= rule.condition.for_s:
                    self._fire(rule, subject, value, now)
        for key in [k for k in self.active if k not in seen]:
            gone = key[0] not in by_id
            self._resolve(key, now, "the rule was disabled or deleted" if gone else f"{key[1]} is no longer reported")
        for key in [k for k in self._since if k not in seen]:
            del self._since[key]
        await self._flush()
        if self._pruned_at is None or (now - self._pruned_at).total_seconds() >= PRUNE_EVERY_S:
            self._pruned_at = now
            await self.prune(now)

    async def prune(self, now: datetime) -> int:
        """Drop history older than ``alerts.history_days`` (alerts still firing here keep theirs)."""
        if self.db is None:
            return 0
        keep = {a.alert_id for a in self.active.values()}
        gone = await self.db.run(repo.prune_history, now - timedelta(days=self.settings.history_days), keep)
        if gone:
            log.info("pruned %d alert history events older than %g days", gone, self.settings.history_days)
        return gone

    @staticmethod
    def _message(rule: Rule, subject: str, value: float) -> str:
        where = "" if subject == "system" else f" on {subject}"
        return f"{rule.name}: {rule.condition.metric} is {value:g}{where} ({rule.condition_text})"

    def _fire(self, rule: Rule, subject: str, value: float, now: datetime) -> None:
        active = Active(f"alert-{uuid.uuid4().hex[:16]}", rule, subject, value, now, now)
        self.active[(rule.id, subject)] = active
        self._record(active, "firing", now, self._message(rule, subject, value))

    def _resolve(self, key: tuple[str, str], now: datetime, reason: str) -> None:
        active = self.active.pop(key)
        self._since.pop(key, None)
        where = "" if active.subject == "system" else f" on {active.subject}"
        message = f"resolved: {active.rule.name}{where}: {reason} ({active.rule.condition.metric} {active.value:g})"
        self._record(active, "resolved", now, message)

    def _record(self, active: Active, state: str, now: datetime, message: str) -> None:
        """Queue one transition; ``_flush`` writes the sample's transitions in one transaction."""
        rule = active.rule
        payload = {"alert_id": active.alert_id, "rule_id": rule.id, "rule_name": rule.name,
                   "condition": rule.condition_text, "severity": rule.severity, "state": state,
                   "subject": active.subject, "metric": rule.condition.metric, "value": active.value,
                   "message": message, "fired_at": _iso(active.fired_at), "timestamp": _iso(now)}
        self._batch.append((payload, list(rule.channels), now))

    async def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            ids = await self.db.run(_add_events, [(p, ts) for p, _, ts in batch])
        except Exception:  # noqa: BLE001 - the store failed: still publish and notify, unrecorded
            log.exception("could not record %d alert event(s)", len(batch))
            ids = [None] * len(batch)
        for event_id, (payload, channels, _) in zip(ids, batch):
            state = payload["state"]
            if state != "repeat":  # /ws/monitor sends one system_alert per firing and one per resolution
                self.hub.publish(ALERT, {**payload, "rule": payload["rule_name"]})
            (log.warning if state != "resolved" else log.info)("alert %s: %s", state, payload["message"])
            if channels:
                task = asyncio.create_task(self._notify(event_id, channels, payload),
                                           name=f"notify-{payload['alert_id']}")
                self._notifying.add(task)
                task.add_done_callback(self._notifying.discard)

    async def _notify(self, event_id: int | None, channels: list[str], payload: dict) -> None:
        results = await self.notifier.send(channels, payload)
        for channel, result in results.items():
            if not result.get("ok"):
                log.warning("alert %s: channel %s failed: %s", payload["alert_id"], channel,
                            result.get("error") or [t.get("error") for t in result.get("targets", [])])
        if event_id is None:
            return
        try:
            await self.db.run(repo.set_notifications, event_id, results)
        except Exception:  # noqa: BLE001 - the notification went out; only its record is lost
            log.exception("could not record the notifications of alert %s", payload["alert_id"])


def _add_events(s, events: list[tuple[dict, datetime]]) -> list[int]:
    """One transaction for a sample's transitions."""
    return [repo.add_event(s, alert_id=p["alert_id"], rule_id=p["rule_id"], rule_name=p["rule_name"],
                           condition=p["condition"], severity=p["severity"], state=p["state"], subject=p["subject"],
                           value=p["value"], message=p["message"], ts=ts) for p, ts in events]


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")
