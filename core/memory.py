"""Giving freed heap memory back to the operating system.

glibc keeps freed memory in its arenas (one per thread that allocated, up to 8 per core):
after a burst of concurrent image decodes and tensor work, the process's RSS stays at its
high-water mark although the memory is free. ``malloc_trim(0)`` returns the free pages of
every arena. ``IdleTrimmer`` calls it once the server has been idle for a moment after being
busy, so RSS comes back down between bursts instead of ratcheting up. Elsewhere than glibc
these are no-ops.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
from typing import Callable

log = logging.getLogger("chatvlm.memory")

_M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> bool:
    """Return free heap pages to the OS. True when something was released."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def limit_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas (fewer arenas: less memory stranded between threads).
    Call at start-up, before worker threads allocate."""
    return bool(_LIBC.mallopt(_M_ARENA_MAX, n)) if _LIBC is not None and n > 0 else False


class IdleTrimmer:
    """Trims the heap once per busy period, ``idle_s`` seconds after the last request ended.

    ``busy()`` says whether anything is in progress (requests, streams, queued generations)."""

    def __init__(self, busy: Callable[[], bool], idle_s: float, poll_s: float = 0.5) -> None:
        self.busy = busy
        self.idle_s = idle_s
        self.poll_s = min(poll_s, idle_s) if idle_s > 0 else poll_s
        self.trims = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.idle_s > 0 and _LIBC is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="idle-heap-trim")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        dirty = False  # was there work since the last trim?
        quiet_since: float | None = None
        while True:
            await asyncio.sleep(self.poll_s)
            if self.busy():
                dirty, quiet_since = True, None
                continue
            now = loop.time()
            quiet_since = quiet_since if quiet_since is not None else now
            if dirty and now - quiet_since >= self.idle_s:
                dirty = False
                try:
                    await asyncio.to_thread(trim_heap)
                    self.trims += 1
                except Exception:  # noqa: BLE001 - trimming is best effort, never fatal
                    log.exception("heap trim failed")
