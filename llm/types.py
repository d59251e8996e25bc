"""Domain types of text generation, shared by every LLM surface (no HTTP types here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from PIL import Image

from core.types import GenerationParams


@dataclass(frozen=True)
class ImagePart:
    """An image inside a chat message: the raw file bytes (base64 already decoded),
    or a decoded PIL image once the service has checked and decoded it."""

    data: "bytes | Image.Image"


Part = Union[str, ImagePart]


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str | tuple[Part, ...]


@dataclass
class GenerateInput:
    """One generation request. Exactly one of ``messages`` (chat template applied) and
    ``prompt`` (raw text, no template) is set."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    model: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)

    @property
    def has_images(self) -> bool:
        return any(isinstance(p, ImagePart) for m in self.messages or () if not isinstance(m.content, str)
                   for p in m.content)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class StreamDelta:
    """A piece of a streamed reply. ``text`` is always whole UTF-8 characters (may be empty);
    the last delta has ``finish_reason`` ("stop" | "length") and ``usage`` set. ``more``: the
    next delta is already at hand (a remote sent several events in one read), so a writer may hold
    this one back and send both in one write."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    more: bool = False


@dataclass(frozen=True)
class GenerateOutput:
    text: str
    finish_reason: str
    usage: Usage
    model: str
    latency: float  # seconds from submission to the last token
    ttft: float     # seconds from submission to the first token
