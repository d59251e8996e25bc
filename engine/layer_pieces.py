"""A decoder layer of a long prompt's chunk, run in pieces that keep the matmuls wide.

While rows decode, a slice of a long prompt's prefill gets a share of a decode step (a few
milliseconds). A whole layer of a 512-token chunk takes several times that, and a chunk cut
until one layer fits runs 32-64 tokens at a time: its projections and MLP then multiply a
few dozen rows, at half the rate of 512 (measured on SmolLM2: 41-95 against 101-169 GMAC/s).
Here the chunk keeps its size and each layer runs in three phases, each over blocks of rows:

- ``proj``: the input norm, the query, key and value projections and the rotary embedding of
  rows r0..r1; their keys and values are written to the cache after the rows before them;
- ``attend``: the attention of query rows r0..r1 over every position up to theirs (causal);
- ``mlp``: the output projection and residual, the post-attention norm, the MLP and residual.

A block is sized to the time left in the slice at the phase's recent rate, so the projections
and the MLP run on as many rows as fit (hundreds early in a prompt), and late in a long prompt,
where the attention over thousands of positions dominates a layer, only the attention's blocks
get small, which costs it little (its rate is much the same from 32 rows to 512).

The math is that of the model's decoder layer (Llama and Qwen2: engine/lean_decode.py
``lean_supported``) in the order its forward runs it; blocks of rows round like one call to
within the dtype's rounding, not bitwise (tests/engine/test_layer_pieces.py).
"""
from __future__ import annotations

import statistics
import sys
import time
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F

PHASES = ("proj", "attend", "mlp")
# Blocks are a multiple of this many rows, and a slice's first block at least this many
# (fewer when the phase has fewer left): below it each call's fixed cost starts to count.
BLOCK_ROWS = 16


def supported(model: Any) -> bool:
    """Whether the model's decoder layers have the parts this runs (Llama's, Qwen2's)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    layer = layers[0]
    attn = getattr(layer, "self_attn", None)
    parts = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (attn is not None and all(hasattr(attn, p) for p in parts) and hasattr(attn, "scaling")
            and not hasattr(attn, "q_norm") and getattr(attn, "sliding_window", None) is None
            and all(hasattr(layer, p) for p in ("input_layernorm", "post_attention_layernorm", "mlp")))


def shape(config: Any) -> tuple[int, int, int]:
    """(attention heads, key-value heads, head size) of a Llama-like config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def row_macs(config: Any) -> tuple[int, int, int]:
    """Multiply-adds of one row (token) through one decoder layer: its projections (query,
    key, value), its output projection and MLP, and per position it attends to (a query-key
    product and a value sum per head)."""
    heads, kv_heads, head_dim = shape(config)
    hidden = config.hidden_size
    proj = hidden * head_dim * (heads + 2 * kv_heads)
    mlp = hidden * head_dim * heads + 3 * hidden * config.intermediate_size
    return proj, mlp, 2 * heads * head_dim


class LayerPieces:
    """Runs and plans the pieces of one model's decoder layers (see the module's text)."""

    def __init__(self, model: Any) -> None:
        self.heads, self.kv_heads, self.head_dim = shape(model.config)
        attn = model.model.layers[0].self_attn
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self._proj, self._mlp, self._attend = row_macs(model.config)
        self._rates = {phase: deque(maxlen=8) for phase in PHASES}  # multiply-adds per second

    def macs(self, phase: str, start: int, r0: int, r1: int) -> float:
        """Multiply-adds of rows r0..r1 of a chunk whose first token sits at ``start``."""
        rows = r1 - r0
        if phase == "proj":
            return rows * self._proj
        if phase == "mlp":
            return rows * self._mlp
        return rows * self._attend * (start + r1)  # the whole rectangle, as the masked kernel runs it

    def rate(self, phase: str) -> float | None:
        rates = self._rates[phase]
        return statistics.median(rates) if rates else None

    def seconds(self, phase: str, start: int, r0: int, r1: int) -> float | None:
        """Predicted time of rows r0..r1 at the phase's recent rate; None before any ran."""
        rate = self.rate(phase)
        return None if rate is None else self.macs(phase, start, r0, r1) / rate

    def rows_within(self, phase: str, start: int, r0: int, tokens: int, allowed: float | None) -> int:
        """The most rows after r0 (of ``tokens``) the phase runs in ``allowed`` seconds, in
        blocks of BLOCK_ROWS (all of them with no limit); 0 when not one block fits. Before the
        phase ever ran, one block, which measures it."""
        rest = tokens - r0
        if allowed is None:
            return rest
        rate = self.rate(phase)
        if rate is None:
            return min(rest, BLOCK_ROWS)
        budget = max(0.0, allowed) * rate
        if phase != "attend":
            rows = int(budget // self.macs(phase, start, 0, 1))
        else:  # rows * a * (start + r0 + rows) <= budget
            a, base = self._attend, start + r0
            rows = int(((base * base + 4 * budget / a) ** 0.5 - base) / 2)
        rows = rows // BLOCK_ROWS * BLOCK_ROWS
        return rest if rows >= rest else max(0, rows)

    def run(self, phase: str, layer: Any, index: int, chunk: Any, cache: Any, r0: int, r1: int,
            mask: torch.Tensor | None = None) -> None:
        """Run rows r0..r1 of ``phase`` of decoder layer ``layer`` (number ``index``) for the
        chunk (engine/sliced_prefill.py ``_Chunk``): its buffers hold what the next phase reads.
        ``mask``: the attention's, the rows' causal mask over the positions up to theirs (None:
        the rows are the prompt's first, and attend causally among themselves)."""
        t0 = time.perf_counter()
        tokens, start = chunk.tokens, chunk.start
        attn = layer.self_attn
        if phase == "proj":
            if chunk.query is None:
                chunk.query = chunk.hidden.new_empty((1, self.heads, tokens, self.head_dim))
            x = layer.input_layernorm(chunk.hidden[:, r0:r1])
            shape = (1, r1 - r0, -1, self.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            cos, sin = chunk.position_embeddings
            q, k = self._rope(q, k, cos[:, r0:r1], sin[:, r0:r1])
            chunk.query[:, :, r0:r1] = q
            cache.update(k, v, index)
        elif phase == "attend":
            if chunk.attended is None:
                chunk.attended = chunk.hidden.new_empty((1, tokens, self.heads * self.head_dim))
            kv = cache.layers[index]
            keys, values = kv.keys[:, :, :start + r1], kv.values[:, :, :start + r1]
            out = F.scaled_dot_product_attention(chunk.query[:, :, r0:r1], keys, values, attn_mask=mask,
                                                 is_causal=mask is None, scale=attn.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)
            chunk.attended[:, r0:r1] = out.transpose(1, 2).reshape(1, r1 - r0, -1)
        else:
            if chunk.out is None:
                chunk.out = torch.empty_like(chunk.hidden)
            h = chunk.hidden[:, r0:r1] + attn.o_proj(chunk.attended[:, r0:r1])
            chunk.out[:, r0:r1] = h + layer.mlp(layer.post_attention_layernorm(h))
        took = max(time.perf_counter() - t0, 1e-6)
        self._rates[phase].append(self.macs(phase, start, r0, r1) / took)
