"""Responses of the OpenAI-compatible surface (/v1): completions, stream chunks, the model list and
the error shape, as OpenAPI documents them, and their serializers from the generation service's types."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.errors import ChatVLMError
from llm.types import GenerateOutput, StreamDelta, Usage
from server.errors import Surface, error_body
from server.schemas.sse_doc import json_data, marker, sse_response


# ---- responses ---------------------------------------------------------------------------
class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str = Field(description="'stop' (end of reply or a stop sequence) or 'length' (max_tokens)")
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<hex>")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time")
    model: str = Field(description="The model that served the request")
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(description="cmpl-<hex>")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    system_fingerprint: None = None


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the weights were installed (0 when unknown)")
    owned_by: str = "chatvlm"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, server_error, ...")
    param: str | None
    code: str | None = Field(description="Stable machine-readable code, e.g. MODEL_NOT_FOUND")


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


_ERROR_DESCRIPTIONS = {
    400: "Bad or unsupported parameters (code VALIDATION_ERROR, UNSUPPORTED_PARAMETER, INVALID_IMAGE_URL, "
         "IMAGE_URL_NOT_ALLOWED, IMAGE_FETCH_FAILED, ...)",
    404: "Unknown model", 413: "Request or image too large", 415: "Unsupported image format",
    503: "Model not installed, failed to load, or overloaded (see Retry-After)",
    504: "The request deadline passed, or fetching an image URL timed out",
    502: "A remote engine failed (BAD_GATEWAY)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a /v1 route can answer (OpenAI's error shape)."""
    return {s: {"model": OpenAIError, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses}


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="In the first chunk only")
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta = Field(description="Empty in the chunk that carries finish_reason")
    logprobs: None = None
    finish_reason: str | None


class _StreamChunk(BaseModel):
    """The fields every stream event of both endpoints carries."""

    id: str
    created: int
    model: str
    system_fingerprint: None = None
    usage: CompletionUsage | None = Field(None, description="With stream_options.include_usage: null but in the "
                                                            "last chunk")


class ChatCompletionChunk(_StreamChunk):
    """One event of a chat completion stream."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice] = Field(description="Empty in the usage chunk")


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionChunk(_StreamChunk):
    """One event of a completion stream."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice] = Field(description="Empty in the usage chunk")


def stream_response_doc(chunk: type[BaseModel], example: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entry for the 200 answer: JSON, or Server-Sent Events with ``stream: true``."""
    obj = chunk.model_fields["object"].annotation.__args__[0]
    return sse_response(
        f"The completion; with `stream: true`, Server-Sent Events: one `{obj}` JSON object per `data:` line, a last "
        "chunk with `finish_reason`, a usage chunk with empty `choices` when `stream_options.include_usage`, then "
        "`data: [DONE]`. An error after the stream started is a `data: {\"error\": {...}}` event, then "
        "`data: [DONE]`.",
        marker("[DONE]", "End of the stream"), json_data(chunk, OpenAIError), example=example,
        title=f"{chunk.__name__}Event")


# ---- domain -> wire ----------------------------------------------------------------------
def _usage(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage(0, 0)
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def chat_completion(out: GenerateOutput) -> ChatCompletion:
    return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=out.model,
                          choices=[ChatChoice(index=0, message=AssistantMessage(content=out.text),
                                              finish_reason=out.finish_reason)],
                          usage=CompletionUsage(**_usage(out.usage)))


def completion(out: GenerateOutput) -> Completion:
    return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=out.model,
                      choices=[CompletionChoice(text=out.text, index=0, finish_reason=out.finish_reason)],
                      usage=CompletionUsage(**_usage(out.usage)))


class _Chunks:
    """The three serializers of one stream for ``server.sse.sse_response``. All chunks share
    the id and creation time; with include_usage every chunk carries ``usage`` (null but the last)."""

    object = ""
    id_prefix = ""

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._started = False

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                                 "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = _usage(usage) if usage is not None else None
        return chunk

    def _start(self) -> list[dict[str, Any]]:
        return []

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def on_delta(self, delta: StreamDelta) -> list[dict[str, Any]]:
        events = [] if self._started else self._start()
        self._started = True
        if delta.text:
            events.append(self._chunk([self._choice(delta.text, None)]))
        if delta.finish_reason:
            events.append(self._chunk([self._choice("", delta.finish_reason)]))
            if self.include_usage:
                events.append(self._chunk([], delta.usage or Usage(0, 0)))
        return events

    def on_error(self, exc: ChatVLMError) -> list[dict[str, Any]]:
        return [error_body(Surface.OPENAI, exc.status_code, exc.code, exc.message, exc.param)]

    def end(self) -> list[str]:
        return ["[DONE]"]


class ChatChunks(_Chunks):
    object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def _start(self) -> list[dict[str, Any]]:
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": finish_reason}


class CompletionChunks(_Chunks):
    object = "text_completion"
    id_prefix = "cmpl"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
