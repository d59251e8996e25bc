"""The one small protocol every model implements, and the registry of adapter kinds.

The HTTP layer and the services depend on this protocol only. Adapter classes are
named by import string so that listing models never imports torch or onnxruntime.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from PIL import Image

from core.types import CancelToken, Capability, GenerationParams, OcrResult


@dataclass(frozen=True)
class ModelSpec:
    """Everything an adapter needs to know about one registry entry."""

    id: str
    name: str
    kind: str
    params: str = ""
    hf_repo: str | None = None
    path: Path | None = None
    dtype: str = "auto"
    quantization: str = "auto"
    device: str = "auto"
    max_pixels: int = 1_003_520
    min_pixels: int | None = None  # None: the model's own processor's minimum
    generation: GenerationParams = GenerationParams()
    options: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    max_batch_size: int = 16
    max_queue: int = 64
    threads: int | None = None
    stream_interval_ms: float = 20
    prefix_cache_mb: float = 128
    prefill_chunk_tokens: int = 512
    prefill_slice_share: float = 0.5
    data_dir: Path = Path("data")
    cache_dir: Path = Path("data/cache")  # converted weights (GGUF), shared across servers
    package: str | None = None  # weights shipped in a Python package ("<module>/<path>")
    pip: str | None = None      # how to install that package
    framework: str | None = None  # kind "remote": openai, vllm, sglang or llama.cpp
    remote: Any = None            # kind "remote": its core.config.RemoteEngineConfig


@dataclass(frozen=True)
class OcrOptions:
    language: str | None = None  # a hint as the client gave it ("Russian", "ru", "rus", ...)
    max_new_tokens: int | None = None
    format: str = "text"  # "text" | "markdown" | "json" (blocks with boxes and categories)
    region: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 in the page's pixels


@dataclass(frozen=True)
class InstallState:
    installed: bool
    reason: str = ""  # why not, for /models


@runtime_checkable
class ModelAdapter(Protocol):
    """Load, unload, memory in use, and the capabilities it has.

    Optionally ``cpu_threads``: how many CPU threads one call keeps busy, for a model whose
    calls run outside any engine on the CPU (the OCR engines); its calls then hold them in the
    CPU share (core/cores.py, models/runner.py)."""

    capabilities: ClassVar[frozenset[Capability]]

    def __init__(self, spec: ModelSpec) -> None: ...

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        """Cheap check (no heavy imports) whether the model can be loaded here."""
        ...

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def memory_bytes(self) -> int: ...

    def supports_language(self, language: str | None) -> bool:
        """Whether an OCR language hint can be honoured (None: always True)."""
        ...


class OcrAdapter(ModelAdapter, Protocol):
    def ocr(self, image: Image.Image, options: OcrOptions, cancel: CancelToken) -> OcrResult: ...


class GenerativeAdapter(ModelAdapter, Protocol):
    """A model that generates text: the engine (engine/) drives what this returns once loaded."""

    def engine_backend(self) -> Any: ...


class GenerativeOcrAdapter(GenerativeAdapter, Protocol):
    """A generative model that reads pages: it builds its own OCR prompt (each model family has
    its own prompt modes) and turns the generated text into an OcrResult (blocks when it can)."""

    def encode_ocr(self, page: Image.Image, options: OcrOptions) -> Any: ...

    def parse_ocr(self, text: str, page_size: tuple[int, int], options: OcrOptions) -> OcrResult: ...


# kind -> "module:Class". A new model family is one line here plus its adapter module.
ADAPTER_KINDS: dict[str, str] = {
    "rapidocr": "ocr.rapid:RapidOcrAdapter",
    "tesseract": "ocr.tesseract:TesseractAdapter",
    "qwen_vl": "vlm.qwen:QwenVLAdapter",
    "causal_lm": "llm.causal:CausalLMAdapter",
    "got_ocr": "vlm.got_ocr:GotOcrAdapter",
    "dots_ocr": "vlm.dots_ocr.adapter:DotsOcrAdapter",
    "embedding": "llm.embedding:EmbeddingAdapter",
    "layout_pipeline": "ocr.document.adapter:LayoutPipelineAdapter",
    "remote": "remote.adapter:RemoteAdapter",
}

# Kinds the registry knows whose adapters have not been written yet; /models says so.
PENDING_KINDS: dict[str, str] = {
}


def adapter_class(kind: str) -> type[ModelAdapter]:
    """Import and return the adapter class for a kind (raises KeyError for unknown kinds)."""
    module_name, _, cls_name = ADAPTER_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)
