"""A deterministic in-process adapter for service and HTTP-layer unit tests.

It implements the real adapter protocol (models/adapter.py); its behaviour is set by the
spec's ``options``: ``delay`` (seconds per call, polling the cancel token), ``fail_load``,
``fail_ocr`` (raise a bug with a path and an address in its text), ``memory_mb``,
``step_delay`` (seconds per generation step). For generation it hands the real engine a
``FakeBackend`` whose "model" echoes the prompt one character per step, then ends.
End-to-end tests use the real engines and tiny checkpoints instead.
"""
from __future__ import annotations

import threading
import time

from core.types import CancelToken, Capability, OcrBlock, OcrResult
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

    def engine_backend(self) -> "FakeBackend":
        record(self.spec.id, "engine")
        return FakeBackend(self.spec.options.get("step_delay", 0), self.spec.options.get("fail_step"))


class CharTokenizer:
    """One token per character (code point); id 0 is end-of-text."""

    pad_token_id = 0
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(i) for i in ids if i)


class FakeBackend:
    """The engine's backend protocol over an echo "model": row i's next token is the next
    character of its prompt, then end-of-text. Logits are one-hot over a small vocabulary."""

    VOCAB = 0x500  # Latin and Cyrillic

    def __init__(self, step_delay: float = 0.0, fail_step: int | None = None) -> None:
        import torch

        self.tokenizer = CharTokenizer()
        self.eos_ids = frozenset({0})
        self.context_length = 512
        self.device = torch.device("cpu")
        self.step_delay = step_delay
        self.fail_step = fail_step
        self.fail_keep = False  # keep() raises too: the batch cannot even be released
        self.rows: list[list[int]] = []   # per row: the prompt it echoes
        self.pos: list[int] = []
        self.steps = 0

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def encode(self, messages, prompt):
        from engine.backend import EncodedPrompt

        if messages is None:
            text = prompt
        else:
            parts = []
            for m in messages:
                for p in ((m.content,) if isinstance(m.content, str) else m.content):
                    parts.append(p if isinstance(p, str) else f"[{p.data.size[0]}x{p.data.size[1]}]")
            text = " ".join(parts)
        return EncodedPrompt([min(ord(c), self.VOCAB - 1) for c in text])

    def _logits(self, tokens):
        import torch

        out = torch.zeros((len(tokens), self.VOCAB))
        out[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
        return out

    def prefill(self, prompts):
        self.rows += [p.input_ids for p in prompts]
        self.pos += [0] * len(prompts)
        return self._logits([p.input_ids[0] if p.input_ids else 0 for p in prompts])

    def decode(self, tokens):
        self.steps += 1
        if self.fail_step is not None and self.steps >= self.fail_step:
            raise RuntimeError("boom in decode at /secret/path 0x7f00deadbeef")
        time.sleep(self.step_delay)
        self.pos = [p + 1 for p in self.pos]
        return self._logits([row[p] if p < len(row) else 0 for row, p in zip(self.rows, self.pos)])

    def keep(self, rows):
        if self.fail_keep:
            raise RuntimeError("boom in keep")
        self.rows = [self.rows[i] for i in rows]
        self.pos = [self.pos[i] for i in rows]
