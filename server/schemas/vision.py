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


class TableCell(BaseModel):
    row: int = Field(description="0-based row of the cell's top-left corner")
    col: int = Field(description="0-based column of the cell's top-left corner")
    rowspan: int = 1
    colspan: int = 1
    text: str
    box: list[int] = Field(description="[x1, y1, x2, y2] in original page pixels")


class Block(BaseModel):
    text: str
    box: list[int] | None = Field(None, description="[x1, y1, x2, y2] in original page pixels "
                                  "(a PDF page as rendered at limits.pdf_dpi)")
    confidence: float | None = Field(None, description="0..1, when the engine gives one")
    category: str | None = Field(None, description="Layout category (Title, Table, ...), when the model gives one")
    page: int = Field(0, description="0-based page (PDF page or TIFF frame)")
    reading_order: int = Field(0, description="0-based position of the block in its page's reading order")
    cells: list[TableCell] | None = Field(None, description="A table's cells (doc_cpu): its text is then HTML")


class PageResult(BaseModel):
    page: int = Field(description="0-based page index")
    text: str
    blocks: list[Block] = []
    image_size: list[int] = Field(description="[width, height] of the page in original pixels")


class OcrResponse(BaseModel):
    text: str = Field(description="The text of all pages, joined by blank lines")
    model: str = Field(description="The model that actually served the request")
    processing_time: float
    image_size: list[int] = Field(description="[width, height] of the uploaded image as displayed "
                                  "(of the first page for a multi-page document)")
    language: str | None
    pages: int = Field(1, description="Number of pages read")
    blocks: list[Block] = []
    format: Literal["text", "markdown", "json"] = "text"
    markdown: str | None = Field(None, description="The document as markdown (format=markdown)")
    page_results: list[PageResult] | None = Field(None, description="One result per page "
                                                  "(multi-page input or format=json)")
    requested_model: str | None = Field(None, description="The model the request named, when another one "
                                        "served it (routing.ocr_fallback; also in X-Model-Fallback)")
    fallback_reason: str | None = Field(None, description="Why the named model did not serve")


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
    pages: int | None = None
    markdown: str | None = None
    page_results: list[PageResult] | None = None
    error: str | None = None
    code: str | None = None


class BatchOcrResponse(BaseModel):
    results: list[BatchItemResponse]
    total: int
    successful: int
    failed: int
    model: str | None = None
    processing_time: float
    requested_model: str | None = Field(None, description="The model the request named, when another one served it")
    fallback_reason: str | None = None


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {s: {"model": ErrorDetail, "description": _DESCRIPTIONS[s]} for s in statuses}


_DESCRIPTIONS = {
    400: "Bad parameters, or an undecodable image or PDF (INVALID_PDF, PDF_ENCRYPTED)", 404: "Unknown model", 413: "File, image or PDF page too large, or too many pages",
    415: "Unsupported image format", 422: "Validation error (a bad format, region or page)",
    503: "Model not installed, failed to load, or overloaded (see Retry-After)",
    504: "The request deadline passed",
    502: "A remote engine failed (BAD_GATEWAY)",
}
