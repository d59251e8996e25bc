"""``/ws/monitor``: model status changes, samples and alerts, live (seed 004's WebSocket API).

The token comes from ``Authorization: Bearer`` or ``?token=`` (browsers cannot set headers on a
WebSocket); without a valid one the handshake is refused with 401. The client subscribes with
``{"action": "subscribe", "events": ["model_status", "gpu_metrics", "system_alerts"]}`` (and
``unsubscribe``); frames are ``{"type", "data"}``. Each connection reads the event hub through a
bounded queue: a client that does not keep up loses the oldest events and is sent a ``lagged``
frame saying how many, and never slows the server or the other clients. An idle connection gets a
``ping`` frame every ``management.ws_ping_s`` (uvicorn also sends protocol pings).
"""
from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from management.events import ALERT, MODEL_STATUS, SAMPLE, Event, Sample, Subscription
from management.identity import Principal
from server.auth import presented_keys
from server.errors import error_response

log = logging.getLogger("chatvlm.management")
router = APIRouter(tags=["management: monitor"])

# What a client subscribes to -> the hub's event kind.
TOPICS = {"model_status": MODEL_STATUS, "gpu_metrics": SAMPLE, "system_alerts": ALERT}
_MB = 2 ** 20


def _now() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _principal(websocket: WebSocket) -> Principal | None:
    mgmt = websocket.app.state.services.management
    keys = websocket.app.state.keys
    for token in presented_keys(websocket.scope):
        principal = mgmt.identity.verify(token)
        if principal is not None:
            return principal
        if keys and keys.match(token):
            return Principal("api-key", "admin", "api_key")
    return None


def frames(event: Event) -> list[dict[str, Any]]:
    """The frames one hub event becomes."""
    data = event.data
    if event.kind == MODEL_STATUS:
        return [{"type": "model_status_update", "data": {**data, "timestamp": _now()}}]
    if event.kind == ALERT:
        keep = ("alert_id", "severity", "message", "timestamp", "state", "rule_id", "rule_name", "condition",
                "subject", "metric", "value", "fired_at")
        return [{"type": "system_alert", "data": {k: data.get(k) for k in keep}}]
    if event.kind == SAMPLE and isinstance(data, Sample):
        ts = _iso(data.ts)
        out = [{"type": "gpu_metrics_update", "data": {
            "gpu_id": g.index, "name": g.name, "utilization": g.utilization,
            "memory_used": round(g.memory_used_bytes / _MB), "memory_total": round(g.memory_total_bytes / _MB),
            "memory_percent": round(g.memory_percent, 2), "temperature": g.temperature,
            "power_usage": g.power_watts, "timestamp": ts}} for g in data.gpus]
        s = data.system
        out.append({"type": "system_metrics_update", "data": {
            "cpu_percent": s.cpu_percent, "memory_percent": s.memory_percent, "disk_percent": s.disk_percent,
            "memory_used": round(s.memory_used_bytes / _MB), "memory_total": round(s.memory_total_bytes / _MB),
            "gpu_count": len(data.gpus), "timestamp": ts}})
        return out
    return []


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "data": {"code": code, "message": message}}


class MonitorConnection:
    def __init__(self, websocket: WebSocket, sub: Subscription, ping_s: float) -> None:
        self.ws = websocket
        self.sub = sub
        self.ping_s = ping_s
        self.topics: set[str] = set()
        self._send_lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))

    async def writer(self) -> None:
        while True:
            try:
                event = await asyncio.wait_for(self.sub.get(), self.ping_s)
            except asyncio.TimeoutError:
                await self.send({"type": "ping", "data": {"timestamp": _now()}})
                continue
            dropped = self.sub.take_dropped()
            if dropped:
                await self.send({"type": "lagged", "data": {"dropped": dropped, "timestamp": _now(),
                                                            "message": f"{dropped} event(s) were dropped: "
                                                                       "this client reads too slowly"}})
            for frame in frames(event):
                await self.send(frame)

    async def reader(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None and message.get("bytes") is not None:
                try:
                    raw = message["bytes"].decode("utf-8")
                except UnicodeDecodeError:
                    raw = None
            await self.handle(raw)

    async def handle(self, raw: str | None) -> None:
        try:
            msg = json.loads(raw) if raw is not None else None
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            return await self.send(_error("INVALID_MESSAGE", "send a JSON object such as "
                                          '{"action": "subscribe", "events": ["model_status"]}'))
        action = msg.get("action")
        if action == "ping":
            return await self.send({"type": "pong", "data": {"timestamp": _now()}})
        if action not in ("subscribe", "unsubscribe"):
            return await self.send(_error("UNKNOWN_ACTION", f"unknown action {str(action)[:40]!r}: "
                                          "subscribe, unsubscribe or ping"))
        events = msg.get("events", list(TOPICS) if action == "unsubscribe" else None)
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            return await self.send(_error("INVALID_MESSAGE", "events must be a non-empty list of: "
                                          + ", ".join(TOPICS)))
        unknown = [e for e in events if e not in TOPICS]
        if unknown:
            return await self.send(_error("UNKNOWN_EVENT", f"unknown event {unknown[0][:40]!r}: one of "
                                          + ", ".join(TOPICS)))
        if action == "subscribe":
            self.topics |= set(events)
        else:
            self.topics -= set(events)
        self.sub.set_kinds(TOPICS[t] for t in self.topics)
        await self.send({"type": f"{action}d", "data": {"events": sorted(self.topics)}})


@router.websocket("/ws/monitor")
async def monitor(websocket: WebSocket) -> None:
    """Live model status, system and GPU figures, and alerts."""
    if _principal(websocket) is None:
        response = error_response("/ws/monitor", 401, "UNAUTHORIZED", "a valid token is required: "
                                  "'Authorization: Bearer <token>' or ?token=<token> (POST /api/auth/token)",
                                  headers={"WWW-Authenticate": "Bearer"})
        try:
            await websocket.send_denial_response(response)
        except RuntimeError:  # the server cannot answer a handshake with HTTP: close before accepting
            await websocket.close(code=1008)
        return
    services = websocket.app.state.services
    cfg = services.settings.management
    await websocket.accept()
    sub = services.management.events.subscribe((), maxsize=cfg.ws_queue)
    conn = MonitorConnection(websocket, sub, cfg.ws_ping_s)
    tasks = [asyncio.create_task(conn.reader()), asyncio.create_task(conn.writer())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if not t.cancelled() and t.exception() is not None and not isinstance(
                    t.exception(), (WebSocketDisconnect, RuntimeError, OSError)):
                log.error("/ws/monitor connection failed", exc_info=t.exception())
    finally:
        sub.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
