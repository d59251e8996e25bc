"""LLaMA-Local surface (seed 000): request and response schemas, their conversion to the
generation service's types, and the plain-text SSE serializers (``data: <piece>`` ... ``data: [DONE]``)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from core.errors import ChatVLMError
from llm.service import ModelInfo
from llm.types import ChatMessage, StreamDelta, Usage
from models.adapter import ModelSpec
from server.schemas.json_types import JsonBool, JsonFloat, json_int
from server.schemas.sse_doc import marker, sse_response

DONE = "[DONE]"


def default_to_none(model: str | None) -> str | None:
    """``"default"`` (seed 002's Python example) or an empty name means the configured default model."""
    return None if model is None or model.strip() in ("", "default") else model


class UserPrompt(BaseModel):
    """A prompt sent to the model as one user turn (its chat template applied), and the model."""

    prompt: str = Field(min_length=1, description="The user's message; the model's chat template is applied")
    model: str | None = Field(None, description='Model id; none or "default": the configured text model')

    @field_validator("model")
    @classmethod
    def _default_model(cls, v: str | None) -> str | None:
        return default_to_none(v)

    def messages(self) -> list[ChatMessage]:
        return [ChatMessage("user", self.prompt)]


class GenerateRequest(UserPrompt):
    """Seed 000's ``POST /generate`` body; unset parameters take the model's configured defaults."""

    temperature: JsonFloat | None = Field(None, ge=0.0, le=2.0, description="0 means greedy")
    max_tokens: json_int(ge=1, le=4096) | None = Field(None, description="Upper bound on generated tokens")
    top_p: JsonFloat | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling")
    top_k: json_int(ge=1, le=100) | None = Field(None, description="Top-K sampling")
    repeat_penalty: JsonFloat | None = Field(None, ge=1.0, le=2.0, description="Repetition penalty (1.0: none)")
    stream: JsonBool = Field(True, description="Server-Sent Events (default) or one JSON answer")

    def param_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``GenerationService.params_for`` (None: the model's default)."""
        return {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repeat_penalty}


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> "UsageBody":
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens)


class GenerateResponse(BaseModel):
    text: str
    prompt: str
    usage: UsageBody
    model: str = Field(description="The model that served the request")
    finish_reason: str = Field(description='"stop" (end of reply or a stop sequence) or "length" (max_tokens)')


class ModelInfoResponse(BaseModel):
    path: str = Field(description="The model's weights folder name (or its id), never a full path")
    loaded: bool
    n_ctx: int | None = Field(description="Context length in tokens (known once the model is loaded)")
    n_gpu_layers: int = Field(description="-1 when the model runs on a GPU, 0 on the CPU")
    temperature: float
    top_p: float
    top_k: int = Field(description="0 means top-k sampling is off")
    repeat_penalty: float
    max_tokens: int
    stream: bool
    model: str = Field(description="Registry id of the model")
    name: str = Field(description="Human-readable model name")

    @classmethod
    def of(cls, info: ModelInfo, spec: ModelSpec, device: str) -> "ModelInfoResponse":
        d = info.defaults
        return cls(path=spec.path.name if spec.path is not None else info.id, loaded=info.loaded,
                   n_ctx=info.context_length, n_gpu_layers=-1 if device.startswith("cuda") else 0,
                   temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, repeat_penalty=d.repetition_penalty,
                   max_tokens=d.max_new_tokens, stream=True, model=info.id, name=info.name)


# ---- SSE serializers (server.sse.sse_response) ------------------------------------------------
def delta_events(delta: StreamDelta) -> list[str]:
    """A text piece as one event; empty pieces (e.g. the final delta) send nothing."""
    return [delta.text] if delta.text else []


def error_events(exc: ChatVLMError) -> list[str]:
    """One line (the seed's clients read ``[ERROR]...`` line by line), then the end marker follows."""
    return ["[ERROR] " + " ".join(exc.message.split())]


def end_events() -> list[str]:
    return [DONE]


STREAM_EXAMPLE = "data: Машинное\n\ndata:  обучение\n\ndata:  -\n\ndata:  это\n\ndata: [DONE]\n\n"

STREAM_DOC = sse_response(
    "With `stream: true` (the default): `data: <text piece>` events, then `data: [DONE]`; a failure "
    "mid-stream sends `data: [ERROR] <message>` first. With `stream: false`: one JSON answer.",
    marker(DONE, "End of the stream"),
    {"type": "string", "pattern": r"^\[ERROR\] ", "description": "A failure after the stream started; "
     "`[DONE]` follows"},
    {"type": "string", "description": "A piece of the reply, as plain text (a piece with newlines is "
     "sent as several `data:` lines of one event)"},
    example=STREAM_EXAMPLE, title="LlamaLocalStreamEvent")
