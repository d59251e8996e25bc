"""Sentence embeddings for the OpenAI surface (and seed 004's per-model route): one path.

Requests for the same model that arrive while a forward pass runs wait together and share
the next one (up to ``max_batch_inputs`` inputs), so many small concurrent requests cost
about as much as one batched call. The model work runs on the model's worker thread, never
on the event loop. Waiting inputs are bounded: past ``max_queue_inputs`` a request is refused
at once with 503 and Retry-After. Knows nothing of HTTP.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from core import request_context
from core.errors import BadRequest, Cancelled, DeadlineExceeded, Overloaded
from core.types import CancelToken, Capability
from models.manager import ModelManager
from models.selection import ModelSelector

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # per request, as OpenAI allows
INLINE_TOKENIZE_CHARS = 4096  # up to this much text is tokenized on the event loop


@dataclass
class EmbeddingResult:
    model: str
    vectors: object          # numpy float32 array (inputs, dimensions)
    prompt_tokens: int       # tokens the model ran, special tokens included
    dimensions: int


@dataclass
class _Pending:
    rows: list[list[int]]
    future: asyncio.Future
    cancel: CancelToken


@dataclass
class _Batcher:
    """The waiting requests of one model and the task that drains them."""

    waiting: deque = field(default_factory=deque)
    waiting_inputs: int = 0
    task: asyncio.Task | None = None


class EmbeddingService:
    def __init__(self, selector: ModelSelector, manager: ModelManager, *, max_batch_inputs: int = 256,
                 max_queue_inputs: int = 8192, timeout_s: float = 30.0) -> None:
        self.selector = selector
        self.manager = manager
        self.max_batch_inputs = max_batch_inputs
        self.max_queue_inputs = max_queue_inputs
        self.timeout_s = timeout_s
        self._batchers: dict[str, _Batcher] = {}

    def select(self, model: str | None) -> str:
        return self.selector.select(Capability.EMBED, model)

    async def embed(self, model: str | None, inputs: list[str] | list[list[int]], *,
                    dimensions: int | None = None) -> EmbeddingResult:
        """Validate, tokenize, wait for a shared forward pass, and return the vectors in input order."""
        if not inputs:
            raise BadRequest("input must not be empty", param="input", code="EMPTY_INPUT")
        if len(inputs) > MAX_INPUTS:
            raise BadRequest(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}", param="input",
                             code="TOO_MANY_INPUTS")
        model_id = self.select(model)
        request_context.note_model(model_id)
        state = await self.manager.ensure_loaded(model_id)
        state.touch()
        adapter = state.adapter
        if dimensions is not None and dimensions != adapter.dimensions:
            raise BadRequest(f"model '{model_id}' makes {adapter.dimensions}-dimensional vectors; `dimensions` "
                             f"must be {adapter.dimensions} or left out", param="dimensions",
                             code="UNSUPPORTED_DIMENSIONS")
        # A few sentences tokenize in microseconds: a thread hop would cost more than it saves.
        small = sum(len(x) for x in inputs) <= INLINE_TOKENIZE_CHARS  # characters, or token ids
        rows = adapter.token_ids(inputs) if small else await asyncio.to_thread(adapter.token_ids, inputs)
        vectors = await self._submit(model_id, rows)
        request_context.note_tokens(prompt=sum(len(r) for r in rows))
        return EmbeddingResult(model=model_id, vectors=vectors, prompt_tokens=sum(len(r) for r in rows),
                               dimensions=adapter.dimensions)

    async def _submit(self, model_id: str, rows: list[list[int]]):
        batcher = self._batchers.setdefault(model_id, _Batcher())
        if batcher.waiting_inputs + len(rows) > self.max_queue_inputs:
            raise Overloaded(f"model '{model_id}' has too many embeddings waiting; retry shortly",
                             headers={"Retry-After": "1"})
        item = _Pending(rows, asyncio.get_running_loop().create_future(),
                        CancelToken(deadline=time.monotonic() + self.timeout_s))
        batcher.waiting.append(item)
        batcher.waiting_inputs += len(rows)
        if batcher.task is None or batcher.task.done():
            batcher.task = asyncio.create_task(self._drain(model_id, batcher))
        try:
            # The drain task always settles the future; the bound is a guard against a hang.
            return await asyncio.wait_for(asyncio.shield(item.future), self.timeout_s + 5)
        except asyncio.TimeoutError:
            item.cancel.cancel()
            raise DeadlineExceeded(f"the embeddings did not finish within {self.timeout_s:g} s") from None
        except asyncio.CancelledError:
            item.cancel.cancel()  # the client left: its rows are skipped if not yet running
            raise

    async def _drain(self, model_id: str, batcher: _Batcher) -> None:
        """Run the waiting requests in batches until none is left."""
        while batcher.waiting:
            batch: list[_Pending] = []
            count = 0
            while batcher.waiting and (not batch or count + len(batcher.waiting[0].rows) <= self.max_batch_inputs):
                item = batcher.waiting.popleft()
                batcher.waiting_inputs -= len(item.rows)
                if item.cancel.cancelled:
                    continue
                batch.append(item)
                count += len(item.rows)
            if not batch:
                continue
            rows = [r for item in batch for r in item.rows]
            try:
                deadline = min(item.cancel.deadline for item in batch)
                vectors = await self.manager.run(model_id, "embed", rows, cancel=CancelToken(deadline=deadline))
            except Exception as exc:  # noqa: BLE001 - every waiter of this batch gets the failure
                if isinstance(exc, Cancelled):  # its deadline passed while it queued for the model
                    exc = DeadlineExceeded(f"the embeddings did not finish within {self.timeout_s:g} s")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(vectors[start:start + len(item.rows)])
                start += len(item.rows)
