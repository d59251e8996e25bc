"""Domain types shared by services and adapters (no HTTP types here)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum


class Capability(str, Enum):
    OCR = "ocr"
    CHAT = "chat"          # image + prompt -> text
    GENERATE = "generate"  # text prompt -> text
    EMBED = "embed"        # text -> vector
    LAYOUT = "layout"      # page -> regions with layout categories (document pipelines)


@dataclass(frozen=True)
class OcrBlock:
    text: str
    box: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 in original image pixels
    confidence: float | None = None
    category: str | None = None
    page: int = 0  # 0-based page (TIFF frame) the block was read from
    # Tables of the document pipeline: [{row, col, rowspan, colspan, text, box}] (``text`` is HTML)
    cells: tuple[dict, ...] | None = None
    plain: str | None = None  # the block as plain text when ``text`` is markup (a table as rows)


@dataclass
class OcrResult:
    text: str
    blocks: list[OcrBlock] = field(default_factory=list)
    model: str = ""


MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters for one request. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # Stop when the reply ends in a short unit repeated this many times (0: off). OCR models
    # loop on runs of dots or underscores; this ends them early instead of at max_new_tokens.
    max_repeat: int = 0

    @property
    def greedy(self) -> bool:
        # Sampling at a vanishing temperature is argmax in the limit, and dividing logits by
        # it overflows to inf (then NaN probabilities): treat it as greedy.
        return self.temperature < MIN_SAMPLING_TEMPERATURE


class CancelToken:
    """Set by the caller when the client leaves or the deadline passes; polled by model code."""

    def __init__(self, deadline: float | None = None) -> None:
        self._event = threading.Event()
        self.deadline = deadline  # time.monotonic() value or None

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if self._event.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._event.set()
            return True
        return False
