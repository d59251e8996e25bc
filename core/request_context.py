"""The request-scoped record every surface fills: which model served, how many tokens, and a failure
that happened after the HTTP status was sent (a stream that broke).

The HTTP middleware (server/request_records.py) opens one context per request; the services (text
generation, embeddings, OCR, jobs) note what they learn into it with the functions below, wherever they
run in the request's task tree (child tasks and ``asyncio.to_thread`` copy the context, and the object
is shared, not copied). Outside a request the functions do nothing.
"""
from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field


@dataclass
class RequestContext:
    route: str = ""
    method: str = ""
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    failed_status: int | None = None   # set when the work failed after a 2xx status went out

    def add_tokens(self, prompt: int | None, completion: int | None) -> None:
        if prompt is not None:
            self.prompt_tokens = (self.prompt_tokens or 0) + prompt
        if completion is not None:
            self.completion_tokens = (self.completion_tokens or 0) + completion


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request_context", default=None)


def open_context(route: str = "", method: str = "") -> tuple[RequestContext, contextvars.Token]:
    ctx = RequestContext(route=route, method=method)
    return ctx, _current.set(ctx)


def close_context(token: contextvars.Token) -> None:
    _current.reset(token)


def current() -> RequestContext | None:
    return _current.get()


def note_model(model_id: str) -> None:
    """The model serving this request (the first one noted wins: a fallback is noted by its resolver)."""
    ctx = _current.get()
    if ctx is not None and ctx.model is None:
        ctx.model = model_id


def note_tokens(prompt: int | None = None, completion: int | None = None) -> None:
    """Tokens this request consumed (added up over the several generations an OCR document may make)."""
    ctx = _current.get()
    if ctx is not None:
        ctx.add_tokens(prompt, completion)


def note_failure(status: int) -> None:
    """The request failed after its status line went out (a stream's error event)."""
    ctx = _current.get()
    if ctx is not None and ctx.failed_status is None:
        ctx.failed_status = status
