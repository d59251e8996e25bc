"""The URLs of one remote engine: health probes on an interval, a circuit breaker per URL, and the
choice of the URL a request goes to (healthy ones only, least loaded first)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger("chatvlm.remote")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Backend:
    """One URL: what the probes saw, its circuit, and the requests it holds now."""

    url: str
    healthy: bool = True      # optimistic until the first probe answers
    circuit: str = CLOSED
    failures: int = 0         # failures in a row (requests and probes)
    probe_failures: int = 0   # failed probes in a row
    opened_at: float = 0.0
    inflight: int = 0
    trial: bool = False       # a half-open trial request is out
    served: int = 0           # requests it took (for tests and /api/models)

    def usable(self, now: float, open_s: float) -> bool:
        if not self.healthy:
            return False
        if self.circuit == OPEN and now - self.opened_at >= open_s:
            self.circuit, self.trial = HALF_OPEN, False
        if self.circuit == OPEN:
            return False
        return self.circuit == CLOSED or not self.trial


class BackendPool:
    def __init__(self, urls: list[str], client: httpx.AsyncClient, *, headers: dict[str, str],
                 interval_s: float, failure_threshold: int, open_s: float, name: str) -> None:
        self.backends = [Backend(u) for u in urls]
        self.client = client
        self.headers = headers
        self.interval_s = interval_s
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.name = name
        self._rotation = itertools.count()
        self._task: asyncio.Task | None = None

    # ---- choosing ----------------------------------------------------------------------------
    def available(self, exclude: set[str] = frozenset()) -> bool:
        """Whether some URL (not in ``exclude``) can take a request now."""
        now = time.monotonic()
        return any(b.url not in exclude and b.usable(now, self.open_s) for b in self.backends)

    def acquire(self, exclude: set[str] = frozenset()) -> Backend | None:
        """The least-loaded usable URL (ties in turn), its load counted; None when there is none."""
        now = time.monotonic()
        usable = [b for b in self.backends if b.url not in exclude and b.usable(now, self.open_s)]
        if not usable:
            return None
        start = next(self._rotation) % len(usable)
        turn = usable[start:] + usable[:start]
        best = min(turn, key=lambda b: b.inflight)
        if best.circuit == HALF_OPEN:
            best.trial = True
        best.inflight += 1
        best.served += 1
        return best

    def release(self, backend: Backend, ok: bool | None) -> None:
        """``ok``: the request worked (True), failed on the remote's side (False), or tells nothing
        about the remote's health (None: the client left, or the remote refused a bad request)."""
        backend.inflight -= 1
        if ok is None:
            if backend.circuit == HALF_OPEN:
                backend.trial = False
            return
        if ok:
            self._succeeded(backend)
        else:
            self._failed(backend, "request failed")

    def _succeeded(self, backend: Backend) -> None:
        if backend.circuit != CLOSED:
            log.info("remote %s: %s is back (circuit closed)", self.name, backend.url)
        backend.failures, backend.circuit, backend.trial = 0, CLOSED, False

    def _failed(self, backend: Backend, why: str) -> None:
        backend.failures += 1
        if backend.circuit == HALF_OPEN or (backend.circuit == CLOSED and backend.failures >= self.failure_threshold):
            log.warning("remote %s: %s failing (%s): circuit open for %.0f s", self.name, backend.url, why,
                        self.open_s)
            backend.circuit, backend.opened_at, backend.trial = OPEN, time.monotonic(), False

    def mark_down(self, backend: Backend) -> None:
        """The URL cannot be reached at all (connection refused): out until a probe sees it again."""
        backend.healthy = False
        self._failed(backend, "unreachable")

    # ---- probing -----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"remote-health-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(b) for b in self.backends))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.probe_all()
            except Exception:  # noqa: BLE001 - a probe bug must not end the probing
                log.exception("remote %s: health probe failed", self.name)

    async def _probe(self, backend: Backend) -> None:
        """/health first; a server without it (or failing it) is asked for /v1/models. A refused
        connection marks the URL unhealthy at once; a slow or failing answer only after
        ``failure_threshold`` probes in a row (a busy server is not a dead one)."""
        answer = await self._get(backend.url + "/health")
        if answer is not True:
            second = await self._get(backend.url + "/v1/models")
            answer = True if second is True else (None if None in (answer, second) else False)
        ok = answer is True
        backend.probe_failures = 0 if ok else backend.probe_failures + 1
        if not ok and answer is not None and backend.healthy and backend.probe_failures < self.failure_threshold:
            self._failed(backend, "health probe")  # counted (the circuit may open), still probed as healthy
            return
        if ok and not backend.healthy:
            log.info("remote %s: %s answers its health probe again", self.name, backend.url)
        if not ok and backend.healthy:
            log.warning("remote %s: %s fails its health probe", self.name, backend.url)
        backend.healthy = ok
        if ok and backend.circuit == OPEN and time.monotonic() - backend.opened_at >= self.open_s:
            backend.circuit, backend.trial = HALF_OPEN, False  # the next request is the trial
        elif not ok:
            self._failed(backend, "health probe")

    async def _get(self, url: str) -> bool | None:
        """True: a 2xx answer; False: another answer, or none in time; None: the connection was refused."""
        try:
            r = await self.client.get(url, headers=self.headers, timeout=min(2.0, self.interval_s))
            return r.status_code < 300
        except httpx.ConnectError:
            return None
        except httpx.HTTPError:
            return False
