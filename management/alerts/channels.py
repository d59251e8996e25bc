"""Notification channels: a JSON POST to each configured webhook, and an e-mail through SMTP.

A channel never raises: each delivery returns what happened ({"ok", "attempts", "error", ...}),
which the evaluator logs and records in the alert history. Webhook hosts must be on
``alerts.webhook_allowed_hosts`` (checked at start-up and again here); redirects are not
followed; each attempt has a timeout, and failures that may pass (connection errors, timeouts,
429 and 5xx) are retried ``webhook_retries`` times with doubling backoff. E-mail goes through
``smtplib`` on a worker thread, with a timeout and optional STARTTLS.
"""
from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import ssl
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx

from core.config import AlertsSettings, SmtpSettings

log = logging.getLogger("chatvlm.alerts")

CHANNELS = ("webhook", "email")
USER_AGENT = "chatvlm-alerts/1"


def _safe_url(url: str) -> str:
    """The URL without its query, fragment or credentials: fit for logs and the history."""
    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}{f':{p.port}' if p.port else ''}{p.path}"


class Notifier:
    def __init__(self, settings: AlertsSettings) -> None:
        self.settings = settings

    async def send(self, channels: list[str], payload: dict[str, Any]) -> dict[str, Any]:
        """Deliver the payload on each channel at once; what happened, per channel."""
        wanted = [c for c in CHANNELS if c in channels]
        results = await asyncio.gather(*(self._one(c, payload) for c in wanted))
        return dict(zip(wanted, results))

    async def _one(self, channel: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            if channel == "webhook":
                return await self.webhooks(payload)
            return await self.email(payload)
        except Exception as exc:  # noqa: BLE001 - a channel's bug must not stop the evaluator
            log.exception("alert channel %s failed", channel)
            return {"ok": False, "error": f"internal error ({type(exc).__name__})"}

    # ---- webhook -------------------------------------------------------------------------------
    async def webhooks(self, payload: dict[str, Any]) -> dict[str, Any]:
        cfg = self.settings
        if not cfg.webhooks:
            return {"ok": False, "error": "no webhook is configured (alerts.webhooks)"}
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        async with httpx.AsyncClient(timeout=cfg.webhook_timeout_s, follow_redirects=False, trust_env=False,
                                     headers={"Content-Type": "application/json", "User-Agent": USER_AGENT}) as client:
            targets = await asyncio.gather(*(self._post(client, url, body) for url in cfg.webhooks))
        return {"ok": all(t["ok"] for t in targets), "targets": targets}

    async def _post(self, client: httpx.AsyncClient, url: str, body: bytes) -> dict[str, Any]:
        cfg = self.settings
        shown = _safe_url(url)
        host = (urlsplit(url).hostname or "").lower()
        if host not in {h.lower() for h in cfg.webhook_allowed_hosts}:
            return {"url": shown, "ok": False, "attempts": 0, "error": "host not in alerts.webhook_allowed_hosts"}
        error, status = "", None
        for attempt in range(1, cfg.webhook_retries + 2):
            try:
                r = await client.post(url, content=body)
                status = r.status_code
                if 200 <= status < 300:
                    return {"url": shown, "ok": True, "attempts": attempt, "status": status}
                error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
                if status != 429 and status < 500:
                    break  # the receiver refused it: the same request will fail again
            except httpx.HTTPError as exc:
                status, error = None, type(exc).__name__
            if attempt <= cfg.webhook_retries:
                await asyncio.sleep(cfg.webhook_backoff_s * 2 ** (attempt - 1))
        log.warning("alert webhook %s failed after %d attempt(s): %s", shown, attempt, error)
        return {"url": shown, "ok": False, "attempts": attempt, "status": status, "error": error}

    # ---- e-mail --------------------------------------------------------------------------------
    async def email(self, payload: dict[str, Any]) -> dict[str, Any]:
        smtp = self.settings.smtp
        if smtp is None:
            return {"ok": False, "error": "no mail server is configured (alerts.smtp)"}
        msg = build_message(smtp, payload)
        try:
            await asyncio.to_thread(_deliver, smtp, msg)
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            error = type(exc).__name__
            if isinstance(exc, smtplib.SMTPResponseException):
                error += f" {exc.smtp_code}"
            log.warning("alert e-mail through %s:%d failed: %s", smtp.host, smtp.port, error)
            return {"ok": False, "error": error}
        return {"ok": True, "recipients": len(smtp.to)}


def build_message(smtp: SmtpSettings, payload: dict[str, Any]) -> EmailMessage:
    msg = EmailMessage()
    state = payload["state"]
    msg["Subject"] = f"[chatvlm] {payload['severity'].upper()} {state}: {payload['rule_name']}"
    msg["From"] = smtp.from_
    msg["To"] = ", ".join(smtp.to)
    msg["X-Chatvlm-Alert-Id"] = payload["alert_id"]
    msg.set_content(f"{payload['message']}\n\n" + json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return msg


def _deliver(smtp: SmtpSettings, msg: EmailMessage) -> None:
    """Blocking: run on a worker thread."""
    with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s) as client:
        if smtp.starttls:
            client.starttls(context=ssl.create_default_context(
                cafile=str(smtp.ca_file) if smtp.ca_file is not None else None))
        if smtp.username:
            client.login(smtp.username, smtp.password or "")
        client.send_message(msg)
