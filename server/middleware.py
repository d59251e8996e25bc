"""Pure ASGI middleware: request body caps enforced while the body streams, and the
count of open connections that /health reports."""
from __future__ import annotations

from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response


class BodyLimitMiddleware:
    """413 for bodies over the cap for their path: at once when Content-Length says so,
    otherwise as soon as the streamed bytes pass it (whatever the app would have answered)."""

    def __init__(self, app: ASGIApp, limit_for_path: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for_path = limit_for_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.limit_for_path(path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await self._reject(scope, send, limit)

        received = 0
        exceeded = False
        started = False

        async def capped_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    # Stop the parser: what remains of the body is never read.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's own answer to the cut body is replaced by our 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._reject(scope, send, limit)

    @staticmethod
    async def _reject(scope: Scope, send: Send, limit: int) -> None:
        response = error_response(scope["path"], 413, "PAYLOAD_TOO_LARGE",
                                  f"request body is larger than {limit // (1024 * 1024)} MB",
                                  headers={"Connection": "close"})
        await response(scope, _drain_receive, send)


async def _drain_receive() -> Message:
    return {"type": "http.disconnect"}


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class ConnectionStats:
    active: int = 0


class ConnectionCounter:
    """Counts HTTP requests and WebSockets in progress into a shared ConnectionStats."""

    def __init__(self, app: ASGIApp, stats: ConnectionStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.stats.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.stats.active -= 1
