"""Per-model log lines: lifecycle events, warnings, errors and request summaries.

Bounded per model (``management.log_lines``) in memory and in the store; a restart reads the
newest lines back. Writes are batched by a background task owned by the app's lifespan, so a
request never waits on the database to log. Lines never hold prompt text or keys: callers pass
only what is safe (route, status, token counts, durations, error codes).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from store import logs as logs_repo
from store.db import Database
from store.tables import utcnow

log = logging.getLogger("chatvlm.management")

FLUSH_S = 0.25
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


@dataclass(frozen=True)
class LogLine:
    timestamp: datetime
    level: str
    message: str


class ModelLogBook:
    def __init__(self, max_lines: int) -> None:
        self.max_lines = max_lines
        self._lines: dict[str, deque[LogLine]] = {}
        self._followers: dict[str, set[asyncio.Queue]] = {}
        self._pending: list[tuple[str, datetime, str, str]] = []
        self._written: dict[str, int] = {}  # lines written per model since its last trim
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.db: Database | None = None

    def load(self, db: Database) -> None:
        """Read the newest lines of every model back (blocking: run off the event loop)."""
        self.db = db
        with db.session() as s:
            for name in logs_repo.model_names(s):
                self._lines[name] = deque((LogLine(r.ts, r.level, r.message)
                                           for r in logs_repo.recent(s, name, self.max_lines)), maxlen=self.max_lines)

    def start(self) -> None:
        self._task = asyncio.create_task(self._flusher(), name="model-log-flusher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._flush)

    # ---- writing ---------------------------------------------------------------------------
    def write(self, model: str, level: str, message: str) -> None:
        line = LogLine(utcnow(), level, message)
        self._lines.setdefault(model, deque(maxlen=self.max_lines)).append(line)
        for queue in self._followers.get(model, ()):
            if not queue.full():  # a follower that stopped reading loses lines rather than growing memory
                queue.put_nowait(line)
        self._pending.append((model, line.timestamp, level, message))
        log.log(_LEVELS.get(level, logging.INFO), "[%s] %s", model, message)
        self._wake.set()

    def info(self, model: str, message: str) -> None:
        self.write(model, "INFO", message)

    def warning(self, model: str, message: str) -> None:
        self.write(model, "WARNING", message)

    def error(self, model: str, message: str) -> None:
        self.write(model, "ERROR", message)

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_S)  # gather a burst into one transaction
            try:
                await asyncio.to_thread(self._flush)
            except Exception:  # noqa: BLE001 - a database hiccup must not end logging; lines stay in memory
                log.exception("writing model logs to the database failed")

    def _flush(self) -> None:
        if self.db is None or not self._pending:
            return
        batch, self._pending = self._pending, []
        with self.db.session() as s:
            logs_repo.add_many(s, batch)
            for name, *_ in batch:
                self._written[name] = self._written.get(name, 0) + 1
            for name, count in list(self._written.items()):
                if count >= max(10, self.max_lines // 10):  # trim now and then, not on every line
                    logs_repo.trim(s, name, self.max_lines)
                    self._written[name] = 0

    def forget(self, model: str) -> None:
        """Drop a deleted model's lines (blocking: run off the event loop)."""
        self._lines.pop(model, None)
        self._pending = [p for p in self._pending if p[0] != model]
        if self.db is not None:
            with self.db.session() as s:
                logs_repo.remove_model(s, model)

    # ---- reading ---------------------------------------------------------------------------
    def recent(self, model: str, lines: int) -> list[LogLine]:
        buf = self._lines.get(model)
        if not buf:
            return []
        return list(buf)[-lines:] if lines > 0 else []

    def follow(self, model: str) -> "Follower":
        """Subscribe now to a model's new lines (so none falls between a read of the recent ones and
        the first new one); iterate the follower, and close it when done."""
        return Follower(self, model)


class Follower:
    def __init__(self, book: ModelLogBook, model: str) -> None:
        self._book, self._model = book, model
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        book._followers.setdefault(model, set()).add(self._queue)

    def __aiter__(self) -> "Follower":
        return self

    async def __anext__(self) -> LogLine:
        return await self._queue.get()

    def close(self) -> None:
        self._book._followers.get(self._model, set()).discard(self._queue)
