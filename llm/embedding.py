"""Sentence-embedding models: any local sentence-transformers folder (a Hugging Face encoder
plus its pooling and, when configured, normalisation modules).

The adapter tokenizes itself so that the service can refuse an input that is too long
(never truncating it silently) before it joins a batch, and so that token-id inputs (as the
OpenAI API allows) run through exactly the same path as text. torch and sentence-transformers
are imported in ``load`` only.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import replace
import logging
from pathlib import Path
from typing import Any, Iterator

from core.cores import SHARE, set_torch_threads, torch_threads_default
from core.errors import BadRequest, ModelLoadFailed, ModelNotInstalled
from core.types import CancelToken, Capability
from models.adapter import InstallState, ModelSpec
from models.hf import resolve_device_dtype

log = logging.getLogger(__name__)

ST_MARKERS = ("modules.json", "config_sentence_transformers.json")


def is_sentence_transformers_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in ST_MARKERS)


class EmbeddingAdapter:
    capabilities = frozenset({Capability.EMBED})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_tokens = 0   # special tokens included, as the model's max_seq_length counts them
        self.dimensions = 0
        self.normalized = False
        self._prefix: list[int] = []  # the special tokens the tokenizer puts around a text
        self._suffix: list[int] = []
        self._threads: int | None = None  # CPU threads a forward runs on alone (None: not on the CPU)

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        path = spec.path
        if path is None:
            return InstallState(False, "no weights path configured")
        if not path.is_dir():
            return InstallState(False, f"no weights at {path.as_posix()}")
        if not is_sentence_transformers_folder(path):
            return InstallState(False, f"no sentence-transformers files (modules.json) in {path.as_posix()}")
        if not (path / "config.json").is_file():
            return InstallState(False, f"no config.json in {path.as_posix()}")
        return InstallState(True)

    def load(self) -> None:
        if not self.check_installed(self.spec).installed:
            raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
        # fp32 unless configured otherwise: vectors must match sentence-transformers' own (fp32)
        # output, and an encoder this small gains little from bf16.
        spec = self.spec if self.spec.dtype != "auto" else replace(self.spec, dtype="float32")
        device, dtype, _ = resolve_device_dtype(spec)
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(self.spec.path), device=device, local_files_only=True,
                                        model_kwargs={"dtype": dtype})
            model.eval()
        except Exception:
            log.exception("loading %s from %s failed", self.spec.id, self.spec.path)
            raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
        self.model, self.tokenizer = model, model.tokenizer
        # The CPU threads a forward runs on alone; beside models generating at the same time it
        # takes its part of the CPU (core/cores.py), None on an accelerator.
        self._threads = (self.spec.threads or torch_threads_default()) if device == "cpu" else None
        self.max_tokens = int(model.max_seq_length or self.tokenizer.model_max_length)
        self.dimensions = int(model.get_embedding_dimension())
        self._prefix, self._suffix = special_wrapping(self.tokenizer)
        self.normalized = any(type(m).__name__ == "Normalize" for m in model)

    def unload(self) -> None:
        self.model = self.tokenizer = None
        gc.collect()

    def memory_bytes(self) -> int:
        if self.model is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))

    def supports_language(self, language: str | None) -> bool:
        return True

    # ---- the service's view ------------------------------------------------------------
    def token_ids(self, inputs: list[str] | list[list[int]]) -> list[list[int]]:
        """Each input as the token ids the model runs (special tokens added). Text and token-id
        inputs take the same path; an empty or too-long input is refused, naming its index."""
        vocab = len(self.tokenizer)
        out = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if not item:
                    raise BadRequest(f"input[{i}] is an empty string", param="input", code="EMPTY_INPUT")
                ids = self.tokenizer(item, add_special_tokens=False)["input_ids"]
            else:
                if not item:
                    raise BadRequest(f"input[{i}] is an empty list of tokens", param="input", code="EMPTY_INPUT")
                bad = next((t for t in item if not 0 <= t < vocab), None)
                if bad is not None:
                    raise BadRequest(f"input[{i}] holds token id {bad}, outside this model's vocabulary (0..{vocab - 1})",
                                     param="input", code="INVALID_TOKEN_ID")
                ids = list(item)
            full = [*self._prefix, *ids, *self._suffix]
            if len(full) > self.max_tokens:
                raise BadRequest(f"input[{i}] is {len(full)} tokens long (special tokens included); model "
                                 f"'{self.spec.id}' takes at most {self.max_tokens}. Split it: inputs are never "
                                 "truncated.", param="input", code="INPUT_TOO_LONG")
            out.append(full)
        return out

    def embed(self, batch: list[list[int]], cancel: CancelToken):
        """One forward pass over token-id rows -> float32 array (rows, dimensions)."""
        import numpy as np
        import torch

        if cancel.cancelled:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))  # less padding per chunk
        width = max(len(row) for row in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for slot, i in enumerate(order):
            ids[slot, :len(batch[i])] = torch.tensor(batch[i])
            mask[slot, :len(batch[i])] = 1
        features = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(ids)
        device = self.model.device
        features = {k: v.to(device) for k, v in features.items()}
        with self._cpu_part(), torch.inference_mode():
            vectors = self.model(features)["sentence_embedding"].float().cpu().numpy()
        result = np.empty_like(vectors)
        result[order] = vectors
        return result

    @contextmanager
    def _cpu_part(self) -> Iterator[None]:
        """Hold this forward's threads in the CPU share while it runs and use its part of them,
        so that an engine decoding at the same time does not run on all the threads beside it
        (two pools on the same cores: libgomp stops spinning and every parallel region of both
        waits on the kernel; core/omp.py)."""
        if self._threads is None:
            yield
            return
        with SHARE.holding(self._threads) as part:
            set_torch_threads(part)  # this thread's count
            yield


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer adds before and after a single text ([CLS] and [SEP]
    for BERT), found by encoding a probe with and without them, so token-id inputs get exactly
    what text inputs get."""
    plain = tokenizer("probe", add_special_tokens=False)["input_ids"]
    full = tokenizer("probe")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []
