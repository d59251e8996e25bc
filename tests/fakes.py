"""A deterministic in-process adapter for service and HTTP-layer unit tests.

It implements the real adapter protocol (models/adapter.py); its behaviour is set by the
spec's ``options``: ``delay`` (seconds per call, polling the cancel token), ``fail_load``,
``fail_ocr`` (raise a bug with a path and an address in its text), ``memory_mb``.
End-to-end tests use the real engines and tiny checkpoints instead.
"""
from __future__ import annotations

import threading
import time

from core.types import CancelToken, Capability, GenerationParams, GenerationResult, OcrBlock, OcrResult
from models.adapter import InstallState, ModelSpec, OcrOptions

EVENTS: list[tuple[str, str]] = []  # (model id, event) for tests to inspect
_lock = threading.Lock()


def record(model_id: str, event: str) -> None:
    with _lock:
        EVENTS.append((model_id, event))


class FakeAdapter:
    capabilities = frozenset({Capability.OCR, Capability.CHAT})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.loaded = False

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        if spec.options.get("installed", True):
            return InstallState(True)
        return InstallState(False, f"no weights at {spec.path}")

    def load(self) -> None:
        record(self.spec.id, "load")
        time.sleep(self.spec.options.get("load_delay", 0))
        if self.spec.options.get("fail_load"):
            raise RuntimeError("CUDA exploded at /secret/path/model.bin 0x7f00deadbeef")
        self.loaded = True

    def unload(self) -> None:
        record(self.spec.id, "unload")
        self.loaded = False

    def memory_bytes(self) -> int:
        return int(self.spec.options.get("memory_mb", 1) * 2**20) if self.loaded else 0

    def supports_language(self, language: str | None) -> bool:
        return language is None or language.lower() not in self.spec.options.get("unsupported", [])

    def _work(self, cancel: CancelToken) -> bool:
        """Sleep for the configured delay; False when cancelled first."""
        end = time.monotonic() + self.spec.options.get("delay", 0)
        while time.monotonic() < end:
            if cancel.cancelled:
                record(self.spec.id, "cancelled")
                return False
            time.sleep(0.005)
        return True

    def ocr(self, image, options: OcrOptions, cancel: CancelToken) -> OcrResult:
        record(self.spec.id, "ocr")
        if self.spec.options.get("fail_ocr"):
            raise RuntimeError("boom at /secret/path/x.py 0x7f00deadbeef")
        self._work(cancel)
        w, h = image.size
        text = f"{self.spec.id} {w}x{h}" + (f" {options.language}" if options.language else "")
        return OcrResult(text=text, blocks=[OcrBlock(text, (0, 0, w, h), 0.9)], model=self.spec.id)

    def chat(self, image, prompt: str, params: GenerationParams, cancel: CancelToken) -> GenerationResult:
        record(self.spec.id, "chat")
        finished = self._work(cancel)
        size = f"{image.size[0]}x{image.size[1]}" if image is not None else "no image"
        return GenerationResult(text=f"{prompt} | {size} | t={params.temperature} | n={params.max_new_tokens}",
                                prompt_tokens=len(prompt.split()), completion_tokens=3,
                                finish_reason="stop" if finished else "cancelled", model=self.spec.id)
