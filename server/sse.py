"""One streaming pipeline for every SSE surface: typed deltas in, the surface's events out.

Each surface gives three small serializers (a delta, an error, the end marker). A failure
after the stream has started becomes an error event followed by the end marker, never a
silent close. Keep-alive comments go out on slow streams, and a client that disconnects
cancels the generation (closing the delta iterator cancels the engine request).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse

from core import request_context
from core.errors import ChatVLMError, ModelUnavailable, ServerError
from llm.types import StreamDelta

log = logging.getLogger("chatvlm.sse")

KEEPALIVE_S = 15
DRAIN_S = 10.0  # default drain time of a stream after shutdown starts (server.graceful_timeout_s)
END_MARGIN_S = 1.0  # the error event and end marker go out this long before the server's own cut
SEP = "\n"  # LF framing: what naive clients (seed 002's JS example) split on

Events = Iterable[Any]  # each item is the `data` of one event (str, or JSON-able dict)


def sse_response(deltas: AsyncIterator[StreamDelta], *, on_delta: Callable[[StreamDelta], Events],
                 on_error: Callable[[ChatVLMError], Events], end: Callable[[], Events],
                 headers: dict[str, str] | None = None, drain_s: float = DRAIN_S) -> EventSourceResponse:
    """``drain_s``: after shutdown starts (SIGTERM), a generating stream may go on this long
    (less a margin) to finish; past it, it ends with an error event and its end marker."""
    shutdown = anyio.Event()  # set by sse-starlette when the server begins to shut down
    stop_at: float | None = None

    async def events() -> AsyncIterator[bytes]:
        nonlocal stop_at
        held: list[bytes] = []  # events of deltas that said more follows: sent with the next one, in one write
        try:
            async for delta in deltas:
                for data in on_delta(delta):
                    held.append(_encode(data))
                if held and not (delta.more or delta.finish_reason):  # the end marker follows a finish
                    yield b"".join(held)
                    held.clear()
                if shutdown.is_set():  # SIGTERM: finish if there is time, else end the stream properly
                    stop_at = stop_at or time.monotonic() + max(0.0, drain_s - END_MARGIN_S)
                    if time.monotonic() >= stop_at:
                        raise ModelUnavailable("the server is shutting down; retry on another instance",
                                               headers={"Retry-After": "5"})
        except ChatVLMError as exc:
            request_context.note_failure(exc.status_code)
            held.extend(_encode(data) for data in on_error(exc))
        except Exception:  # noqa: BLE001 - a bug mid-stream: say so, then end the stream properly
            log.exception("generation failed mid-stream")
            request_context.note_failure(500)
            held.extend(_encode(data) for data in on_error(ServerError("internal error during generation")))
        finally:
            await deltas.aclose()
        held.extend(_encode(data) for data in end())
        if held:  # never an empty chunk: in chunked encoding it would end the response
            yield b"".join(held)

    return EventSourceResponse(events(), ping=KEEPALIVE_S, sep=SEP, headers=headers,
                               shutdown_event=shutdown, shutdown_grace_period=max(drain_s, END_MARGIN_S),
                               ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep=SEP))


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # one encoder, not one per event


def _encode(data: Any) -> bytes:
    """One event's bytes: a dict as JSON on one ``data:`` line (JSON escapes line breaks), other
    data through sse-starlette's encoder (a line break in it starts a new ``data:`` line)."""
    if isinstance(data, dict):
        return ("data: " + _JSON.encode(data) + SEP + SEP).encode()
    return ServerSentEvent(data=data, sep=SEP).encode()
