"""Per-model inference schemas of seed 004: generate (JSON or SSE) and its stream serializer."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from core.errors import ChatVLMError
from llm.types import GenerateOutput, StreamDelta

StopText = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=200_000, description="Raw text to continue (no chat template)")
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000, description="0: off")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stop: StopText | Annotated[list[StopText], Field(max_length=16)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False

    def overrides(self) -> dict[str, Any]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "stop": stop or None,
                "seed": self.seed}


class Choice(BaseModel):
    text: str
    finish_reason: str
    index: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    choices: list[Choice]
    usage: Usage
    created: int


def generate_response(out: GenerateOutput) -> GenerateResponse:
    u = out.usage
    return GenerateResponse(id=f"gen-{uuid.uuid4().hex[:16]}", model=out.model,
                            choices=[Choice(text=out.text, finish_reason=out.finish_reason)],
                            usage=Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                        total_tokens=u.total_tokens), created=int(time.time()))


class StreamEvent(BaseModel):
    id: str
    choices: list[dict[str, Any]] = Field(description='[{"text", "index"}]; the last one adds "finish_reason"')
    usage: Usage | None = None


class GenerateChunks:
    """Serializers for ``server.sse.sse_response``: ``{"id","choices":[{"text","index"}]}`` events, then
    ``[DONE]``; an error mid-stream is ``{"id","error":{"code","message"}}`` before ``[DONE]``."""

    def __init__(self) -> None:
        self.id = f"gen-{uuid.uuid4().hex[:16]}"

    def on_delta(self, delta: StreamDelta) -> list[dict[str, Any]]:
        events = []
        if delta.text:
            events.append({"id": self.id, "choices": [{"text": delta.text, "index": 0}]})
        if delta.finish_reason:
            u = delta.usage
            usage = None if u is None else {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                                            "total_tokens": u.total_tokens}
            events.append({"id": self.id, "choices": [{"text": "", "index": 0, "finish_reason": delta.finish_reason}],
                           "usage": usage})
        return events

    def on_error(self, exc: ChatVLMError) -> list[dict[str, Any]]:
        return [{"id": self.id, "error": {"code": exc.code, "message": exc.message}}]

    def end(self) -> list[str]:
        return ["[DONE]"]
