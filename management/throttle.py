"""Failed-login throttling per user name and per client address (``limits``, moving window)."""
from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from core.errors import RateLimited


class LoginThrottle:
    def __init__(self, per_user: int, per_address: int) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._user = RateLimitItemPerMinute(per_user)
        self._address = RateLimitItemPerMinute(per_address)

    def check(self, username: str, address: str) -> None:
        """429 with Retry-After while either window is spent (before the password is even checked)."""
        for item, key in ((self._user, f"user:{username.lower()}"), (self._address, f"addr:{address}")):
            if not self._limiter.test(item, key):
                reset = self._limiter.get_window_stats(item, key).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                raise RateLimited("too many failed logins; retry later", code="RATE_LIMITED",
                                  headers={"Retry-After": str(wait)})

    def failed(self, username: str, address: str) -> None:
        self._limiter.hit(self._user, f"user:{username.lower()}")
        self._limiter.hit(self._address, f"addr:{address}")

    def succeeded(self, username: str) -> None:
        self._limiter.clear(self._user, f"user:{username.lower()}")
