"""The model side of the engine: a running batch of sequences with one shared, left-padded
KV cache that requests join (prefill) and leave (finish) between decode steps.

Works for any transformers decoder with a dynamic cache. Prompts' image tensors are fed at
prefill; for Qwen-VL models it also keeps each row's multimodal RoPE offset for the decode steps.
Text-only prompts of plain-RoPE models reuse cached prefix KV (engine/prefix_cache.py): prompts
whose first blocks are cached are prefilled together from there.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import torch
import torch.nn.functional as F

from core.cores import set_torch_threads, torch_threads_default
from core.omp import release_threads
from engine.image_inputs import TOY_MODEL_PARAMS, ImageInputs
from engine.kv_cache import GROW_MIN, GrowingLayer, make_growing
from engine.lean_decode import LeanDecoder, lean_supported
from engine.long_prompts import SLICE_OF_STEP, LongPrompts, PartialPrefill
from engine.prefix_cache import PrefixCache
from engine.prompts import EncodedPrompt, ImageFeatures
from engine.quant import GEMV_ROWS
from engine.sliced_prefill import SlicedPrefill

__all__ = ["BatchBackend", "EncodedPrompt", "ImageFeatures", "PartialPrefill"]

# A join that leaves at least this many padding positions (rows x positions) makes the cache
# ragged (the compiled step only), however much of it is real: the rows' attention then reads
# their own positions only, which was faster wherever measured (4 rows of 1,640 positions and
# one of 4,000: 42 against 98 ms a step; of 3,500 and 4,000, 56 against 96 ms; docs/BENCHMARKS.md).
# Below it the step stays the masked one, bitwise transformers' own, unless ``ragged_decode``
# (the model option, on by default) makes every batch of the compiled step ragged.
RAGGED_MIN_PAD = 2048

# A decode step's usual time, against which engine/long_prompts.py judges whether the last one
# ran slow (its excess then comes out of the long prompt's slice after it): this quantile of the
# last USUAL_WINDOW steps, their median of 16. A low quantile of more steps (the 25th percentile
# of 64), which a burst of slow steps does not raise, gave the same worst gaps at a later first
# token (scripts/bench_chunked_prefill.py --usual; docs/BENCHMARKS.md, sixteenth session).
USUAL_QUANTILE = 0.5
USUAL_WINDOW = 16


class BatchBackend(LongPrompts, ImageInputs):
    """The running batch: its shared KV cache, the rows joining (prefill) and leaving, and the
    decode steps. Long prompts (engine/long_prompts.py) and image inputs
    (engine/image_inputs.py) are the two mixins' share of it."""

    def __init__(self, model: Any, tokenizer: Any, encode: Callable[..., EncodedPrompt], *,
                 mrope: bool = False, threads: int | None = None, prefix_cache_mb: float = 0,
                 prefix_block: int = 32, prefill_chunk: int = 0, slice_share: float = SLICE_OF_STEP,
                 lean: bool = True, native: bool = True, packed_decode: object = "auto",
                 ragged_decode: bool = True) -> None:
        self.model = model
        self.threads = threads
        self.tokenizer = tokenizer
        self.encode = encode
        self.mrope = mrope
        self.device = model.device
        config = model.config.get_text_config(decoder=True)
        self.context_length: int = int(getattr(config, "max_position_embeddings", 0) or 32768)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.cache: Any = None
        self.mask: torch.Tensor | None = None    # (batch, kv length): 1 real token, 0 padding
        self.deltas: torch.Tensor | None = None  # (batch, 1) multimodal RoPE offset per row
        # Multimodal RoPE positions depend on the images, not only the ids: no prefix reuse there.
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20), prefix_block) \
            if prefix_cache_mb > 0 and not mrope else None
        # Text prompts longer than this are prefilled this many tokens per engine step (0: at once),
        # so a long prompt does not stall the rows that are decoding.
        self.prefill_chunk = 0 if mrope else prefill_chunk
        # Llama-architecture decode steps skip transformers' per-module machinery (same logits):
        # every step once the compiled layers are built (engine/native_step.py), before that (or
        # without a compiler) steps of a few rows, as bigger ones measured level with transformers.
        self.lean = LeanDecoder(model, native=native, packed_decode=packed_decode) \
            if lean and not mrope and lean_supported(model) else None
        self.lean_rows = GEMV_ROWS
        # Long prompts of those models advance a few layers per engine step, within a share of a
        # decode step's time (engine/sliced_prefill.py); others run a whole chunk per step.
        self.sliced = SlicedPrefill(model) if self.prefill_chunk and not mrope and lean_supported(model) else None
        self.slice_share = slice_share  # of a decode step, per slice while rows decode
        # The last step's duration, and the usual one before it (USUAL_QUANTILE of the last
        # USUAL_WINDOW): a long prompt's slices are shares of the usual step, less the last one's
        # excess when it ran slow (engine/long_prompts.py). Against the moving average (what the
        # budgets were shares of until the seventeenth session), which the slow steps themselves
        # raise, a step 1.5 times the usual looked only 1.35 times.
        self.last_step: tuple[float, float] | None = None
        self._recent_steps: deque[float] = deque(maxlen=USUAL_WINDOW)
        self._usual_quantile = USUAL_QUANTILE
        # Whether the cache's padding is unset and each row attends to its own positions (the
        # compiled step), taken when a join would otherwise fill mostly padding, and for every
        # batch the compiled step runs with ``ragged_decode`` (the model option, on by default
        # here as in llm/causal.py: 4-27% faster steps at 1-16 rows in fp32; in bf16 ATen's
        # SDPA for grouped heads without a mask is ~16 times the compiled kernel's time, and 4
        # rows of SmolLM2 stepped 2x faster at 10 positions, 5x at 1,500; the logits are
        # transformers' to rounding, not bitwise).
        self.ragged = False
        self.ragged_decode = ragged_decode
        # Changes whenever rows join or leave (their positions move): a long prompt's staged
        # join (engine/long_prompts.py) checks it before trusting its copies of the rows.
        self.layout = 0
        # Building the decoder above ran torch kernels on this thread (fused and packed weights):
        # its OpenMP pool would throttle the engine thread's pool for good (core/omp.py), as it
        # did in every in-process benchmark until the fourteenth session (~1.5x slower steps).
        release_threads()

    def bind_thread(self) -> int | None:
        """Called on the engine's thread: how many CPU threads its torch work uses (per thread),
        returned (None off the CPU). The engine may then lend some to other models generating
        at the same time (``use_threads``, core/cores.py).

        A toy-size model's step is too small to split: the second thread's start-up and any
        wait for a busy core cost more than it saves, so such models run single-threaded."""
        if self.device.type != "cpu":
            return None
        threads = self.threads
        if threads is None:
            params = sum(p.numel() for p in self.model.parameters())
            threads = 1 if params < TOY_MODEL_PARAMS else torch_threads_default()
        set_torch_threads(threads)
        self._engine_threads = threads
        return threads

    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    # ---- joining ---------------------------------------------------------------------------
    def _cacheable(self, prompt: EncodedPrompt) -> bool:
        return self.prefix_cache is not None and not prompt.vision

    def prefill_groups(self, prompts: list[EncodedPrompt]) -> list[list[int]]:
        """How to prefill these prompts (indices per ``prefill`` call): the ones without a cached
        prefix together, and the ones with a cached prefix together, from the ends of their
        prefixes."""
        if self.prefix_cache is None:
            return [list(range(len(prompts)))]
        hits = [i for i, p in enumerate(prompts) if self._cacheable(p) and self.prefix_cache.find(p.input_ids)]
        misses = [i for i in range(len(prompts)) if i not in hits]
        return [group for group in (misses, hits) if group]

    @torch.inference_mode()
    def prefill(self, prompts: list[EncodedPrompt]) -> torch.Tensor:
        """Run the prompts (left-padded together), add them to the batch; return their next-token
        logits. When every one of them has a cached prefix, only what follows the prefixes runs."""
        if all(self._cacheable(p) for p in prompts) and all(self.prefix_cache.find(p.input_ids) for p in prompts):
            hits = [self.prefix_cache.lookup(p.input_ids) for p in prompts]
            if len(prompts) == 1:
                return self._prefill_after(prompts[0], *hits[0])
            return self._prefill_after_many(prompts, hits)
        length = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[i, length - len(p.input_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs: dict[str, Any] = {}
        if self.mrope:
            position_ids, deltas = self._mrope_positions(prompts, ids, mask, kwargs)
        else:
            position_ids, deltas = (mask.cumsum(-1) - 1).clamp(min=0), torch.zeros((len(prompts), 1), dtype=torch.long,
                                                                                   device=self.device)
            kwargs.update(self._vision_inputs(prompts))  # e.g. GOT-OCR: images at plain 1D positions
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **kwargs)
        self._remember(prompts, out.past_key_values, length)
        self._join(out.past_key_values, mask, deltas)
        return out.logits[:, -1, :]

    def _remember(self, prompts: list[EncodedPrompt], cache: Any, length: int, copy: bool = True) -> None:
        """Store each text prompt's block-aligned prefix KV (its row, without the left padding).
        ``copy=False``: ``cache`` is a finished prefill's own, never written again."""
        if self.prefix_cache is None:
            return
        for i, p in enumerate(prompts):
            if self._cacheable(p) and not self.prefix_cache.covers(p.input_ids):
                start = length - len(p.input_ids)
                self.prefix_cache.store(p.input_ids, [(layer.keys[i:i + 1, :, start:], layer.values[i:i + 1, :, start:])
                                                      for layer in cache.layers], copy=copy)
        if not copy:  # the stored tensors are views of these buffers: they must never be written over
            for layer in cache.layers:
                if isinstance(layer, GrowingLayer):
                    layer.owned = False

    def _may_be_ragged(self) -> bool:
        """Whether the batch's cache is ragged or may become so (its steps run compiled)."""
        return self.ragged or self.cache is not None and self.lean is not None and self.lean.compiled(self.cache)

    def _ragged_join(self, new_len: int, new_rows: int, new_real: int | None = None) -> bool:
        """Whether joining ``new_rows`` rows of ``new_len`` positions makes the cache ragged."""
        if self.ragged:
            return True
        if not self._may_be_ragged():
            return False
        if self.ragged_decode:
            return True
        width = max(self.mask.shape[1], new_len)
        rows = self.batch_size + new_rows
        real = int(self.mask.sum()) + (new_len * new_rows if new_real is None else new_real)
        return rows * width - real >= RAGGED_MIN_PAD

    def _join(self, cache: Any, mask: torch.Tensor, deltas: torch.Tensor) -> None:
        self.layout += 1
        if self.cache is None:
            self.cache, self.mask, self.deltas = make_growing(cache), mask, deltas
            # The prefill wrote zeros into the padding: read or not, the rows attend the same.
            self.ragged = self.ragged_decode and self._may_be_ragged()
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        # Mostly padding (a long prompt joining short rows, or the reverse): the compiled step's
        # rows attend to their own positions from now on, so the padding is never written.
        self.ragged = self._ragged_join(new_len, mask.shape[0], int(mask.sum()))
        for old, new in zip(self.cache.layers, cache.layers):
            if isinstance(old, GrowingLayer):
                # One buffer with the decode steps' headroom: a long prompt joining short rows
                # is copied once, not padded, concatenated and then grown by the next step.
                spare, zero = max(GROW_MIN, width // 4), not self.ragged
                old.adopt(_stacked(old.keys, new.keys, width, spare, zero),
                          _stacked(old.values, new.values, width, spare, zero), width)
            else:
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - old_len, 0)), F.pad(mask, (width - new_len, 0))])
        self.deltas = torch.cat([self.deltas, deltas])

    # ---- stepping --------------------------------------------------------------------------
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return next-token logits (batch, vocab)."""
        start = time.perf_counter()
        logits = self._decode(tokens)
        took = time.perf_counter() - start
        self.last_step = (took, _quantile(self._recent_steps, self._usual_quantile) if self._recent_steps else took)
        self._recent_steps.append(took)
        return logits

    @torch.inference_mode()
    def _decode(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        position = self.mask.sum(-1, keepdim=True) + self.deltas
        self.mask = F.pad(self.mask, (0, 1), value=1)
        if self.ragged:  # each row from its first real position (the compiled step)
            return self.lean(ids, self.mask, position, self.cache,
                             starts=(self.mask.shape[1] - self.mask.sum(-1)).tolist())
        if self.lean is not None and (len(tokens) <= self.lean_rows or self.lean.compiled(self.cache)):
            return self.lean(ids, self.mask, position, self.cache)
        if self.mrope:
            position = position.unsqueeze(0).expand(3, -1, -1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=position,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    # ---- leaving ---------------------------------------------------------------------------
    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop the padding columns nobody needs any more."""
        self.layout += 1
        if not rows:
            self.cache = self.mask = self.deltas = None
            self.ragged = False
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.deltas = self.mask[index], self.deltas[index]
        used = self.mask.sum(0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in self.cache.layers:
            if isinstance(layer, GrowingLayer):
                layer.keep_rows(rows, start)  # in place: a long row leaving stalled the rows 60-130 ms
            else:
                layer.keys = layer.keys[index, :, start:]
                layer.values = layer.values[index, :, start:]
        self.mask = self.mask[:, start:]


def _stacked(a: torch.Tensor, b: torch.Tensor, width: int, spare: int, zero: bool = True) -> torch.Tensor:
    """``a``'s rows then ``b``'s, each left-padded to ``width`` positions, in a buffer of
    ``width + spare`` positions (batch, heads, length, dim); the spare part is left unset, and
    the padding too unless ``zero`` (a masked read of it must never meet NaN: 0 x NaN is NaN)."""
    buf = a.new_empty((a.shape[0] + b.shape[0], a.shape[1], width + spare, a.shape[3]))
    row = 0
    for part in (a, b):
        rows, pad = part.shape[0], width - part.shape[2]
        if pad and zero:
            buf[row:row + rows, :, :pad].zero_()
        buf[row:row + rows, :, pad:width].copy_(part)
        row += rows
    return buf


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (batch, heads, length, dim) tensor on the left of its length axis to ``width``."""
    return F.pad(t, (0, 0, width - t.shape[2], 0))


def _quantile(values, q: float) -> float:
    """The ``q`` quantile of ``values`` (the nearest rank below; 0.5 of an even count: the lower
    middle one)."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]
