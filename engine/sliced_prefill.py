"""A long prompt's prefill in slices of a few decoder layers, between decode steps.

Chunking the prompt alone bounds the stall a joining prompt causes the decoding rows only down
to one chunk's whole forward, and a chunk small enough to stay under a decode step's time reads
every weight once per few tokens (on a CPU, a 16-token chunk costs about a 16-row decode step).
Here a chunk keeps its size, so its matmuls stay efficient, and advances through the layers
under a time budget: each engine step runs as many of its layers as fit in about one decode
step's time (at least one), then the rows decode. The stall per step is then about one decode
step, whatever the prompt's length (scripts/bench_chunked_prefill.py).

It runs transformers' own decoder layers, mask, rotary embedding and norm in the order the
model's forward runs them, so the cache and the logits are the ones of one forward per chunk
(tests/engine/test_sliced_prefill.py). Taken for the Llama-architecture models the lean decode
step covers (engine/lean_decode.py), whose forward is exactly that loop.
"""
from __future__ import annotations

import time
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


class SlicedPrefill:
    """Advances PartialPrefills of one Llama-architecture model layer by layer."""

    def __init__(self, model: Any) -> None:
        from transformers.masking_utils import create_causal_mask

        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers[: model.config.num_hidden_layers])
        self._mask_fn = create_causal_mask

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
        return _Chunk(end, embeds, mask, position_ids, self.inner.rotary_emb(embeds, position_ids=position_ids))

    @torch.inference_mode()
    def advance(self, part: Any, size: int, budget: float | None) -> torch.Tensor | None:
        """Run layers of ``part``'s chunks (``size`` tokens each) for about ``budget`` seconds
        (None: to the end of the current chunk); at least one layer. Returns the prompt's
        next-token logits (1, vocab) once its last chunk's last layer ran, else None."""
        start = time.perf_counter()
        last = 0.0
        n = len(part.prompt.input_ids)
        while True:
            if part.sliced is None:
                part.sliced = self._begin_chunk(part, size)
            chunk: _Chunk = part.sliced
            t0 = time.perf_counter()
            chunk.hidden = self.layers[chunk.layer](
                chunk.hidden, attention_mask=chunk.mask, position_embeddings=chunk.position_embeddings,
                position_ids=chunk.position_ids, past_key_values=part.cache, use_cache=True)
            chunk.layer += 1
            last = time.perf_counter() - t0
            if chunk.layer == len(self.layers):
                part.sliced, part.done = None, chunk.end
                if chunk.end == n:
                    hidden = self.inner.norm(chunk.hidden)
                    return self.model.lm_head(hidden[:, -1:, :])[:, -1, :]
                if budget is None:
                    return None
            # The next layer is about as long as the last one: stop before it would overrun.
            if budget is not None and time.perf_counter() - start + last > budget:
                return None
