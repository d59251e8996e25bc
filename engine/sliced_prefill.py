"""A long prompt's prefill in slices of a few decoder layers, between decode steps.

Chunking the prompt alone bounds the stall a joining prompt causes the decoding rows only down
to one chunk's whole forward, and a chunk small enough to stay under a decode step's time reads
every weight once per few tokens (on a CPU, a 16-token chunk costs about a 16-row decode step).
Here a chunk keeps its size, so its matmuls stay efficient, and advances through the layers
under a time budget: each engine step runs as many of its layers as fit in a share of a decode
step's time (at least one; the model setting `prefill_slice_share`, half a step by default),
then the rows decode. The stall per step is then that share of a decode step, whatever the
prompt's length (scripts/bench_chunked_prefill.py).

One layer of a chunk is the smallest slice, and late in a long prompt its attention over every
earlier position dominates it (512 tokens at position 3,500: ~85 ms against a ~35 ms decode step
of int4 weights on a 2-core CPU). So while rows decode, each chunk is cut to what one of its
layers can run within the budget: a layer costs ``tokens × (weights + attention × positions)``
multiply-adds, at the rate the recent layers ran. Alone, a chunk keeps its full size.

It runs transformers' own decoder layers, mask, rotary embedding and norm in the order the
model's forward runs them, so the cache and the logits are the ones of one forward per chunk
(tests/engine/test_sliced_prefill.py). Taken for the Llama-architecture models the lean decode
step covers (engine/lean_decode.py), whose forward is exactly that loop.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Chunk:
    end: int                   # prompt tokens up to here are in this chunk
    hidden: torch.Tensor       # (1, chunk, hidden) after ``layer`` layers
    mask: Any
    position_ids: torch.Tensor
    position_embeddings: Any
    layer: int = 0             # layers done
    macs: float = 0.0          # multiply-adds of one of its layers


# A chunk cut to the budget is a multiple of this, and no smaller: below it the matmuls lose
# efficiency and each chunk's per-layer overhead (mask, norm, cache update) starts to count.
CUT_STEP = 32


class SlicedPrefill:
    """Advances PartialPrefills of one Llama-architecture model layer by layer."""

    def __init__(self, model: Any) -> None:
        from transformers.masking_utils import create_causal_mask

        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers[: model.config.num_hidden_layers])
        self._mask_fn = create_causal_mask
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        # One token through one layer: the projections' and the MLP's weights once each...
        self._weight_macs = c.hidden_size * head_dim * (2 * heads + 2 * kv_heads) + 3 * c.hidden_size * c.intermediate_size
        # ... and per position it attends to, a query-key product and a value sum per head.
        self._attention_macs = 2 * heads * head_dim
        self._rates: deque[float] = deque(maxlen=8)  # multiply-adds per second of recent layers

    def layer_macs(self, tokens: int, start: int) -> float:
        """Multiply-adds of one layer for ``tokens`` tokens after ``start`` cached ones (the
        attention over the whole rectangle, as the masked kernel computes it)."""
        return tokens * (self._weight_macs + self._attention_macs * (start + tokens))

    def chunk_size(self, done: int, size: int, budget: float | None) -> int:
        """Tokens of the next chunk starting after ``done``: ``size``, or while rows decode
        (a ``budget``) the most whose one layer fits it at the recent layers' rate, in steps of
        CUT_STEP and at least one step."""
        if budget is None or size <= CUT_STEP:
            return size
        if not self._rates:  # nothing measured yet: a small chunk to measure
            return min(size, 2 * CUT_STEP)
        allowed = budget * statistics.median(self._rates)
        # tokens * (w + a * (done + tokens)) <= allowed, solved for tokens.
        w, a = self._weight_macs + self._attention_macs * done, self._attention_macs
        tokens = (math.sqrt(w * w + 4 * a * allowed) - w) / (2 * a)
        return max(CUT_STEP, min(size, int(tokens) // CUT_STEP * CUT_STEP))

    def _begin_chunk(self, part: Any, size: int) -> _Chunk:
        n = len(part.prompt.input_ids)
        end = min(n, part.done + size)
        device = self.model.device
        ids = torch.tensor([part.prompt.input_ids[part.done:end]], dtype=torch.long, device=device)
        position_ids = torch.arange(part.done, end, device=device).unsqueeze(0)
        embeds = self.inner.embed_tokens(ids)
        # As the model's forward does, before any layer of this chunk writes the cache.
        mask = self._mask_fn(config=self.model.config, inputs_embeds=embeds,
                             attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                             past_key_values=part.cache, position_ids=position_ids)
        return _Chunk(end, embeds, mask, position_ids, self.inner.rotary_emb(embeds, position_ids=position_ids),
                      macs=self.layer_macs(end - part.done, part.done))

    def next_layer_time(self, part: Any, size: int, cut: float) -> float | None:
        """The predicted seconds of ``part``'s next layer (chunks cut to ``cut``), at the recent
        layers' rate; None before any layer ran."""
        if not self._rates:
            return None
        chunk = part.sliced
        if chunk is not None:
            macs = chunk.macs
        else:
            tokens = min(self.chunk_size(part.done, size, cut), len(part.prompt.input_ids) - part.done)
            macs = self.layer_macs(tokens, part.done)
        return macs / statistics.median(self._rates)

    @torch.inference_mode()
    def advance(self, part: Any, size: int, budget: float | None,
                cut: float | None = None) -> torch.Tensor | None:
        """Run layers of ``part``'s chunks (``size`` tokens each) for about ``budget`` seconds
        (None: to the end of the current chunk); at least one layer. While rows decode, chunks
        are cut to ``cut`` seconds a layer (by default ``budget``: this step's budget may be
        less, engine/long_prompts.py). Returns the prompt's next-token logits (1, vocab) once
        its last chunk's last layer ran, else None."""
        start = time.perf_counter()
        last = 0.0
        n = len(part.prompt.input_ids)
        cut = budget if cut is None else cut
        while True:
            if part.sliced is None:
                part.sliced = self._begin_chunk(part, self.chunk_size(part.done, size, cut))
            chunk: _Chunk = part.sliced
            t0 = time.perf_counter()
            chunk.hidden = self.layers[chunk.layer](
                chunk.hidden, attention_mask=chunk.mask, position_embeddings=chunk.position_embeddings,
                position_ids=chunk.position_ids, past_key_values=part.cache, use_cache=True)
            chunk.layer += 1
            last = time.perf_counter() - t0
            self._rates.append(chunk.macs / max(last, 1e-6))
            if chunk.layer == len(self.layers):
                part.sliced, part.done = None, chunk.end
                if chunk.end == n:
                    hidden = self.inner.norm(chunk.hidden)
                    return self.model.lm_head(hidden[:, -1:, :])[:, -1, :]
                if budget is None:
                    return None
                # The next chunk's first layer comes next: it may be longer and sit later than
                # the layer just run, so its time is predicted at the recent layers' rate.
                last = self.next_layer_time(part, size, cut)
            # Within a chunk the next layer is about as long as the last one: stop before it
            # would overrun.
            if budget is not None and time.perf_counter() - start + last > budget:
                return None
