"""What the transformers-backed adapters share: where their weights are, which device and
dtype they load with, and how they release memory for real."""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from core.errors import ModelLoadFailed, ModelNotInstalled
from models.adapter import InstallState, ModelSpec
from models.precision import Precision, apply_quantization, resolve_precision

log = logging.getLogger(__name__)


def weights_install_state(spec: ModelSpec, any_of_files: tuple[str, ...]) -> InstallState:
    """A Hugging Face snapshot folder with config.json and one of ``any_of_files``."""
    if spec.path is None:
        return InstallState(False, "no weights path configured")
    path = Path(spec.path)
    if not path.is_dir():
        return InstallState(False, f"no weights at {path.as_posix()}")
    if not (path / "config.json").is_file():
        return InstallState(False, f"no config.json in {path.as_posix()}")
    if not any((path / name).is_file() for name in any_of_files):
        return InstallState(False, f"no tokenizer or processor files in {path.as_posix()}")
    return InstallState(True)


def resolve_device_dtype(spec: ModelSpec):
    """(device, dtype, attention implementation) of ``spec`` on this machine (models/precision.py:
    bf16 where the device runs it natively, else fp32; a precision it cannot run is a load error).
    Imports torch: call it from ``load`` only."""
    p = resolve_precision(spec)
    return p.device, p.dtype, p.attn


class TorchModelAdapter:
    """Lifecycle shared by adapters whose loaded state is ``self.model`` (+ tokenizer/processor)."""

    model: Any = None
    precision: Precision | None = None  # what the loaded model runs at

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model = None

    def _forget(self) -> None:
        """Drop every reference to loaded objects (subclasses add theirs)."""
        self.model = None

    def unload(self) -> None:
        if self.model is None:
            return
        on_cuda = self.model.device.type == "cuda"
        self._forget()
        gc.collect()
        if on_cuda:
            import torch
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        """Bytes held by the parameters and buffers (0 when unloaded)."""
        if self.model is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))

    def supports_language(self, language: str | None) -> bool:
        return True  # generative models read any language they were trained on


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


class ProcessorModelAdapter(TorchModelAdapter):
    """Image-text models loaded as an AutoProcessor plus AutoModelForImageTextToText from a
    local snapshot. Subclasses say which attention each part takes and check the family."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.processor: Any = None

    def _forget(self) -> None:
        self.model = self.processor = None

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        return weights_install_state(spec, PROCESSOR_FILES)

    def _attention(self, attn: str) -> Any:
        """The ``attn_implementation`` argument (a name, or a dict per sub-config)."""
        return attn

    def _check_family(self, processor: Any, model: Any) -> None:
        """Raise when the folder holds another model family's checkpoint."""

    def load(self) -> None:
        if self.model is not None:
            return
        if not self.check_installed(self.spec).installed:
            raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        precision = resolve_precision(self.spec)
        device, dtype, attn = precision.device, precision.dtype, precision.attn
        try:
            processor = AutoProcessor.from_pretrained(self.spec.path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                self.spec.path, local_files_only=True, dtype=dtype, attn_implementation=self._attention(attn))
            self._check_family(processor, model)
            model.to(device).eval()
            apply_quantization(model, precision)
        except Exception:
            log.exception("loading %s from %s failed", self.spec.id, self.spec.path)
            raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
        self.processor, self.model, self.precision = processor, model, precision
        log.info("loaded %s on %s (%s, %s), %.1f MB", self.spec.id, device, precision.label, attn,
                 self.memory_bytes() / 2**20)
