"""The model side of the engine: a running batch of sequences with one shared, left-padded
KV cache that requests join (prefill) and leave (finish) between decode steps.

Works for any transformers decoder with a dynamic cache. Prompts' image tensors are fed at
prefill; for Qwen-VL models it also keeps each row's multimodal RoPE offset for the decode steps.
Text-only prompts of plain-RoPE models reuse cached prefix KV (engine/prefix_cache.py): a prompt
whose first blocks are cached is prefilled alone from there.
"""
from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine.kv_cache import GROW_MIN, GrowingLayer, make_growing
from engine.lean_decode import LeanDecoder, lean_supported
from engine.prefix_cache import PrefixCache
from engine.quant import GEMV_ROWS
from engine.sliced_prefill import SlicedPrefill

# A long prompt's slice between decode steps takes about this share of a decode step's time, so
# the decoding rows wait at most about twice their usual step (engine/sliced_prefill.py).
SLICE_OF_STEP = 0.75
# A join whose buffer would hold less than this share of real positions, and at least this many
# padding positions (rows x positions), makes the cache ragged (the compiled step only).
RAGGED_SHARE = 0.5
RAGGED_MIN_PAD = 2048


TOY_MODEL_PARAMS = 5_000_000


@dataclass
class EncodedPrompt:
    """A tokenized prompt, ready for prefill. ``vision`` holds the processor's image tensors."""

    input_ids: list[int]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw
    mm_token_type_ids: list[int] | None = None
    features: "ImageFeatures | None" = None  # the vision tower's output, once computed


@dataclass
class ImageFeatures:
    """One prompt's share of a vision-tower call: per image, the merged features (and, for
    Qwen3-VL, the per-layer deepstack features), in the model's own output type."""

    output_type: type
    pooled: list[torch.Tensor]
    deepstack: list[list[torch.Tensor]] | None = None  # [layer][image]


class BatchBackend:
    def __init__(self, model: Any, tokenizer: Any, encode: Callable[..., EncodedPrompt], *,
                 mrope: bool = False, threads: int | None = None, prefix_cache_mb: float = 0,
                 prefix_block: int = 32, prefill_chunk: int = 0, lean: bool = True, native: bool = True) -> None:
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
        self.lean = LeanDecoder(model, native=native) if lean and not mrope and lean_supported(model) else None
        self.lean_rows = GEMV_ROWS
        # Long prompts of those models advance a few layers per engine step, within about one
        # decode step's time (engine/sliced_prefill.py); others run a whole chunk per step.
        self.sliced = SlicedPrefill(model) if self.prefill_chunk and not mrope and lean_supported(model) else None
        self.step_time: float | None = None  # recent decode steps' duration (seconds, moving average)
        # Whether the cache's padding is unset and each row attends to its own positions (the
        # compiled step), taken when a join would otherwise fill mostly padding.
        self.ragged = False

    def bind_thread(self) -> None:
        """Called on the engine's thread: how many CPU threads its torch work uses (per thread).

        A toy-size model's step is too small to split: the second thread's start-up and any
        wait for a busy core cost more than it saves, so such models run single-threaded."""
        if self.device.type != "cpu":
            return
        threads = self.threads
        if threads is None:
            params = sum(p.numel() for p in self.model.parameters())
            threads = 1 if params < TOY_MODEL_PARAMS else torch.get_num_threads()
        torch.set_num_threads(threads)

    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    # ---- joining ---------------------------------------------------------------------------
    def _cacheable(self, prompt: EncodedPrompt) -> bool:
        return self.prefix_cache is not None and not prompt.vision

    def prefill_groups(self, prompts: list[EncodedPrompt]) -> list[list[int]]:
        """How to prefill these prompts (indices per ``prefill`` call): the ones without a cached
        prefix together, each one with a cached prefix alone, from the end of that prefix."""
        if self.prefix_cache is None:
            return [list(range(len(prompts)))]
        hits = [i for i, p in enumerate(prompts) if self._cacheable(p) and self.prefix_cache.find(p.input_ids)]
        misses = [i for i in range(len(prompts)) if i not in hits]
        return ([misses] if misses else []) + [[i] for i in hits]

    @torch.inference_mode()
    def prefill(self, prompts: list[EncodedPrompt]) -> torch.Tensor:
        """Run the prompts (left-padded together), add them to the batch; return their next-token logits."""
        if len(prompts) == 1 and self._cacheable(prompts[0]):
            hit = self.prefix_cache.lookup(prompts[0].input_ids)
            if hit is not None:
                return self._prefill_after(prompts[0], *hit)
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

    def _prefill_after(self, prompt: EncodedPrompt, start: int, layers: list) -> torch.Tensor:
        """Prefill one prompt whose first ``start`` tokens' KV is cached: only the rest runs."""
        part = PartialPrefill(prompt, self._seeded_cache(layers), start)
        return self._run_part(part, len(prompt.input_ids) - start)

    def _seeded_cache(self, layers: list | None) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(layers or []):
            cache.update(k, v, i)  # copies: the cached tensors are never written through
        return cache

    def chunked(self, prompt: EncodedPrompt) -> bool:
        """Whether this prompt is prefilled in chunks (a long text prompt)."""
        return bool(self.prefill_chunk) and not prompt.vision and len(prompt.input_ids) > self.prefill_chunk

    def begin_prefill(self, prompt: EncodedPrompt) -> "PartialPrefill":
        """Start a chunked prefill (from a cached prefix when there is one); nothing joins yet."""
        hit = self.prefix_cache.lookup(prompt.input_ids) if self._cacheable(prompt) else None
        start, layers = hit if hit is not None else (0, None)
        return PartialPrefill(prompt, self._seeded_cache(layers), start)

    @torch.inference_mode()
    def prefill_chunk_step(self, part: "PartialPrefill") -> torch.Tensor | None:
        """Run the next slice (a few layers, engine/sliced_prefill.py) or chunk; after the last
        one the row joins the batch and its next-token logits (1, vocab) are returned, before
        that None."""
        if self.sliced is None:
            return self._run_part(part, self.prefill_chunk)
        # While rows decode, a slice takes about one of their steps; alone, a whole chunk.
        budget = SLICE_OF_STEP * self.step_time if self.batch_size and self.step_time else None
        if part.logits is None:
            part.logits = self.sliced.advance(part, self.prefill_chunk, budget)
            if part.logits is None:
                return None
            if budget is not None:
                self._remember([part.prompt], part.cache, len(part.prompt.input_ids), copy=False)
                part.remembered = True
                return None  # rows are decoding: the join's copies come in the next steps
        elif budget is not None and not self._staged(part, budget):
            return None
        self._finish_part(part)
        return part.logits

    def _staged(self, part: "PartialPrefill", budget: float) -> bool:
        """Copy the finished prompt's KV into the buffers the batch will take at its join, a few
        layers per step within ``budget`` seconds; True once done, or when the join will not be
        ragged (then the join copies everything itself)."""
        n = len(part.prompt.input_ids)
        if part.stage is None:
            if not self._ragged_join(n, 1) or self.mask.shape[1] + 8 > n:
                return True
            part.stage = _Stage(self.batch_size, max(GROW_MIN, n // 4))
        stage, start = part.stage, time.perf_counter()
        layers = part.cache.layers
        while len(stage.buffers) < len(layers):
            new = layers[len(stage.buffers)]
            pair = []
            for t in (new.keys, new.values):
                buf = t.new_empty((stage.rows + 1, t.shape[1], n + stage.spare, t.shape[3]))
                buf[stage.rows:, :, :n].copy_(t)
                pair.append(buf)
            stage.buffers.append(tuple(pair))
            if time.perf_counter() - start > budget:
                break
        return len(stage.buffers) == len(layers)

    def _run_part(self, part: "PartialPrefill", size: int) -> torch.Tensor | None:
        n = len(part.prompt.input_ids)
        end = min(n, part.done + size)
        ids = torch.tensor([part.prompt.input_ids[part.done:end]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        position_ids = torch.arange(part.done, end, device=self.device).unsqueeze(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=part.cache, use_cache=True, logits_to_keep=1)
        part.cache, part.done = out.past_key_values, end
        if end < n:
            return None
        self._finish_part(part)
        return out.logits[:, -1, :]

    def _finish_part(self, part: "PartialPrefill") -> None:
        """The whole prompt is in ``part.cache``: remember its prefix, and the row joins."""
        n = len(part.prompt.input_ids)
        if not part.remembered:
            self._remember([part.prompt], part.cache, n, copy=False)  # a longer prefix than any that hit
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        deltas = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        stage = part.stage
        if stage is not None and self.cache is not None and stage.rows == self.batch_size \
                and len(stage.buffers) == len(self.cache.layers) and self.mask.shape[1] <= n:
            # The new row is in place already: only the running rows' positions are copied.
            width = self.mask.shape[1]
            for layer, (k, v) in zip(self.cache.layers, stage.buffers):
                k[:stage.rows, :, n - width:n].copy_(layer.keys)
                v[:stage.rows, :, n - width:n].copy_(layer.values)
                layer.adopt(k, v, n)
            self.mask = torch.cat([F.pad(self.mask, (n - width, 0)), mask])
            self.deltas = torch.cat([self.deltas, deltas])
            self.ragged = True
        else:  # rows left or joined meanwhile, or no staging: one copy of everything
            self._join(part.cache, mask, deltas)
        part.stage = None

    def _ragged_join(self, new_len: int, new_rows: int, new_real: int | None = None) -> bool:
        """Whether joining ``new_rows`` rows of ``new_len`` positions makes the cache ragged."""
        if self.ragged:
            return True
        if self.cache is None or self.lean is None or not self.lean.compiled(self.cache):
            return False
        width = max(self.mask.shape[1], new_len)
        rows = self.batch_size + new_rows
        real = int(self.mask.sum()) + (new_len * new_rows if new_real is None else new_real)
        return rows * width - real >= RAGGED_MIN_PAD and real < RAGGED_SHARE * rows * width

    def _mrope_positions(self, prompts, ids, mask, kwargs):
        with_images = [p for p in prompts if p.vision]
        if not with_images:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return pos.unsqueeze(0).expand(3, -1, -1), torch.zeros((len(prompts), 1), dtype=torch.long, device=self.device)
        types = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            if p.mm_token_type_ids:
                types[i, ids.shape[1] - len(p.mm_token_type_ids):] = torch.tensor(p.mm_token_type_ids)
        kwargs.update(self._vision_inputs(with_images))
        kwargs["mm_token_type_ids"] = types
        position_ids, deltas = self.model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=kwargs.get("image_grid_thw"), attention_mask=mask)
        return position_ids, deltas.to(self.device).long()

    # ---- images --------------------------------------------------------------------------
    vision_ahead = True  # adapters may turn it off: images then run inside the prefill forward

    @functools.cached_property
    def encodes_images_ahead(self) -> bool:
        """Whether image features are computed before prefill (``encode_images``), e.g. on the
        engine's vision worker, and passed to the prefill forward instead of pixels."""
        inner = getattr(self.model, "model", None)
        return (self.mrope and self.vision_ahead and hasattr(inner, "get_image_features")
                and "mm_encoder_outputs" in inspect.signature(self.model.forward).parameters)

    def bind_vision_thread(self, decoding_rows: int, requests: int) -> bool:
        """Called on the vision worker before each call; returns whether the decode steps should
        wait for it. Idle engine, or a model that encodes on one thread anyway: all the vision
        threads, beside the decoding. As many requests waiting for their images as there are
        rows decoding, or more: all the threads, and the rows wait (they all join sooner that
        way). Fewer: one thread, beside the decode steps, which then run on one thread fewer
        (``share_cores``), so the streams do not stall."""
        if self.device.type != "cpu":
            return False
        full = self._vision_threads
        exclusive = decoding_rows > 0 and full > 1 and requests >= decoding_rows
        torch.set_num_threads(1 if decoding_rows and not exclusive else full)
        return exclusive

    def share_cores(self, vision_busy: bool) -> None:
        """Called on the engine's thread before a step: while the vision worker runs (on one
        thread), decode on one thread fewer, so the two never ask for more cores than there are."""
        if self.device.type != "cpu":
            return
        if self._engine_threads is None:
            self._engine_threads = torch.get_num_threads()  # what ``bind_thread`` chose
        torch.set_num_threads(max(1, self._engine_threads - 1) if vision_busy else self._engine_threads)

    _engine_threads: int | None = None

    @functools.cached_property
    def _vision_threads(self) -> int:
        if self.threads:
            return self.threads
        params = sum(p.numel() for p in self.model.parameters())
        return 1 if params < TOY_MODEL_PARAMS else _cpu_threads()  # as ``bind_thread`` decides

    @torch.inference_mode()
    def encode_images(self, prompts: list[EncodedPrompt]) -> None:
        """Run the vision tower once over every image of these prompts; each prompt keeps its
        own features (``prompt.features``) and drops its pixels."""
        todo = [p for p in prompts if p.vision and p.features is None]
        if not todo:
            return
        pixels = {key: torch.cat([p.vision[key] for p in todo]).to(self.device)
                  for key in ("pixel_values", "image_grid_thw")}
        out = self.model.model.get_image_features(pixels["pixel_values"].to(self.model.dtype),
                                                  pixels["image_grid_thw"], return_dict=True)
        deep = getattr(out, "deepstack_features", None)
        first = 0
        for p in todo:
            n = len(p.vision["image_grid_thw"])
            p.features = ImageFeatures(type(out), list(out.pooler_output[first:first + n]),
                                       [list(layer[first:first + n]) for layer in deep] if deep else None)
            p.vision = {k: v for k, v in p.vision.items() if k != "pixel_values"}
            first += n

    def _encoded_inputs(self, with_images: list[EncodedPrompt]) -> dict[str, Any]:
        """The precomputed features of these prompts, in row order, as the model's forward takes
        them (``mm_encoder_outputs``), with the image grids for the multimodal RoPE positions."""
        self.encode_images(with_images)  # any prompt that did not pass the vision worker
        pooled = [f for p in with_images for f in p.features.pooled]
        fields: dict[str, Any] = {"pooler_output": tuple(pooled)}
        if with_images[0].features.deepstack is not None:
            layers = len(with_images[0].features.deepstack)
            fields["deepstack_features"] = [tuple(f for p in with_images for f in p.features.deepstack[i])
                                            for i in range(layers)]
        grids = torch.cat([p.vision["image_grid_thw"] for p in with_images]).to(self.device)
        return {"mm_encoder_outputs": {"image": with_images[0].features.output_type(**fields)},
                "image_grid_thw": grids}

    def _vision_inputs(self, prompts: list[EncodedPrompt]) -> dict[str, Any]:
        """The prompts' image inputs concatenated in row order: the models scatter image features
        into their image-token positions row-major, so that order is the batch's token order."""
        with_images = [p for p in prompts if p.vision]
        kwargs: dict[str, torch.Tensor] = {}
        if not with_images:
            return kwargs
        if self.encodes_images_ahead:
            return self._encoded_inputs(with_images)
        for key in with_images[0].vision:
            kwargs[key] = torch.cat([p.vision[key] for p in with_images]).to(self.device)
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        return kwargs

    def _join(self, cache: Any, mask: torch.Tensor, deltas: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask, self.deltas = make_growing(cache), mask, deltas
            self.ragged = False
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
        self.step_time = took if self.step_time is None else 0.8 * self.step_time + 0.2 * took
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
    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop the padding columns nobody needs any more."""
        if not rows:
            self.cache = self.mask = self.deltas = None
            self.ragged = False
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.deltas = self.mask[index], self.deltas[index]
        used = self.mask.sum(0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = self.mask[:, start:]


@dataclass
class PartialPrefill:
    """A prompt being prefilled chunk by chunk, in its own cache until it joins the batch."""

    prompt: EncodedPrompt
    cache: Any
    done: int = 0  # tokens whose KV is in ``cache``
    sliced: Any = None  # the chunk whose layers are under way (engine/sliced_prefill.py)
    logits: Any = None  # its next-token logits once every chunk ran, until the row joins
    remembered: bool = False  # its prefix went to the prefix cache
    stage: "_Stage | None" = None  # the batch's buffers for its join, being filled


@dataclass
class _Stage:
    rows: int   # the batch's rows when staging began (the join uses the buffers only if unchanged)
    spare: int  # positions of headroom after the prompt
    buffers: list = field(default_factory=list)  # per layer (keys, values), the new row in place


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


def _cpu_threads() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (batch, heads, length, dim) tensor on the left of its length axis to ``width``."""
    return F.pad(t, (0, 0, width - t.shape[2], 0))
