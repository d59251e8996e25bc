"""Text-only causal language models (Qwen2.5, Llama, SmolLM2, ...) through AutoModelForCausalLM,
from a Hugging Face folder or a GGUF file (converted once and cached: models/gguf.py).

torch and transformers are imported in ``load`` only, so listing models stays cheap.
Generation goes through the engine (engine/), which drives the loaded model.
"""
from __future__ import annotations

import logging
from typing import Any

from core.errors import BadRequest, ModelLoadFailed, ModelNotInstalled
from core.types import Capability
from models import gguf
from models.adapter import InstallState, ModelSpec
from models.hf import TorchModelAdapter, weights_install_state
from models.precision import apply_quantization, resolve_precision

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CausalLMAdapter(TorchModelAdapter):
    capabilities = frozenset({Capability.GENERATE})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.tokenizer: Any = None

    def _forget(self) -> None:
        self.model = self.tokenizer = None

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        file = gguf.gguf_file(spec.path)
        if file is not None:
            return gguf.install_state(file)
        return weights_install_state(spec, _TOKENIZER_FILES)

    def load(self) -> None:
        if not self.check_installed(self.spec).installed:
            raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
        file = gguf.gguf_file(self.spec.path)
        folder = self.spec.path if file is None else gguf.converted_folder(file, self.spec.cache_dir, self.spec.id)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        precision = resolve_precision(self.spec)
        device, dtype, attn = precision.device, precision.dtype, precision.attn
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                         attn_implementation=attn)
            model.to(device).eval()
            apply_quantization(model, precision)
        except Exception:
            log.exception("loading %s from %s failed", self.spec.id, self.spec.path)
            raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
        self.tokenizer, self.model, self.precision = tokenizer, model, precision

    def engine_backend(self):
        """The loaded model as the engine drives it."""
        from engine.backend import BatchBackend

        return BatchBackend(self.model, self.tokenizer, self.encode, threads=self.spec.threads,
                            prefix_cache_mb=self.spec.prefix_cache_mb, prefill_chunk=self.spec.prefill_chunk_tokens,
                            slice_share=self.spec.prefill_slice_share,
                            lean=bool(self.spec.options.get("lean_decode", True)),
                            native=bool(self.spec.options.get("native_decode", True)),
                            packed_decode=self.spec.options.get("packed_decode", "auto"),
                            ragged_decode=bool(self.spec.options.get("ragged_decode", True)))

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
