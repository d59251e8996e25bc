"""The generation engine of one loaded model: a scheduler on its own thread that batches
concurrent requests into shared forward passes and streams each request's tokens.

Requests wait in a bounded queue; those with images first pass the vision worker
(engine/vision.py), which computes their image features on its own thread while the batch
decodes. Between decode steps the scheduler admits waiting
requests (one prefill for all of them, then they join the running batch) and drops
finished, cancelled or expired ones, so every request keeps its own sampling parameters,
stop strings and length, and the others carry on. Tokens reach the event loop through one
thread-safe callback per step.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from core.errors import BadRequest, ChatVLMError, ModelUnavailable, Overloaded, ServerError
from core.cores import SHARE
from core.omp import release_threads
from core.types import CancelToken, GenerationParams
from engine.backend import BatchBackend, EncodedPrompt
from engine.detok import IncrementalDetokenizer
from engine.sampling import RowSampler, choose_tokens
from engine.vision import VisionWorker
from llm.types import StreamDelta, Usage

log = logging.getLogger(__name__)


class RequestHandle:
    """What the caller holds: an async iterator of deltas. Leaving it cancels the request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel: CancelToken) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancel = cancel
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.submitted = time.monotonic()

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamDelta]:
        try:
            while True:
                item = await self._queue.get()
                # Coalesce what piled up while the consumer was busy: fewer, larger events.
                while not isinstance(item, BaseException) and item.finish_reason is None and not self._queue.empty():
                    nxt = self._queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        if item.text:
                            yield item
                        item = nxt
                        break
                    item = StreamDelta(item.text + nxt.text, nxt.finish_reason, nxt.usage)
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    self.finish_reason, self.usage = item.finish_reason, item.usage
                    if item.text or item.finish_reason != "cancelled":
                        yield item
                    return
                if item.text:
                    yield item
        finally:
            self.cancel.cancel()  # no-op once finished; stops the work if the consumer left early


class _Sequence:
    """Engine-side state of one request."""

    def __init__(self, prompt: EncodedPrompt, params: GenerationParams, handle: RequestHandle,
                 backend: BatchBackend, max_new_tokens: int) -> None:
        self.prompt = prompt
        self.params = params
        self.handle = handle
        self.max_new_tokens = max_new_tokens
        self.sampler = RowSampler(params, prompt.input_ids, backend.device)
        self.detok = IncrementalDetokenizer(backend.tokenizer)
        self.text = ""      # all text produced so far
        self.sent = 0       # how much of it was delivered
        self.generated = 0
        self.last_token = -1
        self.finish: str | None = None
        self.first_token_at: float | None = None
        self.flushed_at: float | None = None  # when text was last sent
        self.partial: Any = None  # a chunked prefill in progress (the backend's state)


class Engine:
    def __init__(self, backend: BatchBackend, *, name: str, max_batch: int = 16, max_queue: int = 64,
                 stream_interval: float = 0.0, metrics: Any = None) -> None:
        self.backend = backend
        # Text produced faster than this is sent in one event (seconds; 0 sends every token).
        self.stream_interval = stream_interval
        self.name = name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._prefilling: deque[_Sequence] = deque()  # long prompts prefilled a chunk per step
        self._cond = threading.Condition()
        self._stopping = False
        self._broken = False  # the scheduler itself failed (not a step: those fail their batch only)
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._vision = VisionWorker(backend, name, max_batch=max_batch, decoding=lambda: len(self._active),
                                    hand_over=self._encoded, fail=self._fail_waiting) \
            if getattr(backend, "encodes_images_ahead", False) else None
        self._sharing = False  # whether the decode steps run on one thread fewer for the vision worker
        self._threads: int | None = None  # CPU threads its steps run on alone (None: not on the CPU)
        self._using: int | None = None    # its part of them now, other models generating too
        self.steps = 0  # decode steps run, for tests and metrics

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    @property
    def active_count(self) -> int:
        return len(self._active) + len(self._prefilling)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting) + (self._vision.pending if self._vision is not None else 0)

    def start(self) -> None:
        self._thread.start()
        if self._vision is not None:
            self._vision.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish nothing new: fail waiting requests, cancel running ones, join the thread(s)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._vision is not None:
            self._vision.stop(timeout, self._unloaded())
        self._thread.join(timeout)

    def _unloaded(self) -> ModelUnavailable:
        if self._broken:
            return ModelUnavailable(f"model '{self.name}' stopped after an internal failure; unload and load it again",
                                    headers={"Retry-After": "1"})
        return ModelUnavailable(f"model '{self.name}' was unloaded", headers={"Retry-After": "1"})

    def _encoded(self, seqs: list[_Sequence]) -> None:
        """The vision worker's hand-over: these requests' image features are ready."""
        with self._cond:
            if not self._stopping:
                self._waiting.extend(seqs)
                self._cond.notify()
                seqs = []
        self._fail_waiting(seqs, self._unloaded())  # the engine stopped meanwhile
        self._report_queue()

    def _fail_waiting(self, seqs: list[_Sequence], error: ChatVLMError) -> None:
        self._deliver([(s.handle, error) for s in seqs])

    def encode(self, messages, prompt: str | None) -> EncodedPrompt:
        """Tokenize (chat template for messages); CPU work, call it off the event loop."""
        return self.backend.encode(messages, prompt)

    def submit(self, prompt: EncodedPrompt, params: GenerationParams, cancel: CancelToken) -> RequestHandle:
        """Queue a request (call on the event loop). Raises before queueing when it cannot run."""
        n_prompt = len(prompt.input_ids)
        if n_prompt == 0:
            raise BadRequest("the prompt is empty", param="prompt", code="EMPTY_PROMPT")
        room = self.context_length - n_prompt
        if room <= 0:
            raise BadRequest(f"the prompt has {n_prompt} tokens; this model's context is {self.context_length}",
                             param="prompt", code="CONTEXT_LENGTH_EXCEEDED")
        handle = RequestHandle(asyncio.get_running_loop(), cancel)
        seq = _Sequence(prompt, params, handle, self.backend, min(params.max_new_tokens, room))
        with self._cond:
            if self._stopping:
                raise self._unloaded() if self._broken else \
                    ModelUnavailable(f"model '{self.name}' is being unloaded", headers={"Retry-After": "1"})
            waiting = self.waiting_count
            if waiting >= self.max_queue:
                raise Overloaded(f"model '{self.name}' has {waiting} requests waiting; retry shortly",
                                 headers={"Retry-After": "1"})
            if self._vision is not None and prompt.vision:
                self._vision.put(seq)
            else:
                self._waiting.append(seq)
                self._cond.notify()
        self._report_queue()
        return handle

    # ---- the scheduler thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - whatever ended the loop, nobody is left waiting
            log.exception("engine %s: the scheduler stopped after a failure", self.name)
            with self._cond:  # new requests get a clear 503 instead of a queue nobody serves
                self._stopping = self._broken = True
        self._shutdown()

    def _serve(self) -> None:
        bind = getattr(self.backend, "bind_thread", None)
        self._threads = bind() if bind is not None else None
        while True:
            if self._vision is not None:
                # Before taking the queue: after a vision call the decode steps waited for (it
                # had all the cores), the requests it handed over are admitted in this step.
                self._vision.wait_exclusive(timeout=60.0)
            if not self._waiting and not self._active and not self._prefilling:
                self._lend_threads(busy=False)
                release_threads()  # idle: its OpenMP pool would slow other threads' kernels (core/omp.py)
            with self._cond:
                while not self._waiting and not self._active and not self._prefilling and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                # Requests whose client left or whose deadline passed leave the queue at once.
                gone = [s for s in self._waiting if s.handle.cancel.cancelled]
                if gone:
                    self._waiting = deque(s for s in self._waiting if not s.handle.cancel.cancelled)
                room = self.max_batch - len(self._active) - len(self._prefilling)
                admitted = gone + [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                self._lend_threads(busy=True)
                self._share_cores()
                self._step(admitted)
            except Exception as exc:  # noqa: BLE001 - a model failure ends the batch, not the engine
                log.exception("engine %s: step failed", self.name)
                self._fail_all(admitted, exc if isinstance(exc, ChatVLMError) else ServerError("generation failed"))

    def _lend_threads(self, busy: bool) -> None:
        """Share the CPU with the other models generating now (core/cores.py): hold this
        engine's threads while it has work, give them back when idle, and before each step
        decode on its part of them."""
        if self._threads is None:  # not on the CPU
            return
        if busy:
            SHARE.hold(self, self._threads)
            threads = SHARE.threads(self, self._threads)
        else:
            SHARE.drop(self)
            threads = self._threads
        if threads != self._using:
            self.backend.use_threads(threads)
            self._using = threads

    def _share_cores(self) -> None:
        """Give the vision worker a core of its own while it encodes beside the decode steps
        (see ``bind_vision_thread``)."""
        if self._vision is None:
            return
        busy = self._vision.encoding
        if busy != self._sharing:
            self.backend.share_cores(busy)
            self._sharing = busy

    def _fail_all(self, admitted: list[_Sequence], error: ChatVLMError) -> None:
        failed = {id(s): s for s in self._active + list(self._prefilling) + admitted}.values()
        self._active = []
        self._prefilling.clear()
        try:
            self.backend.keep([])
        finally:  # whatever happens, no caller is left waiting
            self._deliver([(seq.handle, error) for seq in failed])

    def _step(self, admitted: list[_Sequence]) -> None:
        out: list[tuple[RequestHandle, Any]] = []
        admitted = [s for s in admitted if not self._drop_if_cancelled(s, out)]
        chunked = getattr(self.backend, "chunked", None)
        if admitted and chunked is not None:
            for seq in [s for s in admitted if chunked(s.prompt)]:
                seq.partial = self.backend.begin_prefill(seq.prompt)
                self._prefilling.append(seq)
            admitted = [s for s in admitted if s.partial is None]
        if admitted:
            groups = getattr(self.backend, "prefill_groups", None)
            for group in groups([s.prompt for s in admitted]) if groups else [range(len(admitted))]:
                seqs = [admitted[i] for i in group]  # e.g. the prompts with cached prefixes run together
                logits = self.backend.prefill([s.prompt for s in seqs])
                self._active.extend(seqs)
                self._advance(seqs, logits, out)
            self._prune(out)
        if self._active:
            logits = self.backend.decode([s.last_token for s in self._active])
            self.steps += 1
            self._advance(self._active, logits, out)
            self._prune(out)
        if not self._active and out:
            # Nothing decodes any more (the last rows finished in this step, or were cancelled):
            # nobody's next token waits for the long prompt's slice, which is then a whole
            # chunk, so what this step has to send goes out first instead of after it (the
            # streams' end came 0.5-0.8 s late beside a 2,255-token prompt on 2 cores).
            self._deliver(out)
            out = []
        # After the rows' step and before their tokens go out: the slice is budgeted knowing
        # how long that step took (engine/long_prompts.py).
        self._prefill_one_chunk(out)
        self._deliver(out)
        if self.metrics is not None:
            self.metrics.set_batch_size(self.name, len(self._active))
        self._report_queue()

    def _prefill_one_chunk(self, out: list) -> None:
        """One chunk of the oldest long prompt per step: the decoding rows wait one chunk, not
        the whole prompt. It joins the batch after its last chunk."""
        while self._prefilling and self._drop_if_cancelled(self._prefilling[0], out):
            self._prefilling.popleft()
        if not self._prefilling:
            return
        seq = self._prefilling[0]
        logits = self.backend.prefill_chunk_step(seq.partial)
        if logits is None:
            return
        self._prefilling.popleft()
        seq.partial = None
        self._active.append(seq)
        self._advance([seq], logits, out)
        self._prune(out)

    def _prune(self, out: list) -> None:
        """Drop finished and cancelled rows from the batch."""
        keep = [i for i, s in enumerate(self._active) if s.finish is None and not self._drop_if_cancelled(s, out)]
        if len(keep) != len(self._active):
            self._active = [self._active[i] for i in keep]
            self.backend.keep(keep)

    def _advance(self, seqs: list[_Sequence], logits, out: list) -> None:
        tokens = choose_tokens(logits, [s.sampler for s in seqs])
        now = time.monotonic()
        for seq, token in zip(seqs, tokens):
            if seq.finish is not None:
                continue
            seq.last_token = token
            seq.sampler.note(token)
            seq.generated += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            is_eos = token in self.backend.eos_ids and not seq.params.ignore_eos
            if not is_eos:
                seq.text += seq.detok.push(token)
            if is_eos:
                seq.finish = "stop"
            elif seq.generated >= seq.max_new_tokens:
                seq.finish = "length"
            if seq.finish is not None:
                seq.text += seq.detok.flush()
            if seq.params.stop and self._cut_at_stop(seq):
                seq.finish = "stop"
            if seq.finish is None and seq.params.max_repeat and _looping(seq.text, seq.params.max_repeat):
                seq.finish = "stop"
            delta = self._delta(seq, now)
            if delta is not None:
                out.append((seq.handle, delta))

    @staticmethod
    def _cut_at_stop(seq: _Sequence) -> bool:
        window_start = max(0, seq.sent - max(len(s) for s in seq.params.stop))
        hits = [i for i in (seq.text.find(s, window_start) for s in seq.params.stop if s) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[:min(hits)]
        return True

    def _delta(self, seq: _Sequence, now: float) -> StreamDelta | None:
        """What to send for this step: None while coalescing (or nothing new)."""
        if seq.finish is None:
            if seq.flushed_at is not None and now - seq.flushed_at < self.stream_interval:
                return None  # fast decoding: fewer, larger events; the first token always goes at once
            # Hold back a tail that could still grow into a stop string, so none is ever half-sent.
            hold = max((len(s) - 1 for s in seq.params.stop if s), default=0)
            upto = max(seq.sent, len(seq.text) - hold)
            if upto == seq.sent:
                return None
            piece, seq.sent, seq.flushed_at = seq.text[seq.sent:upto], upto, now
            return StreamDelta(piece)
        piece, seq.sent = seq.text[seq.sent:], len(seq.text)
        usage = Usage(len(seq.prompt.input_ids), seq.generated)
        self._observe(seq, usage)
        return StreamDelta(piece, seq.finish, usage)

    def _observe(self, seq: _Sequence, usage: Usage) -> None:
        if self.metrics is None:
            return
        start = seq.handle.submitted
        ttft = seq.first_token_at - start if seq.first_token_at is not None else None
        self.metrics.observe_generation(self.name, ttft, time.monotonic() - start, usage.prompt_tokens,
                                        usage.completion_tokens, finish_reason=seq.finish)

    def _drop_if_cancelled(self, seq: _Sequence, out: list) -> bool:
        if seq.finish is None and seq.handle.cancel.cancelled:
            seq.finish = "cancelled"
            usage = Usage(len(seq.prompt.input_ids), seq.generated)
            self._observe(seq, usage)
            out.append((seq.handle, StreamDelta("", "cancelled", usage)))
            return True
        return False

    @staticmethod
    def _deliver(items: list[tuple[RequestHandle, Any]]) -> None:
        """Hand this step's deltas to the event loop(s) in one callback each."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, item in items:
            by_loop.setdefault(handle._loop, []).append((handle._queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.name, self.waiting_count)

    def _shutdown(self) -> None:
        SHARE.drop(self)
        error = self._unloaded()
        with self._cond:
            leftovers = list(self._waiting) + self._active + list(self._prefilling)
            self._waiting.clear()
            self._prefilling.clear()
        self._active = []
        try:
            self.backend.keep([])
        except Exception:  # noqa: BLE001 - a broken backend still lets every caller go
            log.exception("engine %s: releasing the batch failed", self.name)
        self._deliver([(s.handle, error) for s in leftovers])
        if self.metrics is not None:
            self.metrics.set_batch_size(self.name, 0)
            self.metrics.set_queue_depth(self.name, 0)


@functools.lru_cache(maxsize=16)
def _loop_pattern(times: int) -> re.Pattern:
    return re.compile(r"(.{1,24}?)\1{%d,}$" % (times - 1), re.DOTALL)


def _looping(text: str, times: int) -> bool:
    """Whether the text ends in a unit of up to 24 characters repeated ``times`` times or more."""
    return _loop_pattern(times).search(text[-2000:]) is not None


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
