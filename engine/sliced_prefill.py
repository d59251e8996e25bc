"""A long prompt's prefill in slices of a few decoder layers, between decode steps.

Chunking the prompt alone bounds the stall a joining prompt causes the decoding rows only down
to one chunk's whole forward, and a chunk small enough to stay under a decode step's time reads
every weight once per few tokens (on a CPU, a 16-token chunk costs about a 16-row decode step).
Here a chunk keeps its size, so its matmuls stay efficient, and advances through the layers
under a time budget: each engine step runs as many of its layers as fit in a share of a decode
step's time (at least one; the model setting `prefill_slice_share`, half a step by default),
then the rows decode. The stall per step is then that share of a decode step, whatever the
prompt's length (scripts/bench_chunked_prefill.py).

Late in a long prompt a layer's attention over every earlier position dominates it (512 tokens
at position 3,500: ~54 ms in bf16 on a 2-core CPU, against a ~14 ms decode step of 4 rows).
So while rows decode, each layer runs in pieces of rows (PIECES, engine/layer_pieces.py: its
projections, its attention and its MLP each over blocks of rows, sized to the time left), and
the chunk keeps its size. Models whose layers have other parts, and PIECES off, cut the chunk
instead, to what one of its layers can run within a part of the budget (engine/long_prompts.py
LAYER_FIT): a layer costs ``tokens × (weights + attention × positions)`` multiply-adds, at the
rate the recent layers ran; late in a 4,000-token prompt that is 32-64 tokens, whose matmuls
run at about half the rate of 512. Alone, a chunk keeps its full size and runs whole layers.

With SPLIT_LAYERS (off by default: below), a slice left less than a layer (after a slow decode
step, or when the machine slows mid-slice) runs the layer's next rows instead, in blocks of
ROW_STEP: rows r0..r1 of a layer are that layer run on a chunk of those tokens, whose keys and
values join the layer's cache after the rows before them, so the layer's output is the whole
layer's to rounding (the matmuls of a block may round differently); a layer the budget fits
runs whole.

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

from engine import layer_pieces


@dataclass
class _Chunk:
    end: int                   # prompt tokens up to here are in this chunk
    hidden: torch.Tensor       # (1, chunk, hidden) after ``layer`` layers
    mask: Any
    position_ids: torch.Tensor
    position_embeddings: Any
    layer: int = 0             # layers done
    row: int = 0               # rows of layer ``layer`` done (a layer the budget did not fit), or
                               # with pieces (engine/layer_pieces.py) rows of its phase ``phase``
    out: torch.Tensor | None = None  # those rows' output, until the layer's last row ran
    phase: int = 0             # with pieces: the layer's phase under way (layer_pieces.PHASES)
    query: torch.Tensor | None = None     # with pieces: the layer's queries, after ``proj``
    attended: torch.Tensor | None = None  # with pieces: its attention's output, after ``attend``

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]

    @property
    def start(self) -> int:  # the position of its first token
        return self.end - self.tokens


# A chunk cut to the budget is a multiple of this, and no smaller: below it the matmuls lose
# efficiency and each chunk's per-layer overhead (mask, norm, cache update) starts to count.
CUT_STEP = 32
# A layer split into rows runs blocks of a multiple of this many (finer than CUT_STEP: a block
# rounded down to 32 rows left a slice half its budget unused).
ROW_STEP = 16
# Whether a layer the slice has no room for runs in row blocks. Off: on the 2-core AMD machine,
# with a slow step's whole excess out of the slice (long_prompts.SLOW_STEP 1.0, which blocks
# make possible without long waits), row blocks brought the streams' 99th-percentile gap from
# 1.8-2.1 to 1.7-1.8 steps, but the long prompt's first token came 31-49% later (blocks of 16-64
# rows run fewer multiply-adds a second, and a slice rounded down to blocks fills less of its
# budget), the trade a smaller slice share already offers (docs/BENCHMARKS.md, eleventh
# session). scripts/bench_chunked_prefill.py --row-blocks on,off --slow-step 1.0 compares them.
SPLIT_LAYERS = False
# Whether, while rows decode, a chunk keeps its size and its layers run in pieces of rows
# (engine/layer_pieces.py) instead of being cut until one layer fits a slice. Eighteenth
# session, SmolLM2 bf16 + int4 on 2 cores, 4 streams and a 4,000-token prompt, in the same
# runs: its first token at 34-40 s against 52-59 s, the streams' worst gaps no lower (1.80-2.23
# steps in seven runs against 1.83-2.51 in four) and the 99th percentile ~0.05 steps higher
# (the slices fill more of their budget); alone in slices of 7 ms the prompt's layers took
# 9.7-9.9 s against 12.7-12.9 s (docs/BENCHMARKS.md). With pieces a slow step's whole excess
# comes out of the slice (long_prompts.SLOW_STEP 1.0), which lowered the worst gaps.
# scripts/bench_chunked_prefill.py --pieces on,off compares them.
PIECES = True


class SlicedPrefill:
    """Advances PartialPrefills of one Llama-architecture model layer by layer."""

    def __init__(self, model: Any) -> None:
        from transformers.masking_utils import create_causal_mask

        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers[: model.config.num_hidden_layers])
        self._mask_fn = create_causal_mask
        # One token through one layer: every weight once, and per position it attends to.
        proj, mlp, self._attention_macs = layer_pieces.row_macs(model.config)
        self._weight_macs = proj + mlp
        self._rates: deque[float] = deque(maxlen=8)  # multiply-adds per second of recent layers
        self.pieces = layer_pieces.LayerPieces(model) if PIECES and layer_pieces.supported(model) else None

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
        tokens = self._tokens_within(done, budget * statistics.median(self._rates))
        return max(CUT_STEP, min(size, int(tokens) // CUT_STEP * CUT_STEP))

    def _tokens_within(self, start: int, allowed: float) -> float:
        """How many tokens after ``start`` positions one layer runs in ``allowed`` multiply-adds:
        tokens * (w + a * (start + tokens)) <= allowed, solved for tokens."""
        w, a = self._weight_macs + self._attention_macs * start, self._attention_macs
        return (math.sqrt(w * w + 4 * a * max(allowed, 0.0)) - w) / (2 * a)

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

    def _rate(self, first: bool = True, boundary: bool = False) -> float:
        """Multiply-adds per second to plan with: the recent layers' median, as chunks are cut
        (so a slice's first run is a whole layer when it has the whole budget). After that run,
        with SPLIT_LAYERS, the last one's rate when slower (the machine may have slowed down just
        now); without, as before it: the last layer's rate within a chunk (its next layer is as
        long) and the median for a chunk's first layer (it may be longer and sit later)."""
        median = statistics.median(self._rates)
        if first:
            return median
        if not SPLIT_LAYERS:
            return median if boundary else self._rates[-1]
        return min(median, self._rates[-1])

    def _rows(self, part: Any, size: int, cut: float | None, left: float | None, first: bool) -> int:
        """Rows of the next layer to run (of the current chunk, or of the next one, cut to
        ``cut``) within ``left`` seconds: the rest of the layer when it fits (or with no time
        limit), else the most ROW_STEP blocks that fit; when none does, one block if this is
        the slice's ``first`` run (a slice runs at least that much), else 0."""
        chunk = part.sliced
        if chunk is not None:
            rest, start = chunk.tokens - chunk.row, chunk.start + chunk.row
        else:
            start = part.done
            rest = min(self.chunk_size(part.done, size, cut), len(part.prompt.input_ids) - part.done)
        if left is None or not self._rates:
            return rest if left is None or first else 0
        allowed = left * self._rate(first, boundary=chunk is None)
        if self.layer_macs(rest, start) <= allowed:
            return rest
        if not SPLIT_LAYERS or (chunk is not None and not self._splittable(chunk)):
            return rest if first else 0
        rows = min(rest, int(self._tokens_within(start, allowed)) // ROW_STEP * ROW_STEP)
        return rows if rows > 0 else (min(rest, ROW_STEP) if first else 0)

    def next_slice_time(self, part: Any, size: int, cut: float) -> float | None:
        """The predicted seconds of the least a slice of ``part`` runs (chunks cut to ``cut``):
        with pieces, one block of rows of the next phase at that phase's recent rate; else one
        block of its next layer's rows, or that whole layer when it cannot be split, at the
        recent layers' rate; None before any ran."""
        if self.pieces is not None:
            chunk = part.sliced
            if chunk is None:
                rows = min(layer_pieces.BLOCK_ROWS, len(part.prompt.input_ids) - part.done)
                return self.pieces.seconds("proj", part.done, 0, rows)
            r1 = min(chunk.tokens, chunk.row + layer_pieces.BLOCK_ROWS)
            return self.pieces.seconds(layer_pieces.PHASES[chunk.phase], chunk.start, chunk.row, r1)
        if not self._rates:
            return None
        chunk = part.sliced
        rows = self._rows(part, size, cut, 0.0, True)
        start = part.done if chunk is None else chunk.start + chunk.row
        return self.layer_macs(rows, start) / self._rate()

    def _splittable(self, chunk: _Chunk) -> bool:
        mask = chunk.mask
        return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4
                                and mask.shape[-2:] == (chunk.tokens, chunk.end))

    def _block_mask(self, chunk: _Chunk, r0: int, r1: int) -> torch.Tensor:
        """The chunk's causal mask for its rows r0..r1, over the positions they attend to: cut
        from the chunk's own, or where it has none (a first chunk runs sdpa's causal kernel)
        built as the boolean mask sdpa takes (these models run sdpa: lean_decode.lean_supported)."""
        if chunk.mask is not None:
            return chunk.mask[:, :, r0:r1, : chunk.start + r1]
        device = chunk.hidden.device
        query = torch.arange(chunk.start + r0, chunk.start + r1, device=device).unsqueeze(1)
        return (torch.arange(chunk.start + r1, device=device).unsqueeze(0) <= query)[None, None]

    def _run_rows(self, part: Any, chunk: _Chunk, rows: int) -> None:
        """Run ``rows`` rows of the chunk's next layer; the layer is done after its last row."""
        layer = self.layers[chunk.layer]
        r0, r1 = chunk.row, chunk.row + rows
        t0 = time.perf_counter()
        if r0 == 0 and r1 == chunk.tokens:
            chunk.hidden = layer(chunk.hidden, attention_mask=chunk.mask, position_embeddings=chunk.position_embeddings,
                                 position_ids=chunk.position_ids, past_key_values=part.cache, use_cache=True)
        else:
            cos, sin = chunk.position_embeddings
            out = layer(chunk.hidden[:, r0:r1], attention_mask=self._block_mask(chunk, r0, r1),
                        position_embeddings=(cos[:, r0:r1], sin[:, r0:r1]), position_ids=chunk.position_ids[:, r0:r1],
                        past_key_values=part.cache, use_cache=True)
            if chunk.out is None:
                chunk.out = torch.empty_like(chunk.hidden)
            chunk.out[:, r0:r1] = out
            if r1 == chunk.tokens:
                chunk.hidden, chunk.out = chunk.out, None
        self._rates.append(self.layer_macs(rows, chunk.start + r0) / max(time.perf_counter() - t0, 1e-6))
        chunk.row = r1
        if r1 == chunk.tokens:
            chunk.layer, chunk.row = chunk.layer + 1, 0

    @torch.inference_mode()
    def advance(self, part: Any, size: int, budget: float | None,
                cut: float | None = None) -> torch.Tensor | None:
        """Run layers of ``part``'s chunks (``size`` tokens each) for about ``budget`` seconds
        (None: to the end of the current chunk): whole layers while they fit, then the next
        layer's rows in blocks that fit (at least one block, or one layer that cannot be split).
        While rows decode, chunks are cut to ``cut`` seconds a layer (by default ``budget``:
        this step's budget may be less, engine/long_prompts.py). Returns the prompt's
        next-token logits (1, vocab) once its last chunk's last layer ran, else None."""
        if self.pieces is not None and (budget is not None or _mid_layer(part.sliced)):
            done, logits = self._advance_pieces(part, size, budget, cut)
            if done or budget is not None:
                return logits
        start = time.perf_counter()
        n = len(part.prompt.input_ids)
        cut = budget if cut is None else cut
        first = True
        while True:
            # What fits is planned before a chunk begins: one whose first rows do not fit is
            # left for the next slice (it may be longer and sit later than the layer just run).
            left = None if budget is None else budget - (time.perf_counter() - start)
            rows = self._rows(part, size, cut, left, first)
            if rows == 0:
                return None
            if part.sliced is None:
                part.sliced = self._begin_chunk(part, self.chunk_size(part.done, size, cut))
                if rows < part.sliced.tokens and not self._splittable(part.sliced):
                    if not first:  # a block was planned, but its mask cannot be cut
                        return None
                    rows = part.sliced.tokens
            chunk: _Chunk = part.sliced
            self._run_rows(part, chunk, rows)
            first = False
            if chunk.layer == len(self.layers):
                logits = self._end_chunk(part, chunk)
                if logits is not None or budget is None:
                    return logits

    def _end_chunk(self, part: Any, chunk: _Chunk) -> torch.Tensor | None:
        """The chunk ran every layer: the prompt's next-token logits after its last chunk."""
        part.sliced, part.done = None, chunk.end
        if chunk.end == len(part.prompt.input_ids):
            hidden = self.inner.norm(chunk.hidden)
            return self.model.lm_head(hidden[:, -1:, :])[:, -1, :]
        return None

    def _advance_pieces(self, part: Any, size: int, budget: float | None,
                        cut: float | None) -> tuple[bool, torch.Tensor | None]:
        """Run pieces of ``part``'s layers (engine/layer_pieces.py) for about ``cut`` seconds
        or ``budget`` when less (``cut`` by default ``budget``), at least one block; chunks keep
        ``size`` tokens. With no budget, the rest of the layer under way. (whether this call
        is over, the prompt's logits after its last chunk or None)."""
        pieces, begin = self.pieces, time.perf_counter()
        cut = budget if cut is None else cut
        first = True
        while True:
            chunk = part.sliced
            if chunk is None:
                # A chunk begins a slice: its embeddings and mask (1-3 ms late in a 4,000-token
                # prompt) then count against the time that slice's pieces are planned in.
                if not first:
                    return True, None
                chunk = part.sliced = self._begin_chunk(part, size)
            start, tokens, phase, r0 = chunk.start, chunk.tokens, chunk.phase, chunk.row
            allowed = None if budget is None else min(cut, budget) - (time.perf_counter() - begin)
            name = layer_pieces.PHASES[phase]
            rows = pieces.rows_within(name, start, r0, tokens, allowed)
            if rows == 0:
                if not first:
                    return True, None
                rows = min(tokens - r0, layer_pieces.BLOCK_ROWS)
            # The attention's mask cut from the chunk's own (built once per chunk, as for a
            # whole layer), except for the prompt's first rows, which attend causally.
            mask = self._block_mask(chunk, r0, r0 + rows) if name == "attend" and start + r0 > 0 else None
            pieces.run(name, self.layers[chunk.layer], chunk.layer, chunk, part.cache, r0, r0 + rows, mask)
            first = False
            chunk.row = r0 + rows
            if chunk.row < tokens:
                continue
            chunk.row, chunk.phase = 0, phase + 1
            if chunk.phase < len(layer_pieces.PHASES):
                continue
            # The next layer reads this one's output and writes over its input: the buffers are
            # reused layer after layer (memory new to the process can cost ~40 us a page).
            chunk.phase, chunk.layer = 0, chunk.layer + 1
            chunk.hidden, chunk.out = chunk.out, chunk.hidden
            if chunk.layer == len(self.layers):
                logits = self._end_chunk(part, chunk)
                if logits is not None or budget is None:
                    return True, logits
            if budget is None:
                return False, None  # the layer under way is done: whole layers from here


def _mid_layer(chunk: _Chunk | None) -> bool:
    """Whether the chunk's layer under way is partly run in pieces."""
    return chunk is not None and (chunk.phase > 0 or chunk.row > 0)
