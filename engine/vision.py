"""The engine's vision worker: image features for requests that have not been admitted yet.

A request with images is queued here first. This thread runs the model's vision tower once
over every image that arrived since its last call, stores each request's features on its
prompt and hands the requests to the scheduler, whose prefill then only places the features
at the image tokens. Meanwhile the scheduler thread keeps decoding the running batch, so an
image arriving no longer stalls every stream for the length of a vision-tower pass.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from core.errors import ChatVLMError, ServerError
from core.omp import release_threads

log = logging.getLogger(__name__)


class VisionWorker:
    """A queue of requests whose image features are still to be computed, and its thread."""

    def __init__(self, backend: Any, name: str, *, max_batch: int, decoding: Callable[[], int],
                 hand_over: Callable[[list], None], fail: Callable[[list, ChatVLMError], None]) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self._decoding = decoding    # how many rows the scheduler is decoding (to share the cores)
        self._hand_over = hand_over  # encoded (or cancelled) requests go on to the scheduler
        self._fail = fail
        self._queue: list = []
        self._encoding = 0           # requests in the vision-tower call now
        self._exclusive = threading.Event()  # set while a call runs that the decode steps wait for
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"vision-{name}", daemon=True)

    @property
    def encoding(self) -> bool:
        """Whether a vision-tower call is running now."""
        return self._encoding > 0

    def wait_exclusive(self, timeout: float) -> None:
        """On the scheduler thread: while the running call has all the cores, wait for it."""
        if self._exclusive.is_set():
            with self._cond:
                self._cond.wait_for(lambda: not self._exclusive.is_set() or self._stopping, timeout)

    @property
    def pending(self) -> int:
        """Requests queued here or being encoded (they count toward the engine's queue bound)."""
        return len(self._queue) + self._encoding

    def start(self) -> None:
        self._thread.start()

    def put(self, seq: Any) -> None:
        with self._cond:
            self._queue.append(seq)
            self._cond.notify_all()  # the scheduler may wait on this condition too

    def stop(self, timeout: float, error: ChatVLMError) -> None:
        """Finish the call in progress (the scheduler then refuses its requests), fail the queue."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left, self._queue = self._queue, []
        self._fail(left, error)

    def _run(self) -> None:
        while True:
            if not self._queue:
                release_threads()  # idle: its OpenMP pool would slow the decode steps' kernels (core/omp.py)
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self._encoding = len(batch)
            try:
                self._encode(batch)
            finally:
                with self._cond:
                    self._encoding = 0

    def _encode(self, batch: list) -> None:
        # A request cancelled while it waited here is not encoded; the scheduler releases it
        # ("cancelled") like any request that leaves its queue.
        live = [s for s in batch if not s.handle.cancel.cancelled]
        errors: dict[int, ChatVLMError] = {}
        if live:
            if self.backend.bind_vision_thread(self._decoding(), len(live)):
                self._exclusive.set()
            try:
                error = self._try(live)
                if error is not None:
                    # One request's images failed the call: each on its own, so the others go on.
                    errors = {id(s): e for s in live if (e := self._try([s]) if len(live) > 1 else error)}
            finally:
                with self._cond:
                    self._exclusive.clear()
                    self._cond.notify_all()
        for seq in live:
            if id(seq) in errors:
                self._fail([seq], errors[id(seq)])
        with self._cond:
            self._encoding = 0  # from here on they count in the scheduler's queue
        self._hand_over([s for s in batch if id(s) not in errors])

    def _try(self, seqs: list) -> ChatVLMError | None:
        try:
            self.backend.encode_images([s.prompt for s in seqs])
            return None
        except Exception as exc:  # noqa: BLE001 - a failed call fails its requests, not the engine
            log.exception("vision worker: image encoding failed")
            return exc if isinstance(exc, ChatVLMError) else ServerError("image encoding failed")
