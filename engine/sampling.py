"""Per-request token choice inside a batch: each row keeps its own temperature, top-p,
top-k, repetition penalty and seed."""
from __future__ import annotations

import torch

from core.types import GenerationParams
from engine import native_step


class RowSampler:
    """Sampling state of one request: its parameters, its RNG and the tokens it has seen."""

    def __init__(self, params: GenerationParams, prompt_ids: list[int], device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.penalize = params.repetition_penalty != 1.0
        self.seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long, device=device) if self.penalize else None

    def note(self, token: int) -> None:
        if self.penalize:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([token])]).unique()

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and not self.penalize


def choose_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """One token per row of ``logits`` (batch, vocab)."""
    if all(r.plain_greedy for r in rows):  # the common fast path: one argmax for the batch
        fast = native_step.argmax_rows(logits)  # the same indices, ~3x faster than ATen's here
        if fast is not None:
            return fast
        # bf16's argmax runs at half the speed of fp32's on the CPU; the widening is exact.
        return (logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits).argmax(dim=-1).tolist()
    logits = logits.float()
    out: list[int] = []
    for i, row in enumerate(rows):
        scores = logits[i]
        p = row.params
        if row.penalize and row.seen.numel():
            picked = scores[row.seen]
            scores = scores.clone()
            scores[row.seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
            scores = _finite(scores)  # a tiny penalty overflows: the limit is "those tokens win"
        if p.greedy:
            out.append(int(scores.argmax()))
            continue
        scores = _finite(scores / p.temperature)
        if 0 < p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            drop[0] = False  # the most likely token always stays (top_p 0 means: only it)
            scores = scores.index_fill(0, order[drop], float("-inf"))
        probs = scores.softmax(-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            out.append(int(scores.argmax()))  # no usable distribution left: its limit is greedy
            continue
        out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return out


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """Scores without NaN or +inf (-inf stays: it means "never"), so softmax stays defined."""
    return scores.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)
