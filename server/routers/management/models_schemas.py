"""Schemas of the model registry routes (seed 004's fields, plus what serving adds)."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_CONFIG_BYTES = 16 * 1024
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64)]
STATUSES = ("created", "starting", "running", "stopping", "stopped", "error")


class ResourceRequirements(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    gpu_count: int = Field(0, ge=0, le=64)
    gpu_memory: float = Field(0, ge=0, le=10_000_000, description="MB")
    cpu_cores: float = Field(0, ge=0, le=4096)
    memory: float = Field(0, ge=0, le=100_000_000, description="MB")


def _small_object(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value, ensure_ascii=False).encode("utf-8")) > MAX_CONFIG_BYTES:
        raise ValueError(f"config is larger than {MAX_CONFIG_BYTES // 1024} KB")
    return value


class _ModelFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    display_name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    priority: int | None = Field(None, ge=0, le=100)
    config: dict[str, Any] | None = Field(None, description="model_path (a folder or .gguf file inside models_dir "
                                          "or management.model_roots); serving keys temperature, top_p, top_k, "
                                          "max_tokens, repetition_penalty, dtype, device, concurrency, "
                                          "max_batch_size, max_queue, threads, max_pixels, min_pixels; others kept "
                                          "as given (at most 16 KB)")
    resource_requirements: ResourceRequirements | None = None
    tags: list[Tag] | None = Field(None, max_length=32)

    @field_validator("config")
    @classmethod
    def _config_size(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return v if v is None else _small_object(v)


class CreateModelRequest(_ModelFields):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="The model's id on every surface")
    framework: str = Field(max_length=32, description="transformers, gguf, rapidocr or tesseract (local), or "
                                                      "vllm, sglang, llama.cpp, openai: a remote OpenAI-protocol "
                                                      "server, config {base_url (one URL or a list), api_key, "
                                                      "remote_model, max_concurrency, timeout_s, vision}")


class UpdateModelRequest(_ModelFields):
    """Only the fields given change. config replaces the whole config object."""


class CreatedModel(BaseModel):
    id: str
    name: str
    status: Literal["created"] = "created"
    message: str


class ModelItem(BaseModel):
    id: str = Field(description="model-<hex> for models created here; the name for config.yaml's")
    name: str
    display_name: str
    description: str
    framework: str
    kind: str
    source: Literal["config", "api"]
    status: str = Field(description="created, starting, running, stopping, stopped or error")
    health: str = Field(description="healthy, unhealthy or unknown")
    health_checked_at: datetime | None = Field(None, description="The last health probe of the running model "
                                                                 "(every health_check_interval seconds)")
    reason: str | None = Field(None, description="Why the model is in error, or cannot be served")
    installed: bool
    tasks: list[str]
    priority: int
    created_at: datetime
    updated_at: datetime
    config: dict[str, Any]
    resource_requirements: dict[str, Any]
    resource_usage: dict[str, Any]
    tags: list[str]


class ModelDetail(ModelItem):
    performance_stats: dict[str, Any]


class ModelPage(BaseModel):
    items: list[ModelItem]
    total: int
    page: int
    size: int
    pages: int
