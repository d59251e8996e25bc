"""A model's log lines (seed 004), and ``follow=true``: the last lines, then new ones as SSE."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse

from management.logbook import LogLine
from server.routers.management.common import CurrentUser, ManagementDep, error_responses
from server.schemas.sse_doc import json_data, sse_response

router = APIRouter(tags=["management: logs"])

KEEPALIVE_S = 15


class LogOut(BaseModel):
    timestamp: datetime
    level: str
    message: str


class LogsResponse(BaseModel):
    logs: list[LogOut]


def _out(line: LogLine) -> LogOut:
    return LogOut(timestamp=line.timestamp, level=line.level, message=line.message)


@router.get("/models/{model_id}/logs", response_model=LogsResponse, responses={
    **sse_response("With follow=true: the last `lines` lines, then each new line, one `data: {timestamp, level, "
                   "message}` event each, until the client leaves.", json_data(LogOut),
                   example='data: {"timestamp":"2026-12-01T12:00:00Z","level":"INFO","message":"running"}\n\n'),
    **error_responses(404, 422)})
async def logs(model_id: str, _: CurrentUser, mgmt: ManagementDep,
               lines: Annotated[int, Query(ge=0, le=100_000)] = 100, follow: bool = False):
    """Lifecycle events, warnings, errors and request summaries of a model (never prompts or keys)."""
    entry = mgmt.catalog.get(model_id)
    recent = [_out(line) for line in mgmt.logbook.recent(entry.id, lines)]
    if not follow:
        return LogsResponse(logs=recent)
    new_lines = mgmt.logbook.follow(entry.id)  # subscribed before the reply starts: no line falls between

    async def events():
        try:
            for line in recent:
                yield ServerSentEvent(data=line.model_dump_json())
            async for line in new_lines:
                yield ServerSentEvent(data=_out(line).model_dump_json())
        finally:
            new_lines.close()

    return EventSourceResponse(events(), ping=KEEPALIVE_S, sep="\n")
