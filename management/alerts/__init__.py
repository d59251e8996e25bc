"""Alerts (issue 11, notifications): rules with a small condition grammar, their evaluation on
every sample, and the webhook and e-mail channels. ``Alerts`` wires the parts for the management
service and is started and stopped by its lifespan."""
from __future__ import annotations

from collections.abc import Callable

from core.config import AlertThresholds, Settings
from management.alerts.channels import Notifier
from management.alerts.evaluator import AlertEvaluator
from management.alerts.rules import AlertRules
from management.events import EventHub
from store.db import Database


class Alerts:
    def __init__(self, settings: Settings, hub: EventHub, thresholds: Callable[[], AlertThresholds] | None = None) -> None:
        cfg = settings.alerts
        self.rules = AlertRules(cfg.max_rules)
        self.notifier = Notifier(cfg)
        self.evaluator = AlertEvaluator(hub, self.rules, self.notifier, cfg,
                                        thresholds or (lambda: settings.alerts.thresholds))

    def load(self, db: Database) -> None:
        """Read the rules (blocking; at start-up, after the migrations)."""
        self.rules.load(db)

    def start(self, db: Database) -> None:
        self.evaluator.start(db)

    async def stop(self) -> None:
        await self.evaluator.stop()
