"""Reuse of prompt prefixes' KV across requests: a shared system prompt, the same instruction,
a chat history resent with one more turn.

Prefixes are cut at block boundaries (``block`` tokens). Each stored entry is the KV of one
prompt's longest block-aligned prefix (leaving at least one token to prefill, which yields the
next-token logits), and it is findable under every block boundary inside it, so a later prompt
that shares only the first blocks reuses those. Keys are the exact token ids (a hash for the
lookup, the ids compared on a hit), so a hit is always the same tokens. Memory is bounded:
least recently used entries go first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): (1, heads, len, dim)
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 32) -> None:
        self.max_bytes = max_bytes
        self.block = block
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # LRU order, oldest first
        self._index: dict[tuple[int, ...], _Entry] = {}  # every block-aligned prefix -> an entry holding it
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def usable(self, n_tokens: int) -> int:
        """How many of a prompt's tokens a cached prefix may cover (one is always prefilled)."""
        return (n_tokens - 1) // self.block * self.block

    def find(self, ids: list[int]) -> int:
        """Length of the longest cached prefix of ``ids`` (0: none); changes nothing."""
        for end in range(self.usable(len(ids)), 0, -self.block):
            if tuple(ids[:end]) in self._index:
                return end
        return 0

    def lookup(self, ids: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """(length, per-layer KV views) of the longest cached prefix of ``ids``, or None."""
        for end in range(self.usable(len(ids)), 0, -self.block):
            entry = self._index.get(tuple(ids[:end]))
            if entry is not None:
                self._entries.move_to_end(entry.ids)
                self.hits += 1
                return end, [(k[:, :, :end], v[:, :, :end]) for k, v in entry.layers]
        self.misses += 1
        return None

    def covers(self, ids: list[int]) -> bool:
        """Whether storing ``ids`` would add nothing (its usable prefix is already held)."""
        end = self.usable(len(ids))
        return end == 0 or tuple(ids[:end]) in self._index

    def store(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], copy: bool = True) -> None:
        """Keep the KV (per layer (1, heads, >= usable, dim)) of ``ids``' usable prefix.
        ``copy=False``: the caller hands the tensors over and never writes them again (a
        finished prefill's own cache), so views of them are kept instead of copies."""
        end = self.usable(len(ids))
        if end == 0 or self.max_bytes <= 0:
            return
        key = tuple(ids[:end])
        if key in self._index:
            return
        kept = [(k[:, :, :end], v[:, :, :end]) if not copy else (k[:, :, :end].clone(), v[:, :, :end].clone())
                for k, v in layers]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kept)
        if nbytes > self.max_bytes:
            return
        while self.bytes + nbytes > self.max_bytes and self._entries:
            self._evict()
        entry = _Entry(key, kept, nbytes)
        self._entries[key] = entry
        self.bytes += nbytes
        for b in range(self.block, end + 1, self.block):
            self._index[key[:b]] = entry  # the newest entry wins a shared boundary

    def _evict(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self.bytes -= entry.nbytes
        for b in range(self.block, len(entry.ids) + 1, self.block):
            prefix = entry.ids[:b]
            if self._index.get(prefix) is entry:
                # Another entry may hold the same prefix: point the boundary at it, else drop it.
                other = next((e for e in reversed(self._entries.values()) if e.ids[:b] == prefix), None)
                if other is None:
                    del self._index[prefix]
                else:
                    self._index[prefix] = other

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.bytes = 0
