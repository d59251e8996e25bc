"""Alerts (issue 11, notifications): rules with a small condition grammar, their evaluation on
every sample, and the webhook and e-mail channels. ``Alerts`` wires the parts for the management
service and is started and stopped by its lifespan."""
from __future__ import annotations

from collections.abc import Callable

from core.config import AlertThresholds, Settings
from management.alerts.channels import Notifier
from management.alerts.evaluator import AlertEvaluator
from management.alerts.heartbeat import Heartbeat
from management.alerts.rules import AlertRules
from management.events import EventHub
from store.db import Database


class Alerts:
    def __init__(self, settings: Settings, hub: EventHub, model_statuses: Callable[[], dict[str, str]],
                 thresholds: Callable[[], AlertThresholds] | None = None) -> None:
        cfg = settings.alerts
        self.rules = AlertRules(cfg.max_rules)
        self.notifier = Notifier(cfg)
        self.evaluator = AlertEvaluator(hub, self.rules, self.notifier, cfg,
                                        thresholds or (lambda: settings.alerts.thresholds))
        # Stand-in sample source until the monitoring sampler is merged (see heartbeat.py).
        self.heartbeat = Heartbeat(hub, settings.monitoring.gpu_monitor_interval, settings.data_dir, model_statuses)

    def load(self, db: Database) -> None:
        """Read the rules (blocking; at start-up, after the migrations)."""
        self.rules.load(db)

    def start(self, db: Database) -> None:
        self.evaluator.start(db)
        self.heartbeat.start()

    async def stop(self) -> None:
        await self.heartbeat.stop()
        await self.evaluator.stop()
