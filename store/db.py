"""The database: engine, sessions and migrations (Alembic, run at start-up; never ``create_all``).

SQLite is the default, at ``<data_dir>/chatvlm.db`` in WAL mode with ``synchronous=FULL``: a
committed change survives a ``kill -9`` (and a power cut). PostgreSQL is selected by
``database.url`` (``postgresql+psycopg://...``); replicas sharing it migrate one at a time under
an advisory lock.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("chatvlm.store")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x43564D4C  # any constant shared by all replicas: "CVML"


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'chatvlm.db').resolve()}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _json_default(value):
    """Numbers and arrays from numpy/OpenCV (a table cell's box, a score) as plain JSON."""
    if callable(getattr(value, "tolist", None)):  # numpy arrays and scalars alike
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_dumps(value) -> str:
    return json.dumps(value, default=_json_default)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.backend == "sqlite":
            path = Path(url.split(":///", 1)[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10},
                                                json_serializer=_json_dumps)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                                        json_serializer=_json_dumps)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest revision (blocking: call it off the event loop)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if self.backend == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")  # independent branches (e.g. monitoring, alerts, jobs) all apply
        log.info("database schema is current (%s)", self.backend)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self._sessions.begin() as session:
            yield session

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(session, *args, **kwargs)`` in one transaction."""
        with self.session() as s:
            return fn(s, *args, **kwargs)

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(session, ...)`` in one transaction on a worker thread: the event loop never waits on I/O."""
        return await asyncio.to_thread(self.call, fn, *args, **kwargs)

    def dispose(self) -> None:
        self.engine.dispose()
