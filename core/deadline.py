"""Request deadlines: one place turns a passed deadline into DeadlineExceeded (504)."""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from core.errors import DeadlineExceeded
from core.types import CancelToken


@asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[CancelToken]:
    """Yield a CancelToken that model code polls; raise DeadlineExceeded when time runs out."""
    token = CancelToken(deadline=time.monotonic() + seconds)
    try:
        async with asyncio.timeout(seconds):
            yield token
    except TimeoutError:
        token.cancel()
        raise DeadlineExceeded(f"the request did not finish within {seconds:g} s") from None
    except asyncio.CancelledError:
        token.cancel()  # the client went away: stop the model work too
        raise
