"""Rate limits: requests and images per minute, per API key (per client address without auth).

The ``limits`` library holds the counters (sliding-window counter strategy: two integers per
client and limit, expired 2 minutes after the client's last hit), in this process's memory or,
with ``rate_limit.storage_url: redis://...``, in a Redis server all replicas share, so a client's
limit holds across them (core/limit_storage.py; when Redis is down requests fail open).

Requests are counted by ``RateLimitMiddleware`` before the app runs, WebSocket handshakes
included. Images are counted after the body is parsed, by the ``charge_images`` dependency
on the upload routes: the multipart file parts of ``/ocr``, ``/ocr/annotate``, ``/chat`` and
``/batch/ocr`` (read from Starlette's cached form, not parsed again) and the ``image_url``
parts of OpenAI chat messages (from FastAPI's cached JSON). A request over the image limit
therefore has been received in full before its 429.

Every limited response carries ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset`` (epoch
seconds, as seed 002 shows) for the request limit, or for the image limit when only that one
is set; with an image limit the ``X-RateLimit-*-Images`` trio is added. A 429 carries
``Retry-After`` in seconds. ``/health``, ``/healthz`` and ``/readyz`` are never limited.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from fastapi import Request
from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.datastructures import UploadFile
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.config import RateLimitSettings
from core.limit_storage import FailOpen, open_storage
from core.errors import RateLimited
from server.auth import KEY_ID, PROBE_PATHS, deny_websocket
from server.errors import error_response

log = logging.getLogger("chatvlm.ratelimit")

QUOTA = "chatvlm.quota"  # ASGI scope key: the request's Quota, for the image dependency and the headers


@dataclass
class Window:
    limit: int
    remaining: int
    reset: float  # epoch seconds

    def headers(self, suffix: str = "") -> list[tuple[bytes, bytes]]:
        return [(f"x-ratelimit-limit{suffix}".encode(), str(self.limit).encode()),
                (f"x-ratelimit-remaining{suffix}".encode(), str(self.remaining).encode()),
                (f"x-ratelimit-reset{suffix}".encode(), str(math.ceil(self.reset)).encode())]

    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset - time.time()))


class RateLimiter:
    """Counters for every client. ``period_s`` is a minute in service; tests shorten it."""

    def __init__(self, settings: RateLimitSettings, period_s: int = 60) -> None:
        self.settings = settings
        self.storage = open_storage(settings.storage_url)
        self._outage = FailOpen("rate limits")
        self._strategy = SlidingWindowCounterRateLimiter(self.storage)
        rpm, ipm = settings.requests_per_minute, settings.images_per_minute
        self.requests = RateLimitItemPerSecond(rpm, period_s) if rpm else None
        self.images = RateLimitItemPerSecond(ipm, period_s) if ipm else None
        # Two sliding-window keys per client and limit.
        self._max_keys = settings.max_tracked_clients * 2 * (bool(rpm) + bool(ipm))

    def tracked_keys(self) -> int:
        return len(self.storage.storage) if isinstance(self.storage, MemoryStorage) else 0

    def _bound_memory(self) -> None:
        # Expired keys are dropped by the storage itself; this only bites when more clients
        # than the cap are active within two periods. Fail open rather than refuse newcomers.
        # (Redis bounds itself: keys expire there, and its maxmemory policy is the operator's.)
        if isinstance(self.storage, MemoryStorage) and len(self.storage.storage) >= self._max_keys:
            log.warning("rate limiter tracks more than %d clients: all counters restart",
                        self.settings.max_tracked_clients)
            self.storage.reset()

    def _take(self, item, identity: str, cost: int) -> tuple[bool, Window | None]:
        try:
            ok = self._strategy.hit(item, identity, cost=cost) if cost else True
            stats = self._strategy.get_window_stats(item, identity)
        except StorageError as exc:  # Redis is down: fail open, without limit headers
            self._outage.warn(exc)
            return True, None
        return ok, Window(item.amount, stats.remaining, stats.reset_time)

    def hit_request(self, identity: str) -> tuple[bool, Window | None]:
        if self.requests is None:
            return True, None
        self._bound_memory()
        return self._take(self.requests, identity, 1)

    def image_window(self, identity: str) -> Window | None:
        if self.images is None:
            return None
        try:
            stats = self._strategy.get_window_stats(self.images, identity)
        except StorageError as exc:
            self._outage.warn(exc)
            return None
        return Window(self.images.amount, stats.remaining, stats.reset_time)

    def hit_images(self, identity: str, count: int) -> tuple[bool, Window | None]:
        if self.images is None:
            return True, None
        self._bound_memory()
        return self._take(self.images, identity, count)


class Quota:
    """One request's view of its limits: the windows its response headers report."""

    def __init__(self, limiter: RateLimiter, identity: str) -> None:
        self.limiter = limiter
        self.identity = identity
        self.requests: Window | None = None
        self.images: Window | None = None

    def charge_images(self, count: int) -> None:
        ok, self.images = self.limiter.hit_images(self.identity, count)
        if not ok:
            raise RateLimited(f"image rate limit reached ({self.images.limit} images per minute)",
                              code="RATE_LIMITED", headers={"Retry-After": str(self.images.retry_after())})

    def headers(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        main = self.requests or self.images
        if main is not None:
            out += main.headers()
        images = self.images or self.limiter.image_window(self.identity)
        if images is not None:
            out += images.headers("-images")
        return out


def client_identity(scope: Scope) -> str:
    key_id = scope.get(KEY_ID)
    if key_id:
        return "key:" + key_id
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


class RateLimitMiddleware:
    """Counts requests per client, answers 429 past the limit, and adds the limit headers."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or get_route_path(scope) in PROBE_PATHS:
            return await self.app(scope, receive, send)
        quota = Quota(self.limiter, client_identity(scope))
        scope[QUOTA] = quota
        ok, quota.requests = self.limiter.hit_request(quota.identity)

        async def send_with_headers(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                ours = quota.headers()
                names = {name for name, _ in ours}
                message = {**message, "headers": [h for h in message.get("headers", []) if h[0].lower() not in names]
                           + ours}
            await send(message)

        if ok:
            return await self.app(scope, receive, send_with_headers)
        window = quota.requests
        response = error_response(scope["path"], 429, "RATE_LIMITED",
                                  f"rate limit reached ({window.limit} requests per minute)",
                                  headers={"Retry-After": str(window.retry_after())})
        if scope["type"] == "http":
            return await response(scope, receive, send_with_headers)
        await deny_websocket(scope, send_with_headers, response)


async def count_images(request: Request) -> int:
    """Images in a parsed request: multipart file parts, or image_url parts of chat messages."""
    content_type = request.headers.get("content-type", "").lower()
    if request.method != "POST":
        return 0
    if content_type.startswith("multipart/form-data"):
        form = await request.form()  # Starlette's cached parse of the body FastAPI already read
        return sum(isinstance(v, UploadFile) for _, v in form.multi_items())
    if content_type.startswith("application/json") and request.url.path == "/v1/chat/completions":
        try:
            body = await request.json()  # cached by FastAPI's own parse
        except ValueError:
            return 0
        messages = body.get("messages") if isinstance(body, dict) else None
        count = 0
        for message in messages if isinstance(messages, list) else ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                count += sum(isinstance(p, dict) and p.get("type") == "image_url" for p in content)
        return count
    return 0


async def charge_images(request: Request) -> None:
    """Route dependency: charge the request's images to its client's image limit (429 past it)."""
    quota: Quota | None = request.scope.get(QUOTA)
    if quota is None or quota.limiter.images is None:
        return
    count = await count_images(request)
    if count:
        quota.charge_images(count)
