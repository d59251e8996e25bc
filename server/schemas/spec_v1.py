"""Spec v1 surface (seed 002, ``/api/v1``): request and response schemas, their conversion to the
generation service's types, the JSON SSE serializer (``{"token", "finished"}`` events) and the
error shape ``{"error": {"code", "message", "details"}}`` as OpenAPI documents it."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field, StringConstraints, WithJsonSchema

from core.errors import BadRequest, ChatVLMError
from llm.types import StreamDelta
from server.schemas.json_types import JsonBool, JsonFloat, Seed, json_int
from server.schemas.llama_local import UsageBody, UserPrompt
from server.schemas.sse_doc import json_data, sse_response

MAX_BATCH = 32
MAX_STOP = 16

StopText = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class GenerationFields(UserPrompt):
    """A prompt and its sampling parameters; unset parameters take the model's configured defaults."""

    max_tokens: json_int(ge=1, le=32768) | None = Field(None, description="Upper bound on generated tokens")
    temperature: JsonFloat | None = Field(None, ge=0.0, le=2.0, description="0 means greedy")
    top_p: JsonFloat | None = Field(None, ge=0.0, le=1.0)
    top_k: json_int(ge=0, le=1000) | None = Field(None, description="0 turns top-k sampling off")
    repetition_penalty: JsonFloat | None = Field(None, gt=0.0, le=2.0, description="1.0: none (alias repeat_penalty)",
                                                 validation_alias=AliasChoices("repetition_penalty",
                                                                               "repeat_penalty"))
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Text(s) that end the reply; not included in it")
    seed: Seed | None = Field(None, description="Makes sampling reproducible (any size: taken modulo 2**63)")

    def param_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``GenerationService.params_for`` (None: the model's default)."""
        stop = None if self.stop is None else ((self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        return {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "stop": stop or None,
                "seed": self.seed}


class GenerateRequest(GenerationFields):
    stream: JsonBool = Field(False, description="true: answer the Server-Sent Events of /api/v1/generate/stream")


class GenerateResponse(BaseModel):
    text: str
    usage: UsageBody
    latency: float = Field(description="Seconds from submission to the last token")
    model: str = Field(description="The model that served the request")
    finish_reason: str = Field(description='"stop" (end of reply or a stop sequence) or "length" (max_tokens)')


# ---- streaming ---------------------------------------------------------------------------------
class V1StreamSerializer:
    """Serializers for ``server.sse.sse_response``: token events, then one final event with
    ``finished: true``, ``finish_reason`` and ``usage``; a failure mid-stream is the final event instead."""

    def __init__(self) -> None:
        self.finished = False

    def on_delta(self, delta: StreamDelta) -> list[dict]:
        events: list[dict] = []
        if delta.text:
            events.append({"token": delta.text, "finished": False})
        if delta.finish_reason:
            self.finished = True
            usage = UsageBody.of(delta.usage).model_dump() if delta.usage else None
            events.append({"token": "", "finished": True, "finish_reason": delta.finish_reason, "usage": usage})
        return events

    def on_error(self, exc: ChatVLMError) -> list[dict]:
        self.finished = True
        return [{"error": {"code": exc.code, "message": exc.message}, "finished": True}]

    def end(self) -> list[dict]:
        # The engine always ends with a finish_reason; should it not, the client still sees the end.
        return [] if self.finished else [{"token": "", "finished": True, "finish_reason": None, "usage": None}]


class TokenEvent(BaseModel):
    token: str = Field(description="The next piece of the reply (never empty)")
    finished: Literal[False]


class FinalEvent(BaseModel):
    token: Literal[""]
    finished: Literal[True]
    finish_reason: str | None = Field(description='"stop" or "length"')
    usage: UsageBody | None


class StreamErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable error code")
    message: str


class ErrorEvent(BaseModel):
    """The last event when generation fails after the stream started."""

    error: StreamErrorInfo
    finished: Literal[True]


STREAM_EXAMPLE = ('data: {"token":"人","finished":false}\n\ndata: {"token":"工","finished":false}\n\n'
                  'data: {"token":"","finished":true,"finish_reason":"length",'
                  '"usage":{"prompt_tokens":15,"completion_tokens":2,"total_tokens":17}}\n\n')


def streamed_200(what: str) -> dict[int | str, dict]:
    return sse_response(what, json_data(TokenEvent, FinalEvent, ErrorEvent), example=STREAM_EXAMPLE,
                        title="SpecV1StreamEvent")


# ---- models ------------------------------------------------------------------------------------
class ModelItem(BaseModel):
    name: str = Field(description="Model id, as the other routes take it")
    format: str = Field(description="Weight format: safetensors, onnx, traineddata")
    size: str | None = Field(description="Weights on disk (None: shipped inside a package)")
    loaded: bool
    memory_usage: str | None = Field(description="Memory the loaded weights take")
    display_name: str
    kind: str
    tasks: list[str] = Field(description="ocr, chat (image + prompt), generate (text)")
    installed: bool
    status: Literal["unloaded", "loading", "loaded", "failed"]
    reason: str | None = Field(None, description="Why the model cannot serve, when it cannot")


class ModelsResponse(BaseModel):
    models: list[ModelItem]


# The seed's load-time quantization names -> what the engine runs (models/precision.py).
# None keeps the model's configured quantization; int8 / q8_0 load int8 weight-only; int4 /
# q4_0 / q4_1 load int4 weight-only (groups of 32, Q4_1's layout; the CPU kernel).
QUANTIZATION_MAP: dict[str | None, str | None] = {None: None, "none": "none", "int8": "int8_weight_only",
                                                  "q8_0": "int8_weight_only",
                                                  "int8_weight_only": "int8_weight_only",
                                                  "int4": "int4_weight_only", "q4_0": "int4_weight_only",
                                                  "q4_1": "int4_weight_only",
                                                  "int4_weight_only": "int4_weight_only"}
QUANTIZATIONS: list[str | None] = list(QUANTIZATION_MAP)


class LoadRequest(BaseModel):
    # Any string parses, so that a quantization the server lacks (the seed sends "q4_0") gets the
    # specific 400 below rather than a generic validation error; the schema lists what works.
    quantization: Annotated[str | None, WithJsonSchema({"enum": QUANTIZATIONS})] = Field(
        None, description='null: as configured; "none": the model\'s dtype unquantized; "int8", "q8_0" or '
                          '"int8_weight_only": int8 weight-only; "int4", "q4_0", "q4_1" or "int4_weight_only": int4 '
                          'weight-only, on the CPU (anything else: 400 QUANTIZATION_UNSUPPORTED). '
                          "A loaded model at another quantization is reloaded.")
    prefer_gpu: JsonBool | None = Field(None, description="Ask for a GPU; without one the model loads on the CPU")

    def check(self) -> None:
        """Reject what cannot be honoured, before anything is loaded."""
        if self.quantization not in QUANTIZATION_MAP:
            raise BadRequest(f"Quantization '{self.quantization}' is not supported: models load at their "
                             "configured dtype, optionally int8 or int4 weight-only", param="quantization",
                             code="QUANTIZATION_UNSUPPORTED", details={"supported": QUANTIZATIONS})

    @property
    def engine_quantization(self) -> str | None:
        """The registry's quantization value this request asks for (None: as configured)."""
        return QUANTIZATION_MAP[self.quantization]

    def device_warning(self, model_id: str, device: str, configured: str, gpu_available: bool) -> str | None:
        """Say when the device the model runs on is not the one asked for."""
        on_gpu = device.startswith("cuda")
        if self.prefer_gpu and not on_gpu:
            if gpu_available:
                return f"loaded on the CPU: models.{model_id}.device is '{configured}'"
            return "no GPU is available: loaded on the CPU"
        if self.prefer_gpu is False and on_gpu:
            return (f"loaded on {device} as configured: prefer_gpu=false does not move a model to the CPU "
                    f"(set models.{model_id}.device: cpu)")
        return None


class LoadResponse(BaseModel):
    status: Literal["loaded"]
    model: str
    device: str = Field(description="cpu, cuda or cuda:N")
    load_time: float = Field(description="Seconds the load took")
    memory_usage: str | None
    memory_bytes: int
    already_loaded: bool = Field(description="The model was loaded before this call")
    warning: str | None = Field(None, description="Why the device differs from the one asked for")
    precision: str | None = Field(None, description="What the model runs at, e.g. bfloat16 or "
                                                    "bfloat16+int8_weight_only (transformers models)")


class UnloadResponse(BaseModel):
    status: Literal["unloaded"]
    model: str
    was_loaded: bool


# ---- batch -------------------------------------------------------------------------------------
class BatchRequest(BaseModel):
    # The whole batch is validated up front: an invalid item is a 422 naming it (requests.<i>.<field>);
    # per-item errors are left for what fails at run time (unknown model, overload, deadline, ...).
    requests: list[GenerationFields] = Field(
        min_length=1, max_length=MAX_BATCH, description=f"1 to {MAX_BATCH} generation requests, run concurrently")


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. MODEL_NOT_FOUND")
    message: str
    details: Any = None

    @classmethod
    def of(cls, exc: ChatVLMError) -> "ErrorInfo":
        return cls(code=exc.code, message=exc.message, details=exc.details)


class BatchResult(BaseModel):
    text: str
    usage: UsageBody
    finish_reason: str
    latency: float
    model: str


class BatchError(BaseModel):
    error: ErrorInfo


class BatchResponse(BaseModel):
    results: list[BatchResult | BatchError] = Field(description="One per request, in order")
    total: int
    successful: int
    failed: int


# ---- errors in OpenAPI ---------------------------------------------------------------------------
class SpecError(BaseModel):
    error: ErrorInfo


_DESCRIPTIONS = {
    400: "Bad parameters (codes such as BAD_REQUEST, QUANTIZATION_UNSUPPORTED), or a prompt longer than the "
         "model's context",
    404: "Unknown model (MODEL_NOT_FOUND), or a model that cannot do this task (MODEL_CAPABILITY_MISSING)",
    413: "Request too large",
    422: "Validation error (VALIDATION_ERROR; `param` names the field, e.g. requests.2.prompt in a batch)",
    503: "Model not installed, failed to load, or overloaded (see Retry-After)",
    504: "The request deadline passed",
    502: "A remote engine failed (BAD_GATEWAY; its 504 is GATEWAY_TIMEOUT, no healthy URL 503 BACKEND_UNAVAILABLE)",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route can answer, in this surface's shape."""
    return {s: {"model": SpecError, "description": _DESCRIPTIONS[s]} for s in statuses}
