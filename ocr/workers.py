"""A pool of long-lived worker processes for an OCR engine whose calls should not share one GIL.

Each worker is a fresh interpreter (``python -c``, the equivalent of multiprocessing's "spawn"
without re-importing the parent's ``__main__``) that loads the engine once and then serves one
call at a time over a socket pair. The engine is named by two functions, ``"module:function"``:
``init(*init_args) -> state`` runs once in the worker, ``call(state, payload) -> result`` per
request. Payloads and results are pickled.

What a caller can rely on:
- ``call`` waits for an idle worker and for its answer while polling the ``CancelToken``: a
  cancelled request (client gone, deadline passed) returns at once with ``Cancelled``. A worker
  still busy with that request's image is left to finish it for ``cancel_grace_s`` seconds (its
  answer is dropped), then killed and replaced, so no worker stays busy for ever.
- A worker that dies (killed, crashed inside native code) fails the request it was serving with
  ``ModelUnavailable`` (503, Retry-After) at once, and is replaced in the background.
- ``close`` stops every worker (a stop message, then SIGKILL after a short wait). A worker whose
  parent is gone exits by itself: its socket reaches EOF, and a watchdog notices the new parent
  even while it is busy. Workers ignore SIGINT and SIGTERM sent to the whole process group (a
  terminal's Ctrl-C, a service manager's stop): their parent decides when they stop.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from core.errors import Cancelled, ModelLoadFailed, ModelUnavailable
from core.types import CancelToken

log = logging.getLogger("chatvlm.ocr.workers")

_ROOT = str(Path(__file__).resolve().parent.parent)
_POLL_S = 0.02          # how often a waiting call looks at its cancel token
_STOP_WAIT_S = 3.0      # a stopping worker gets this long before SIGKILL
_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from ocr.workers import _child_main; _child_main(int(sys.argv[2]))")


class WorkerCrashed(Exception):
    """A worker process ended or broke its socket in the middle of a call."""


def _readable(conn: Connection) -> bool:
    try:
        return conn.poll(0)
    except (OSError, EOFError):
        return True


class _Worker:
    """One process and the parent's end of its socket."""

    def __init__(self, proc: subprocess.Popen, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.pid = proc.pid
        self.rss_bytes = 0

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("worker %d did not die after SIGKILL", self.pid)
        self.conn.close()

    def stop(self) -> None:
        """Ask it to exit; kill it if it does not."""
        try:
            self.conn.send(("stop", None))
            self.proc.wait(timeout=_STOP_WAIT_S)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            pass
        self.kill()


class WorkerPool:
    """``size`` worker processes running ``init``/``call`` (see the module docstring)."""

    def __init__(self, name: str, size: int, init: str, call: str, init_args: tuple = (),
                 cancel_grace_s: float = 10.0, start_timeout_s: float = 300.0) -> None:
        self.name = name
        self.size = max(1, int(size))
        self._spec = (init, call, init_args)
        self.cancel_grace_s = cancel_grace_s
        self.start_timeout_s = start_timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: set[_Worker] = set()  # alive or starting, idle or busy
        self._starting = 0
        self._lock = threading.Lock()
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker (in parallel) and wait until each has loaded its engine."""
        spawned = []
        try:
            for _ in range(self.size):
                spawned.append(self._spawn())
            for w in spawned:
                self._handshake(w)
        except BaseException:
            for w in spawned:
                w.kill()
            raise
        with self._lock:
            self._workers.update(spawned)
        for w in spawned:
            self._idle.put(w)
        log.info("%s: %d worker process(es) ready, RSS %s MB", self.name, len(spawned),
                 ", ".join(f"{w.rss_bytes / 2**20:.0f}" for w in spawned))

    def close(self) -> None:
        """Stop every worker process (idle, busy or draining) and wait for them."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
        threads = [threading.Thread(target=w.stop, daemon=True) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._workers)

    def rss_bytes(self) -> dict[int, int]:
        """Resident memory of each live worker, by pid (read now from /proc)."""
        return {pid: _rss(pid) for pid in self.pids()}

    # ---- calls -----------------------------------------------------------------------

    def call(self, payload: Any, cancel: CancelToken) -> Any:
        """Run ``call(state, payload)`` on an idle worker and return its result.

        A worker acknowledges a call when it takes it. One that ends before that was already
        dead or dying while idle (killed, not yet noticed): the call goes to another worker. One
        that ends after it died during the call: this request fails (503), the worker is replaced."""
        for _ in range(self.size + 2):
            worker = self._acquire(cancel)
            taken = False
            try:
                worker.conn.send(("call", payload))
            except OSError:
                self._replace(worker, "it died while idle")
                continue
            while True:
                if cancel.cancelled:
                    threading.Thread(target=self._drain, args=(worker,), daemon=True,
                                     name=f"{self.name}-drain-{worker.pid}").start()
                    raise Cancelled("request cancelled")
                try:
                    ready = worker.conn.poll(_POLL_S)
                    reply = worker.conn.recv() if ready else None
                except (EOFError, OSError):
                    reply = None
                    if not taken:
                        self._replace(worker, "it died while idle")
                        break
                    self._replace(worker, "it died during a call")
                    raise self._crashed() from None
                if reply is not None and reply[0] == "taken":
                    taken = True
                    continue
                if reply is not None:
                    break
            if reply is None:
                continue  # the worker was dead before it took the call: another one takes it
            self._release(worker)
            kind, value = reply
            if kind == "error":
                raise RuntimeError(f"{self.name} worker failed: {value}")
            return value
        raise self._crashed()

    def _acquire(self, cancel: CancelToken) -> _Worker:
        while True:
            if self._closed:
                raise ModelUnavailable(f"model '{self.name}' is not loaded")
            if cancel.cancelled:
                raise Cancelled("request cancelled before a worker was free")
            with self._lock:
                if not self._workers and not self._starting:
                    raise ModelUnavailable(f"model '{self.name}' has no worker process left; reload it",
                                           headers={"Retry-After": "1"})
            try:
                worker = self._idle.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if worker.proc.poll() is None and not _readable(worker.conn):
                return worker
            # No request was on it: try another. An idle worker has nothing to say, so a readable
            # socket means it closed (the process is dying, though not yet reaped) or broke.
            self._replace(worker, "it died while idle")

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            alive = worker in self._workers
        if alive and not self._closed:
            self._idle.put(worker)

    def _crashed(self) -> ModelUnavailable:
        return ModelUnavailable(f"model '{self.name}': its worker process stopped during the request; "
                                "it is being replaced, retry shortly", headers={"Retry-After": "1"})

    def _drain(self, worker: _Worker) -> None:
        """A cancelled call's worker: wait for its (dropped) answer, or kill it after the grace."""
        deadline = time.monotonic() + self.cancel_grace_s
        try:
            while worker.conn.poll(max(0.0, deadline - time.monotonic())):
                if worker.conn.recv()[0] == "taken":
                    continue
                self._release(worker)
                return
            reason = f"a cancelled call ran over {self.cancel_grace_s:g} s"
        except (EOFError, OSError):
            reason = "it died during a cancelled call"
        self._replace(worker, reason)

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill a broken or stuck worker and start another in the background."""
        with self._lock:
            if worker not in self._workers:
                return
            self._workers.discard(worker)
            closed = self._closed
            if not closed:
                self._starting += 1
        log.warning("%s: worker %d replaced: %s", self.name, worker.pid, reason)
        worker.kill()
        if not closed:
            threading.Thread(target=self._respawn, daemon=True, name=f"{self.name}-respawn").start()

    def _respawn(self) -> None:
        worker = None
        try:
            worker = self._spawn()
            self._handshake(worker)
        except Exception:  # noqa: BLE001 - logged; the pool runs on with one worker fewer
            log.exception("%s: a replacement worker failed to start", self.name)
            if worker is not None:
                worker.kill()
            worker = None
        with self._lock:
            self._starting -= 1
            if worker is not None and not self._closed:
                self._workers.add(worker)
                self._idle.put(worker)
                log.info("%s: worker %d started (RSS %.0f MB)", self.name, worker.pid, worker.rss_bytes / 2**20)
                return
        if worker is not None:
            worker.stop()

    # ---- process start ----------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        try:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, _ROOT, str(child.fileno())],
                                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        worker = _Worker(proc, Connection(parent.detach()))
        worker.conn.send(("init", self._spec))
        return worker

    def _handshake(self, worker: _Worker) -> None:
        try:
            if not worker.conn.poll(self.start_timeout_s):
                raise ModelLoadFailed(f"model '{self.name}': a worker did not start within "
                                      f"{self.start_timeout_s:g} s")
            kind, value = worker.conn.recv()
        except (EOFError, OSError):
            raise ModelLoadFailed(f"model '{self.name}': a worker process exited while loading") from None
        if kind != "ready":
            raise ModelLoadFailed(f"model '{self.name}': a worker failed to load ({value})")
        worker.rss_bytes = int(value)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- the worker process ------------------------------------------------------------------

def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone, even in the middle of a long call."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _child_main(fd: int) -> None:
    """Entry point of a worker: load the engine, then answer calls until told to stop or orphaned."""
    import signal

    # Ctrl-C reaches the whole process group, and a service manager may SIGTERM every process of
    # the service: the parent stops its workers itself once its in-flight requests are done (a
    # draining server still reads pages), and a worker whose parent is gone exits by itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(fd)
    try:
        kind, (init, call, init_args) = conn.recv()
        state = _resolve(init)(*init_args)
        handle = _resolve(call)
    except EOFError:
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the load
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", _rss(os.getpid())))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        try:
            conn.send(("taken", None))  # the parent tells a death before this from one during the call
        except OSError:
            return
        try:
            reply = ("ok", handle(state, payload))
        except Exception as exc:  # noqa: BLE001 - the parent raises it for this call only
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError) as exc:
            conn.send(("error", f"unpicklable result: {exc}"))
        except OSError:
            return
