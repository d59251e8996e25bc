"""One streaming pipeline for every SSE surface: typed deltas in, the surface's events out.

Each surface gives three small serializers (a delta, an error, the end marker). A failure
after the stream has started becomes an error event followed by the end marker, never a
silent close. Keep-alive comments go out on slow streams, and a client that disconnects
cancels the generation (closing the delta iterator cancels the engine request).
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse

from core.errors import ChatVLMError, ModelUnavailable, ServerError
from llm.types import StreamDelta

log = logging.getLogger("chatvlm.sse")

KEEPALIVE_S = 15
SHUTDOWN_GRACE_S = 3.0  # a generating stream gets this long to send its error event and end marker
SEP = "\n"  # LF framing: what naive clients (seed 002's JS example) split on

Events = Iterable[Any]  # each item is the `data` of one event (str, or JSON-able dict)


def sse_response(deltas: AsyncIterator[StreamDelta], *, on_delta: Callable[[StreamDelta], Events],
                 on_error: Callable[[ChatVLMError], Events], end: Callable[[], Events],
                 headers: dict[str, str] | None = None) -> EventSourceResponse:
    shutdown = anyio.Event()  # set by sse-starlette when the server begins to shut down

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async for delta in deltas:
                for data in on_delta(delta):
                    yield _event(data)
                if shutdown.is_set():  # SIGTERM: end the stream properly instead of being cut
                    raise ModelUnavailable("the server is shutting down; retry on another instance",
                                           headers={"Retry-After": "5"})
        except ChatVLMError as exc:
            for data in on_error(exc):
                yield _event(data)
        except Exception:  # noqa: BLE001 - a bug mid-stream: say so, then end the stream properly
            log.exception("generation failed mid-stream")
            for data in on_error(ServerError("internal error during generation")):
                yield _event(data)
        finally:
            await deltas.aclose()
        for data in end():
            yield _event(data)

    return EventSourceResponse(events(), ping=KEEPALIVE_S, sep=SEP, headers=headers,
                               shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S,
                               ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep=SEP))


def _event(data: Any) -> ServerSentEvent:
    if isinstance(data, dict):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return ServerSentEvent(data=data, sep=SEP)
