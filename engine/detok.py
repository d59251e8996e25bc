"""Incremental detokenization that only ever emits whole UTF-8 characters.

Byte-level BPE splits a multi-byte character (common in Chinese and Russian) across
tokens; decoding such a prefix yields U+FFFD. The text is held back until the character
is complete. Only a short window of recent tokens is decoded per step.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window whose text was already emitted
        self._read = 0    # end of the emitted part of the window

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if len(full) > len(emitted) and not full.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return full[len(emitted):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        emitted = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return full[len(emitted):]
