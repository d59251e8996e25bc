"""Schemas of the EasyVizAI local LLM surface (seed 001): the REST bodies, and the
WebSocket chat frames (documented here; the socket itself is not in OpenAPI)."""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.types import GenerationParams
from server.schemas.json_types import JsonBool, JsonFloat, Seed, json_int
from server.schemas.sse_doc import json_data, sse_response

# The seed's documented defaults ("参数说明"): sampling at temperature 0.7 and top_p 0.9, up to
# 2048 tokens (clamped to the room left in the model's context). Other controls (top_k,
# repetition penalty) keep the model's configured defaults.
SEED_TEMPERATURE = 0.7
SEED_TOP_P = 0.9
SEED_MAX_LENGTH = 2048
MAX_PROMPT_CHARS = 200_000


class LlmError(BaseModel):
    error: str = Field(description="What went wrong, for people")
    code: str = Field(description="Stable machine-readable error code")


# ---- generation -------------------------------------------------------------------------
class GenerationParameters(BaseModel):
    """The seed's parameters, plus the engine's other sampling controls. Unset temperature,
    top_p and max_length take the seed's documented defaults (0.7, 0.9, 2048); the others
    take the model's configured defaults."""

    temperature: JsonFloat | None = Field(None, ge=0.0, le=2.0,
                                          description="Randomness; 0 means greedy (default 0.7)")
    top_p: JsonFloat | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling (default 0.9)")
    max_length: json_int(ge=1, le=4096) | None = Field(
        None, description="Maximum number of generated tokens (default 2048, within the model's context)")
    do_sample: JsonBool | None = Field(None, description="false forces greedy decoding (default true)")
    top_k: json_int(ge=0, le=1000) | None = Field(None, description="0 turns top-k off")
    repetition_penalty: JsonFloat | None = Field(None, ge=0.5, le=2.0)
    seed: Seed | None = Field(None, description="Makes sampling reproducible (any size: taken modulo 2**63)")
    stop: list[str] | None = Field(None, max_length=4, description="Generation ends before any of these")

    def apply(self, base: GenerationParams) -> GenerationParams:
        """These parameters, or the seed's defaults, on top of the model's defaults."""
        temperature = SEED_TEMPERATURE if self.temperature is None else self.temperature
        if self.do_sample is False:
            temperature = 0.0
        given = {"temperature": temperature, "top_p": SEED_TOP_P if self.top_p is None else self.top_p,
                 "max_new_tokens": SEED_MAX_LENGTH if self.max_length is None else self.max_length,
                 "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                 "stop": tuple(s for s in self.stop if s) if self.stop is not None else None}
        return replace(base, **{k: v for k, v in given.items() if v is not None})


class LlmGenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Sent to the model as a user message")
    model: str | None = Field(None, description="Model key; the default text model when absent")
    parameters: GenerationParameters = GenerationParameters()

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "你好，请介绍一下你自己。", "model": "qwen2_5_0_5b",
         "parameters": {"temperature": 0.7, "top_p": 0.9, "max_length": 512}}]})


class LlmUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LlmGenerateResponse(BaseModel):
    response: str
    model: str = Field(description="The model that actually served the request")
    prompt: str
    finish_reason: str = Field(description="stop (end of text or a stop sequence) or length (max_length reached)")
    usage: LlmUsage
    processing_time: float = Field(description="Seconds from submission to the last token")


class LlmChunkEvent(BaseModel):
    chunk: str = Field(description="The next piece of the reply")


class LlmDoneEvent(BaseModel):
    done: Literal[True]


STREAM_DOC = sse_response(
    "Server-sent events: `{\"chunk\"}` pieces, then `{\"done\": true}`; a failure after the start is an "
    "`{\"error\", \"code\"}` event before `{\"done\": true}`",
    json_data(LlmChunkEvent, LlmDoneEvent, LlmError), title="LlmStreamEvent",
    example='data: {"chunk":"你好！"}\n\ndata: {"done":true}\n\n')


# ---- health and models --------------------------------------------------------------------
class LlmHealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    device: str
    loaded_models: list[str] = Field(description="Loaded models that can generate text")
    current_model: str | None = Field(description="The model a request without `model` gets (null: none installed)")
    active_sessions: int = Field(description="WebSocket chat sessions kept in memory")
    websocket_connections: int = Field(description="Open WebSocket chat connections")


class LlmModelSummary(BaseModel):
    key: str
    name: str
    type: str
    installed: bool
    loaded: bool
    status: Literal["unloaded", "loading", "loaded", "failed"]
    reason: str | None = Field(None, description="Why the model cannot serve, when it cannot")


class LlmModelsResponse(BaseModel):
    current_model: str | None
    loaded_models: list[str]
    device: str
    available_models: list[str] = Field(description="Keys of the text models that can serve now (installed)")
    models: list[LlmModelSummary] = Field(description="Every configured text model, installed or not")


class LlmModelConfig(BaseModel):
    name: str = Field(description="Hugging Face repository, or the display name")
    display_name: str
    model_path: str | None
    type: str
    device: str
    max_length: int = Field(description="Default maximum of generated tokens")
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    context_length: int | None = Field(description="Known once the model is loaded")


class LlmModelDetailResponse(BaseModel):
    name: str = Field(description="The model key")
    loaded: bool
    installed: bool
    status: Literal["unloaded", "loading", "loaded", "failed"]
    reason: str | None = None
    active_requests: int | None = Field(None, description="Generations running in the model's engine (when loaded)")
    queued_requests: int | None = Field(None, description="Generations waiting for the engine (when loaded)")
    config: LlmModelConfig


class LlmModelActionResponse(BaseModel):
    message: str
    load_time: float | None = None
    memory_usage: str | None = None


# ---- WebSocket frames (client -> server) ----------------------------------------------------
MAX_CHAT_MESSAGE_CHARS = 32_000


class ChatMessageFrame(BaseModel):
    type: Literal["chat_message"]
    message: str = Field(description="The user's message; must not be blank")
    model: str | None = Field(None, description="For this message only; the session's model when absent")
    stream: JsonBool = Field(True, description="false: no assistant_chunk frames, only the end frame")
    timestamp: str | None = None
    parameters: GenerationParameters = GenerationParameters()


class ModelSwitchFrame(BaseModel):
    type: Literal["model_switch"]
    model: str = Field(min_length=1)


# ---- WebSocket frames (server -> client), for documentation and tests ---------------------------
class ConnectionFrame(BaseModel):
    type: Literal["connection_established"]
    session_id: str
    model: str | None = Field(description="The session's model (null: the default text model)")
    history_turns: int


class AssistantChunkFrame(BaseModel):
    type: Literal["assistant_chunk"]
    chunk: str
    model: str


class AssistantEndFrame(BaseModel):
    type: Literal["assistant_end"]
    model: str
    message: str = Field(description="The whole reply")
    finish_reason: Literal["stop", "length", "cancelled", "error"]
    usage: LlmUsage | None


class ModelSwitchedFrame(BaseModel):
    type: Literal["model_switched"]
    model: str


class ErrorFrame(BaseModel):
    type: Literal["error"]
    error: str
    code: str


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route can answer, in this surface's shape."""
    return {s: {"model": LlmError, "description": _DESCRIPTIONS[s]} for s in statuses}


_DESCRIPTIONS = {
    400: "Bad parameters, or a prompt longer than the model's context",
    404: "Unknown model, or not a text model (MODEL_CAPABILITY_MISSING)", 413: "Request too large",
    422: "Validation error",
    503: "Model not installed, failed to load, or overloaded (see Retry-After)",
    504: "The generation deadline passed",
    502: "A remote engine failed (BAD_GATEWAY)",
}
