"""Where the ``limits`` counters live: this process's memory, or a Redis server that every replica
shares (``rate_limit.storage_url: redis://host:6379/0``), for the request and image limits and
the failed-login throttle alike.

Redis calls are synchronous and made on the event loop: on a loopback or LAN link one costs
about 0.1-0.3 ms, less than a hop to a thread. The socket timeouts bound a stall when Redis
hangs, and callers fail open (the request goes through, a warning is logged) when it is down:
a lost Redis must not take the API down with it.
"""
from __future__ import annotations

import logging
import time

from limits.storage import MemoryStorage, RedisStorage, Storage

log = logging.getLogger("chatvlm.limits")
REDIS_TIMEOUT_S = 0.5
_WARN_EVERY_S = 30.0


def open_storage(url: str | None) -> Storage:
    """A fresh in-memory storage, or a client of the Redis server at ``url`` (errors wrapped as
    ``limits.errors.StorageError``)."""
    if not url:
        return MemoryStorage()
    return RedisStorage(url, wrap_exceptions=True, socket_timeout=REDIS_TIMEOUT_S,
                        socket_connect_timeout=REDIS_TIMEOUT_S, health_check_interval=30)


class FailOpen:
    """Logs a storage outage at most every 30 s (not once per request)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._last = 0.0

    def warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last > _WARN_EVERY_S:
            self._last = now
            log.warning("%s: the shared limit storage failed (%s); requests go through unlimited meanwhile",
                        self.what, type(exc).__name__)
