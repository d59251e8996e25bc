"""A KV cache layer that grows in place: one buffer per layer with headroom, written at the end
each step, instead of transformers' ``DynamicLayer``, which concatenates the whole cache with
the new token on every step (a copy of every layer's keys and values per token: at 16 rows and
1,000 positions that copy was a quarter of the decode step, docs/BENCHMARKS.md).

``keys`` and ``values`` stay plain attributes to their readers (views of the used part), and
assigning them adopts the tensor as the new buffer; the next step that does not fit grows it by
a quarter (at least GROW_MIN positions). When rows leave the batch (``keep_rows``), the rest move
up inside the buffer and the columns nobody needs are cut off by a view, so nothing is allocated
and the headroom stays; a buffer left much larger than its rows need is given back one layer per
step over the next STAGGER steps.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

GROW_MIN = 64  # positions of headroom at least, per reallocation
# All layers fill up at the same step, and growing them all at once made that step twice as
# long (4 rows of SmolLM2 at 1,036 positions: 71 against 35 ms). So layer i grows when i % STAGGER
# positions of headroom are left: one layer or a few per step over STAGGER steps (< GROW_MIN,
# so a grown layer never grows again at once).
STAGGER = 32


class GrowingLayer(DynamicLayer):
    def __init__(self, expect: int = 0) -> None:
        super().__init__()
        # Positions known to come (a prompt prefilled chunk by chunk): the first buffer holds
        # them all, so each chunk is written in place instead of into a new, larger buffer.
        self.expect = expect
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0   # positions of keys in use
        self._vn = 0  # of values: the same after every update; apart only between two assignments
        self.early = 0  # grow this many positions before the buffer is full (STAGGER)
        self.owned = False  # the buffers were allocated here or handed over (``adopt``): rows may move in them

    @property
    def keys(self) -> torch.Tensor | None:
        return self._k[:, :, :self._n] if self._k is not None and self._k.dim() == 4 else self._k

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k, self.owned = t, False  # maybe someone else's (a prefix cache entry's): never written over
        self._n = t.shape[-2] if t is not None and t.dim() == 4 else 0

    @property
    def values(self) -> torch.Tensor | None:
        return self._v[:, :, :self._vn] if self._v is not None and self._v.dim() == 4 else self._v

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v, self.owned = t, False
        self._vn = t.shape[-2] if t is not None and t.dim() == 4 else 0

    @property
    def used(self) -> int:
        """Positions of keys and values in use."""
        return self._n

    @property
    def capacity(self) -> int:
        return self._k.shape[-2] if self._k is not None and self._k.dim() == 4 else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, used = key_states.shape[-2], self._n
        self.reserve(n, key_states, value_states)
        self._k[:, :, used:used + n] = key_states
        self._v[:, :, used:used + n] = value_states
        self._n = self._vn = used + n
        return self.keys, self.values

    def reserve(self, n: int, key_like: torch.Tensor, value_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for ``n`` more positions of a batch shaped like ``key_like``/``value_like``
        (batch, heads, any, dim); return the whole buffers. The native decode step writes into
        them and then calls ``advance``."""
        used = self._n
        if self._vn != used:
            raise RuntimeError("keys and values of a cache layer were assigned different lengths")
        size = self.expect if used + n <= self.expect else used + n + max(GROW_MIN, (used + n) // 4)
        if used + n + self.early > self.capacity or self._v.shape[-2] < used + n or self._k.shape[0] != key_like.shape[0] \
                or used % STAGGER == self.early and self._oversized(key_like, size):
            k = key_like.new_empty((*key_like.shape[:2], size, key_like.shape[3]))
            v = value_like.new_empty((*value_like.shape[:2], size, value_like.shape[3]))
            if used:
                k[:, :, :used] = self._k[:, :, :used]
                v[:, :, :used] = self._v[:, :, :used]
            self._k, self._v, self.owned = k, v, True
        return self._k, self._v

    def _oversized(self, key_like: torch.Tensor, size: int) -> bool:
        """Whether the buffer's memory is over twice what a fresh one of ``size`` positions takes
        (rows left, or a long row's positions were cut off by ``keep_rows``)."""
        fresh = key_like.shape[0] * key_like.shape[1] * size * key_like.shape[3] * key_like.element_size()
        return self._k.untyped_storage().nbytes() > 2 * fresh

    def keep_rows(self, rows: list[int], start: int) -> None:
        """Keep these rows (in this order) and the positions from ``start`` on. Rows in their
        order move up in place (only those after a row that left are copied) and the rest is
        cut off by a view, so the headroom stays and nothing is allocated; the memory comes back
        when ``reserve`` finds the buffer oversized. A buffer that may be someone else's, or
        rows in another order, are copied to a new buffer with headroom."""
        used = self._n - start
        if self.owned and all(a < b for a, b in zip(rows, rows[1:])):
            for to, row in enumerate(rows):
                if to != row:
                    self._k[to, :, start:self._n].copy_(self._k[row, :, start:self._n])
                    self._v[to, :, start:self._n].copy_(self._v[row, :, start:self._n])
            self._k, self._v = self._k[:len(rows), :, start:], self._v[:len(rows), :, start:]
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self._k.device)
            size = used + max(GROW_MIN, used // 4)
            k = self._k.new_empty((len(rows), self._k.shape[1], size, self._k.shape[3]))
            v = self._v.new_empty((len(rows), self._v.shape[1], size, self._v.shape[3]))
            k[:, :, :used] = self._k[index, :, start:self._n]
            v[:, :, :used] = self._v[index, :, start:self._n]
            self._k, self._v, self.owned = k, v, True
        self._n = self._vn = used

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, used: int) -> None:
        """Take these buffers (batch, heads, capacity, dim) with ``used`` positions filled; they
        are this layer's alone from now on."""
        self._k, self._v, self.owned = keys, values, True
        self._n = self._vn = used

    def advance(self, n: int) -> None:
        """``n`` positions were written after the used part (by the native decode step)."""
        self._n = self._vn = self._n + n


def expecting(cache: Any, positions: int) -> Any:
    """Make a fresh transformers cache's plain dynamic layers growing ones whose first buffer
    holds ``positions`` (a long prompt's length, prefilled chunk by chunk into it). Each chunk's
    keys and values are then written once, in place: concatenated, every chunk wrote a new
    buffer of all the positions before it, on memory new to the process (on a virtual machine
    that gives freed memory back to its host, a page fault there cost ~40 us: a 32-token layer
    late in a 4,000-token prompt took 160 ms instead of 12). Returns the cache."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or []):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            layers[i] = GrowingLayer(expect=positions)
    return cache


def make_growing(cache: Any) -> Any:
    """Swap a transformers cache's plain dynamic layers for growing ones, in place (sliding-window
    and other layer kinds are left as they are). Returns the cache."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if isinstance(layer, GrowingLayer):  # a long prompt's own (``expecting``) becoming a batch's
            layer.early, layer.expect = i % STAGGER, 0
        elif type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            grown = GrowingLayer()
            grown.early = i % STAGGER
            grown.dtype, grown.device, grown.is_initialized = layer.dtype, layer.device, True
            grown.keys, grown.values = layer.keys, layer.values
            layers[i] = grown
    return cache
