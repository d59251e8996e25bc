"""Failed-login throttling per user name and per client address (``limits``, moving window), in
memory or in the Redis server that replicas share (``rate_limit.storage_url``)."""
from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.errors import StorageError
from limits.strategies import MovingWindowRateLimiter

from core.errors import RateLimited
from core.limit_storage import FailOpen, open_storage


class LoginThrottle:
    def __init__(self, per_user: int, per_address: int, storage_url: str | None = None) -> None:
        self._limiter = MovingWindowRateLimiter(open_storage(storage_url))
        self._outage = FailOpen("login throttle")
        self._user = RateLimitItemPerMinute(per_user)
        self._address = RateLimitItemPerMinute(per_address)

    def check(self, username: str, address: str) -> None:
        """429 with Retry-After while either window is spent (before the password is even checked)."""
        for item, key in ((self._user, f"user:{username.lower()}"), (self._address, f"addr:{address}")):
            try:
                if self._limiter.test(item, key):
                    continue
                reset = self._limiter.get_window_stats(item, key).reset_time
            except StorageError as exc:  # Redis is down: passwords are still checked, unthrottled
                self._outage.warn(exc)
                return
            wait = max(1, math.ceil(reset - time.time()))
            raise RateLimited("too many failed logins; retry later", code="RATE_LIMITED",
                              headers={"Retry-After": str(wait)})

    def failed(self, username: str, address: str) -> None:
        try:
            self._limiter.hit(self._user, f"user:{username.lower()}")
            self._limiter.hit(self._address, f"addr:{address}")
        except StorageError as exc:
            self._outage.warn(exc)

    def succeeded(self, username: str) -> None:
        try:
            self._limiter.clear(self._user, f"user:{username.lower()}")
        except StorageError as exc:
            self._outage.warn(exc)
