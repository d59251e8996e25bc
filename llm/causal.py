"""Text-only causal language models (Qwen2.5, Llama, ...) through AutoModelForCausalLM.

torch and transformers are imported in ``load`` only, so listing models stays cheap.
Generation goes through the engine (engine/), which drives the loaded model.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
from pathlib import Path
from typing import Any

from core.errors import BadRequest, ModelLoadFailed, ModelNotInstalled
from core.types import Capability
from models.adapter import InstallState, ModelSpec

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_device_dtype(spec: ModelSpec):
    """(device, dtype, attention implementation) for a spec: bf16 + flash-attn on CUDA when
    available, fp32 + sdpa on CPU."""
    import torch

    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise ModelLoadFailed(f"model '{spec.id}': CUDA requested but not available")
    dtype = (torch.bfloat16 if on_cuda else torch.float32) if spec.dtype == "auto" else getattr(torch, spec.dtype)
    attn = spec.options.get("attn_implementation") or (
        "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa")
    return device, dtype, attn


def weights_install_state(spec: ModelSpec, extra_files: tuple[str, ...]) -> InstallState:
    """A Hugging Face snapshot folder with config.json and one of ``extra_files``."""
    if spec.path is None:
        return InstallState(False, "no weights path configured")
    path = Path(spec.path)
    if not path.is_dir():
        return InstallState(False, f"no weights at {path.as_posix()}")
    if not (path / "config.json").is_file():
        return InstallState(False, f"no config.json in {path.as_posix()}")
    if not any((path / name).is_file() for name in extra_files):
        return InstallState(False, f"no tokenizer files in {path.as_posix()}")
    return InstallState(True)


class CausalLMAdapter:
    capabilities = frozenset({Capability.GENERATE})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        return weights_install_state(spec, _TOKENIZER_FILES)

    def load(self) -> None:
        if not self.check_installed(self.spec).installed:
            raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device, dtype, attn = resolve_device_dtype(self.spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(self.spec.path, local_files_only=True, dtype=dtype,
                                                         attn_implementation=attn)
            model.to(device).eval()
        except Exception:
            log.exception("loading %s from %s failed", self.spec.id, self.spec.path)
            raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
        self.tokenizer, self.model = tokenizer, model

    def unload(self) -> None:
        if self.model is None:
            return
        on_cuda = self.model.device.type == "cuda"
        self.model = self.tokenizer = None
        gc.collect()
        if on_cuda:
            import torch
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        if self.model is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))

    def supports_language(self, language: str | None) -> bool:
        return True

    def engine_backend(self):
        """The loaded model as the engine drives it."""
        from engine.backend import BatchBackend

        return BatchBackend(self.model, self.tokenizer, self.encode)

    def encode(self, messages, prompt: str | None):
        from engine.backend import EncodedPrompt

        if messages is None:
            return EncodedPrompt(list(self.tokenizer(prompt)["input_ids"]))
        if any(not isinstance(p, str) for m in messages if not isinstance(m.content, str) for p in m.content):
            raise BadRequest(f"model '{self.spec.id}' is a text model and cannot take images",
                             param="messages", code="IMAGES_NOT_SUPPORTED")
        turns = [{"role": m.role, "content": text_of(m.content)} for m in messages]
        return EncodedPrompt(chat_template_ids(self.tokenizer, turns, self.spec.id))


def text_of(content) -> str:
    """A message's text: the string, or its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(p for p in content if isinstance(p, str))


def chat_template_ids(tokenizer, messages: list[dict], model_id: str) -> list[int]:
    """Token ids of the conversation through the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest(f"model '{model_id}' has no chat template; send a raw prompt instead",
                         code="CHAT_TEMPLATE_MISSING")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])
