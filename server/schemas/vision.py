"""Response schemas of the vision core surface (seed 003), as OpenAPI documents them."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    detail: str = Field(description="What went wrong, for people")
    code: str = Field(description="Stable machine-readable error code")
    param: str | None = Field(None, description="The offending parameter, when there is one")


class RootResponse(BaseModel):
    message: str
    version: str
    docs: str
    health: str


class ProbeResponse(BaseModel):
    status: Literal["ok", "draining", "not_ready"]
    reason: str | None = None


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    model_loaded: bool
    models_loaded: int
    loaded_models: list[str]
    gpu_available: bool
    gpu_name: str | None
    device: str
    memory_usage: str
    active_connections: int


class AvailableModel(BaseModel):
    id: str
    name: str
    params: str
    kind: str
    tasks: list[str]
    installed: bool
    loaded: bool
    status: Literal["unloaded", "loading", "loaded", "failed"]
    reason: str | None = Field(None, description="Why the model cannot serve, when it cannot")


class SpecModel(BaseModel):
    name: str
    format: str
    size: str | None
    loaded: bool
    memory_usage: str | None


class ModelsResponse(BaseModel):
    available: list[AvailableModel]
    loaded: list[str]
    models: list[SpecModel]


class ModelActionResponse(BaseModel):
    status: Literal["success"]
    message: str
    load_time: float | None = None
    memory_usage: str | None = None


class Block(BaseModel):
    text: str
    box: list[int] | None = Field(None, description="[x1, y1, x2, y2] in original image pixels")
    confidence: float | None = None
    category: str | None = None
    page: int = 0


class OcrResponse(BaseModel):
    text: str
    model: str = Field(description="The model that actually served the request")
    processing_time: float
    image_size: list[int] = Field(description="[width, height] of the uploaded image as displayed")
    language: str | None
    pages: int = 1
    blocks: list[Block] = []


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    response: str
    model: str
    processing_time: float
    prompt: str
    image_size: list[int] | None = None
    finish_reason: str
    usage: ChatUsage


class BatchItemResponse(BaseModel):
    filename: str
    status: Literal["success", "error"]
    text: str = ""
    processing_time: float
    model: str | None = None
    image_size: list[int] | None = None
    blocks: list[Block] = []
    error: str | None = None
    code: str | None = None


class BatchOcrResponse(BaseModel):
    results: list[BatchItemResponse]
    total: int
    successful: int
    failed: int
    model: str | None = None
    processing_time: float


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {s: {"model": ErrorDetail, "description": _DESCRIPTIONS[s]} for s in statuses}


_DESCRIPTIONS = {
    400: "Bad parameters", 404: "Unknown model", 413: "File or request too large",
    415: "Unsupported image format", 422: "Validation error",
    503: "Model not installed, failed to load, or overloaded (see Retry-After)",
    504: "The request deadline passed",
}
