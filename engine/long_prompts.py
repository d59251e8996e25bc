"""Long prompts: prefilled chunk by chunk between decode steps (a few decoder layers per step
for Llama-architecture models, engine/sliced_prefill.py), from a cached prefix when there is
one, and joined into the batch with as little copying as the running rows allow: while they
decode, the finished prompt's KV is staged into the batch's new buffers a few layers per step.

A mixin of engine/backend.py's BatchBackend: it reads and joins that batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine.kv_cache import GROW_MIN, expecting
from engine.prompts import EncodedPrompt

# By default a long prompt's slice between decode steps takes about this share of a decode
# step's time (the model setting `prefill_slice_share`): the decoding rows' gaps are then about
# 1.5 times their usual step (engine/sliced_prefill.py). At 0.75 a 4,000-token prompt's first
# token came ~30% sooner and the gaps were 1.75 steps, past 2 more often (docs/BENCHMARKS.md).
SLICE_OF_STEP = 0.5
# A decode step up to this many times the usual (engine/backend.py USUAL_QUANTILE: the median
# of the last 16 steps) leaves the slice after it its whole budget; a slower one's excess comes
# out of it, and a slice left no room for a layer waits for the next step, though not more than
# MAX_WAITS steps in a row (the prompt must progress). In the ninth session, measured on the
# masked step (what the benchmark then ran), 1.5 gave worst gaps of 2.3-2.5 steps against
# 2.2-2.9 with no guard, and 1.25 made the prompt's first token come later (90-98 s against
# 71-80 s) with no better worst gaps. On the server's ragged step (sixteenth session, five runs,
# each with both), 1.25 gave worst gaps of 2.0-2.17 steps against 2.07-2.4 at 1.5, lower in
# every run, the first token at 41.7-50.8 s against 43.0-49.8 s (docs/BENCHMARKS.md). With
# layers in pieces (engine/layer_pieces.py, eighteenth session) a slice gives up a slow step's
# excess in blocks of rows, without waiting for a whole layer to fit: at 1.0, five runs, each
# with both, gave worst gaps of 1.76-1.85 steps (99th percentile 1.56-1.63) against 1.81-2.31
# (1.68-1.75) at 1.25, the first token no later (31.8-37.9 s against 31.5-38.2 s). With whole
# layers 1.0 had been no better than 1.25 (seventeenth session).
SLOW_STEP = 1.0
MAX_WAITS = 3
# While rows decode, a slice's pieces of layers (engine/layer_pieces.py) are planned to fill
# this share of its budget, or where layers run whole, a chunk is cut so that one of its layers
# takes it (engine/sliced_prefill.py), not the whole budget: a layer then still runs after a
# step a little slower than SLOW_STEP usual ones, and one that runs slower than planned (1 in
# ~100 takes 1.5 times its plan, a few a join 2-3.5 times) stays further from twice a step.
# With pieces (eighteenth session, three runs), 0.65 instead gave worst gaps of 1.79-2.14 steps
# against 1.85-2.23 and a 99th percentile ~0.1 lower, with the first token ~25% later.
# Seventeenth session, fifteen runs against eight with the whole budget (1.0): worst gaps
# 1.87-1.98 steps in eight of the fifteen and 2.11-3.54 in seven, against 1.98-2.97 (seven of
# the eight over 2); 99th percentile 1.70-1.79 against 1.79-1.85; the long prompt's first
# token 20-30% later (docs/BENCHMARKS.md). In the four runs over 2 that were timed, the worst
# gap was a decode step alone at 2.07-2.14 steps (no slice ran), a layer at 3.5 times its plan,
# or time the hypervisor took (3.54, 2.03 without it): the machine's own stalls, which the
# control (nothing joining) shows too, over 2 in 3 of 10 runs. Both budgets are shares of the
# usual step (the median of the last 16, as a slow step is judged against), not of the steps'
# moving average (no different in two runs; the median is the one a slow step does not raise).
LAYER_FIT = 0.8


class LongPrompts:
    """BatchBackend's long prompts: chunked or layer-sliced prefill, prefix-cache hits, staged joins."""

    def _prefill_after(self, prompt: EncodedPrompt, start: int, layers: list) -> torch.Tensor:
        """Prefill one prompt whose first ``start`` tokens' KV is cached: only the rest runs."""
        part = PartialPrefill(prompt, self._seeded_cache(layers, len(prompt.input_ids)), start)
        return self._run_part(part, len(prompt.input_ids) - start)

    def _prefill_after_many(self, prompts: list[EncodedPrompt], hits: list[tuple[int, list]]) -> torch.Tensor:
        """Prefill prompts whose prefixes are cached, together: one forward and one join for all.

        Every row runs the same number of tokens R (the longest uncached rest): a row with a
        shorter rest takes a shorter part of its cached prefix (a prefix of a cached prefix is
        valid KV) and recomputes the difference; a prompt shorter than R runs whole. The cached
        parts are right-aligned, so each row is left-padded as in a plain batched prefill."""
        lengths = [len(p.input_ids) for p in prompts]
        run = max(n - start for n, (start, _) in zip(lengths, hits))
        kept = [max(0, n - run) for n in lengths]  # cached positions each row reads
        width = max(kept)
        rows, total = len(prompts), width + run
        ids = torch.full((rows, run), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, total), dtype=torch.long)
        for i, (p, n, k) in enumerate(zip(prompts, lengths, kept)):
            ids[i, run - (n - k):] = torch.tensor(p.input_ids[k:])
            mask[i, total - n:] = 1
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer, parts in enumerate(zip(*(layers for _, layers in hits))):
            if width:
                k0, v0 = parts[0]
                keys = k0.new_zeros((rows, k0.shape[1], width, k0.shape[3]))
                values = v0.new_zeros((rows, v0.shape[1], width, v0.shape[3]))
                for i, ((k, v), n) in enumerate(zip(parts, kept)):
                    keys[i, :, width - n:] = k[0, :, :n]
                    values[i, :, width - n:] = v[0, :, :n]
                cache.update(keys, values, layer)
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, width:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache if width else None, use_cache=True, logits_to_keep=1)
        self._remember(prompts, out.past_key_values, total)
        self._join(out.past_key_values, mask, torch.zeros((rows, 1), dtype=torch.long, device=self.device))
        return out.logits[:, -1, :]

    def _seeded_cache(self, layers: list | None, positions: int) -> Any:
        """A cache for a prompt of ``positions`` tokens (engine/kv_cache.py ``expecting``),
        holding the cached prefix ``layers`` when there are some."""
        from transformers import DynamicCache

        cache = expecting(DynamicCache(config=self.model.config), positions)
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
        return PartialPrefill(prompt, self._seeded_cache(layers, len(prompt.input_ids)), start)

    @torch.inference_mode()
    def prefill_chunk_step(self, part: "PartialPrefill") -> torch.Tensor | None:
        """Run the next slice (a few layers, engine/sliced_prefill.py) or chunk; after the last
        one the row joins the batch and its next-token logits (1, vocab) are returned, before
        that None."""
        if self.sliced is None:
            return self._run_part(part, self.prefill_chunk)
        # While rows decode, a slice takes a share of their usual step; alone, a whole chunk.
        cut = budget = None
        if self.batch_size and self.last_step is not None:
            # The slice runs after the step the rows just took, before their tokens go out: a
            # step that ran slow (now and then 1.5-2.8 times the usual on a busy or virtual
            # machine) has spent part of the gap already. Its excess over SLOW_STEP steps comes
            # out of the slice, which waits (at most MAX_WAITS steps in a row) when not even
            # its least run (one block of rows with pieces, else a layer) fits: a slow step and
            # a full slice together made the worst gaps. The slice is planned at LAYER_FIT of
            # the share (pieces fill that much; whole layers are cut to it).
            took, usual = self.last_step
            share = self.slice_share * usual
            cut, budget = LAYER_FIT * share, share - max(0.0, took - SLOW_STEP * usual)
            if budget < cut and part.logits is None and part.waits < MAX_WAITS:
                need = self.sliced.next_slice_time(part, self.prefill_chunk, cut)
                if need is not None and need > budget:
                    part.waits += 1
                    return None
        part.waits = 0
        if part.logits is None:
            part.logits = self.sliced.advance(part, self.prefill_chunk, budget, cut)
            if part.logits is None:
                return None
            if budget is not None:
                self._remember([part.prompt], part.cache, len(part.prompt.input_ids), copy=False)
                part.remembered = True
                return None  # rows are decoding: the join's copies come in the next steps
        elif budget is not None and not self._staged(part, budget, cut):
            return None
        self._finish_part(part)
        return part.logits

    def _staged(self, part: "PartialPrefill", budget: float, cut: float | None = None) -> bool:
        """Build the buffers the batch takes at the finished prompt's join, a few layers per step
        within ``budget`` seconds (the join is planned at ``cut`` seconds a step, by default
        ``budget``, which is less after a slow step: see prefill_chunk_step); True when the row
        joins in this step: once done, or when the batch's steps do not run compiled (no ragged
        cache), its rows are about as long as the prompt, or it changed size (then the join
        copies everything).

        First the new row's KV goes in place. Then the running rows' positions are copied to
        where they sit once the row joins, right-aligned with it: the join is planned for a
        given batch width (the rows gain one position per step), far enough ahead for the copies
        at the pace the first phase ran. The join then copies only each layer's positions
        decoded since its layer was staged, not every running row's whole history."""
        n = len(part.prompt.input_ids)
        if part.stage is None:
            # Staged, the join leaves the cache ragged, even with less padding than RAGGED_MIN_PAD
            # (rows about as long as the prompt): a join that pads copies every row's whole
            # history in one step instead (4 streams of 1,600 tokens as a 4,000-token prompt
            # joined, when such a join still padded: 1,030 ms; docs/BENCHMARKS.md).
            if not self._may_be_ragged() or self.mask.shape[1] + 8 > n:
                return True
            part.stage = _Stage(self.batch_size, max(GROW_MIN, n // 4), self.layout)
        stage = part.stage
        if stage.rows != self.batch_size:
            return True
        clock = _Clock(budget)
        layers = part.cache.layers
        # The new row in place, a piece at a time (a layer's copy lands on memory new to the
        # process: on a virtual machine whose host takes freed memory back, ~40 us a page, so a
        # layer of 4,000 positions took 40-50 ms, more than a slice's budget).
        while stage.placed < len(layers):
            new = layers[stage.placed]
            if len(stage.buffers) == stage.placed:
                stage.buffers.append(tuple(t.new_empty((stage.rows + 1, t.shape[1], n + stage.spare, t.shape[3]))
                                           for t in (new.keys, new.values)))
            k, v = stage.buffers[stage.placed]
            step = _piece(new.keys)
            while stage.new_done < n:
                if not clock.room():
                    return False
                a, b = stage.new_done, min(n, stage.new_done + step)
                k[stage.rows:, :, a:b].copy_(new.keys[:, :, a:b])
                v[stage.rows:, :, a:b].copy_(new.values[:, :, a:b])
                stage.copy_bytes += 2 * new.keys[:, :, a:b].numel() * new.keys.element_size()
                stage.copy_seconds += clock.took()
                stage.new_done = b
            stage.placed, stage.new_done = stage.placed + 1, 0
        width = self.mask.shape[1]
        # The rows decode once per engine step; should a call come without a step between
        # (nothing in the engine does that), the join cannot come as planned: it comes now.
        stalled, stage.width_seen = width == stage.width_seen, width
        if stage.layout != self.layout or not stage.join_width or width > stage.join_width:
            self._plan_join(stage, width, budget if cut is None else cut, stage.copy_bytes / max(stage.copy_seconds, 1e-6))
        if stage.join_width > n:  # too close to the prompt's length to plan: the join copies all
            return True
        offset = n - stage.join_width
        # Where the join and the first decode steps after it write, touched once a layer's
        # copy is done, within the budget, instead of at the join or on one step for all layers:
        # the running rows' positions decoded until the join, and the first pages after the prompt.
        while stage.next < len(layers):
            if not clock.room():
                break
            i = stage.next
            layer, (k, v) = self.cache.layers[i], stage.buffers[i]
            a, b = stage.copied[i], min(width, stage.copied[i] + _piece(layer.keys))
            k[:stage.rows, :, offset + a:offset + b].copy_(layer.keys[:, :, a:b])
            v[:stage.rows, :, offset + a:offset + b].copy_(layer.values[:, :, a:b])
            stage.copied[i] = b
            if b == width:  # this layer is done; the join copies what the rows decode meanwhile
                after = min(stage.spare, 2 * max(1, 4096 // (k.shape[3] * k.element_size())))  # two pages' worth
                for t in (k, v):
                    t[:stage.rows, :, offset + b:n].zero_()
                    t[:, :, n:n + after].zero_()
                stage.next += 1
            stage.rows_bytes += 2 * layer.keys[:, :, a:b].numel() * layer.keys.element_size()
            stage.rows_seconds += clock.took()
            stage.rows_pieces += 1
        if stage.next < len(layers) and stage.rows_pieces >= 2 and width < stage.join_width:
            # Behind the plan at the pace these copies really run (memory new to the process
            # may cost ten times what the new row's pieces did): planned again now, at that
            # pace, rather than a join that copies what is left in one step (1 s once). Each
            # step copies at least a piece.
            keys = self.cache.layers[0].keys
            left = [width - c for i, c in enumerate(stage.copied) if i >= stage.next]
            rate = stage.rows_bytes / max(stage.rows_seconds, 1e-9)
            per_position = 2 * keys[:, :, :1].numel() * keys.element_size()
            need = min(math.ceil(sum(left) * per_position / max((budget if cut is None else cut) * rate, 1.0)),
                       sum(-(-x // _piece(keys)) for x in left))
            if need > stage.join_width - width - 1:
                self._plan_join(stage, width, budget if cut is None else cut, rate)
                stage.replans += 1
        return width == stage.join_width or stalled and stage.next == len(layers)

    def _plan_join(self, stage: "_Stage", width: int, per_step: float, rate: float) -> None:
        """Plan the join: the running rows' copies (bytes at ``rate`` a second, ``per_step``
        seconds a step, at least a piece a step) get twice the steps they need; the copies
        start again from their first position."""
        layers = self.cache.layers
        keys = layers[0].keys
        total = 2 * len(layers) * keys[:, :, :width].numel() * keys.element_size()
        steps = math.ceil(total / max(per_step * rate, 1.0))
        steps = max(1, min(steps, len(layers) * -(-width // _piece(keys))))
        stage.layout, stage.copied, stage.next = self.layout, [0] * len(layers), 0
        stage.join_width = width + 2 * steps + 1
        stage.rows_bytes, stage.rows_seconds, stage.rows_pieces = 0, 0.0, 0

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
            # The new row is in place already, and the running rows' positions up to where each
            # layer was staged when the join came as planned: only the rest is copied.
            width = self.mask.shape[1]
            planned = stage.layout == self.layout and stage.join_width == width
            for i, (layer, (k, v)) in enumerate(zip(self.cache.layers, stage.buffers)):
                done = stage.copied[i] if planned else 0
                k[:stage.rows, :, n - width + done:n].copy_(layer.keys[:, :, done:])
                v[:stage.rows, :, n - width + done:n].copy_(layer.values[:, :, done:])
                layer.adopt(k, v, n)
            self.mask = torch.cat([F.pad(self.mask, (n - width, 0)), mask])
            self.deltas = torch.cat([self.deltas, deltas])
            self.ragged = True
            self.layout += 1
        else:  # rows left or joined meanwhile, or no staging: one copy of everything
            self._join(part.cache, mask, deltas)
        part.stage = None


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
    waits: int = 0  # engine steps in a row it ran nothing (they ran slow)


# A staged copy runs in pieces of about this many bytes, each checked against the slice's
# budget: small enough that one piece on memory new to the process stays within a step's
# share (64 pages at ~40 us a page on the virtual machine above), large enough to copy at speed.
PIECE_BYTES = 256 << 10


def _piece(t: torch.Tensor) -> int:
    """Positions of ``t`` (batch, heads, positions, dim) in one piece of a staged copy."""
    per_position = t.shape[0] * t.shape[1] * t.shape[3] * t.element_size()
    return max(16, PIECE_BYTES // max(per_position, 1))


class _Clock:
    """A slice's time within ``budget`` seconds (None: no limit), piece by piece: there is room
    for another piece while the time so far plus the last piece's fits; the first always runs."""

    def __init__(self, budget: float | None) -> None:
        self.budget, self.start = budget, time.perf_counter()
        self.mark, self.last = self.start, 0.0

    def room(self) -> bool:
        if self.budget is not None and self.last and time.perf_counter() - self.start + self.last > self.budget:
            return False
        self.mark = time.perf_counter()
        return True

    def took(self) -> float:
        """The piece just run (since ``room``) took this long."""
        self.last = time.perf_counter() - self.mark
        return self.last


@dataclass
class _Stage:
    rows: int   # the batch's rows when staging began (the join uses the buffers only if unchanged)
    spare: int  # positions of headroom after the prompt
    layout: int  # the batch's layout (BatchBackend.layout) the running rows' copies were taken in
    buffers: list = field(default_factory=list)  # per layer (keys, values), the new row in place
    placed: int = 0             # layers whose new row is in place
    new_done: int = 0           # positions of the next layer's new row in place
    copy_bytes: int = 0         # the new row's bytes copied so far, and the time it took
    copy_seconds: float = 0.0
    join_width: int = 0         # the batch's width at the planned join (0: not planned yet)
    copied: list = field(default_factory=list)  # per layer, the running rows' positions in place (from the first)
    next: int = 0               # the layer whose running rows are being copied (those before are done)
    rows_bytes: int = 0         # the running rows' bytes copied since the plan, and the time it took
    rows_seconds: float = 0.0
    rows_pieces: int = 0
    replans: int = 0            # plans made again because the copies ran behind
    width_seen: int = 0         # the batch's width at the last call
