"""The OpenAI wire protocol as the remote engine speaks it: request bodies from our domain types
(images as ``data:`` URLs), the server-sent events of a streamed answer, and remote error messages
cleaned of internals before a client sees them."""
from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from core.types import GenerationParams
from llm.types import ChatMessage, ImagePart

MAX_MESSAGE_CHARS = 300
# Servers that take the sampling extensions (top_k, repetition_penalty, ignore_eos) of vLLM's API.
EXTENDED_FRAMEWORKS = ("vllm", "sglang", "llama.cpp")


@dataclass(frozen=True)
class RemotePrompt:
    """What the remote receives: chat messages (it applies its own chat template) or a raw prompt."""

    path: str               # /v1/chat/completions or /v1/completions
    body: dict[str, Any]    # the request body without the sampling parameters
    prompt_text: str        # the text of the prompt, to count tokens when the remote gives no usage


def image_data_url(image: Image.Image) -> str:
    """A PNG ``data:`` URL (lossless: OCR prompts read small print)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG", optimize=False, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def encode(messages: list[ChatMessage] | None, prompt: str | None) -> RemotePrompt:
    """Our domain request as the remote's request (CPU work for images: call off the event loop)."""
    if messages is None:
        return RemotePrompt("/v1/completions", {"prompt": prompt or ""}, prompt or "")
    turns, texts = [], []
    for m in messages:
        if isinstance(m.content, str):
            turns.append({"role": m.role, "content": m.content})
            texts.append(m.content)
            continue
        parts = []
        for p in m.content:
            if isinstance(p, ImagePart):
                if not isinstance(p.data, Image.Image):
                    p = ImagePart(Image.open(io.BytesIO(p.data)))
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(p.data)}})
            else:
                parts.append({"type": "text", "text": p})
                texts.append(p)
        turns.append({"role": m.role, "content": parts})
    return RemotePrompt("/v1/chat/completions", {"messages": turns}, "\n".join(texts))


def sampling(params: GenerationParams, framework: str) -> dict[str, Any]:
    """Our sampling parameters in the OpenAI request's names (extensions only where understood)."""
    out: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature}
    if params.top_p != 1.0:  # 1.0 is every server's default: unsent, it cannot switch a sampler path on
        out["top_p"] = params.top_p
    if params.seed is not None:
        out["seed"] = params.seed
    if params.stop:
        out["stop"] = list(params.stop)
    if framework in EXTENDED_FRAMEWORKS:
        if params.top_k:
            out["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            out["repetition_penalty"] = params.repetition_penalty
        if params.ignore_eos:
            out["ignore_eos"] = True
    return out


@dataclass(frozen=True)
class Chunk:
    """One streamed event of the remote: new text, and at the end a finish reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None  # prompt, completion tokens
    error: str | None = None              # an error event inside the stream


def parse_event(data: str | bytes) -> Chunk | None:
    """A ``data:`` payload of the stream, text or UTF-8 bytes (None for the [DONE] marker). Raises
    ValueError when it is not the OpenAI chunk shape."""
    data = data.strip()
    if data == b"[DONE]" or data == "[DONE]":
        return None
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    if "error" in obj:
        return Chunk(error=error_text(obj) or "the remote engine failed")
    text, finish = "", None
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            raise ValueError("bad choice")
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        text += piece if isinstance(piece, str) else ""
        finish = choice.get("finish_reason") or finish
    usage = obj.get("usage")
    counted = None
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        counted = (int(usage.get("prompt_tokens") or 0), int(usage["completion_tokens"]))
    return Chunk(text, finish if finish in ("stop", "length") else ("stop" if finish else None), counted)


def error_text(obj: Any) -> str:
    """The message inside a remote error body (OpenAI, FastAPI or llama.cpp shapes), cleaned."""
    msg: Any = obj
    if isinstance(obj, dict):
        msg = obj.get("error", obj.get("detail", obj.get("message", "")))
        if isinstance(msg, dict):
            msg = msg.get("message", msg.get("detail", ""))
        if isinstance(msg, list) and msg and isinstance(msg[0], dict):  # pydantic errors of FastAPI
            msg = "; ".join(str(e.get("msg", "")) for e in msg[:3])
    return clean(str(msg)) if msg else ""


def error_from_body(raw: bytes) -> str:
    try:
        return error_text(json.loads(raw.decode("utf-8", "replace")))
    except ValueError:
        return clean(raw.decode("utf-8", "replace"))


_TRACEBACK = re.compile(r"Traceback \(most recent call last\).*", re.DOTALL)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?|\b[A-Za-z]:\\\S+")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_HOST = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\blocalhost(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")
_FILE_LINE = re.compile(r'File "[^"]*", line \d+')


def clean(message: str) -> str:
    """A remote's message without tracebacks, URLs, paths, addresses or hosts, and short."""
    message = _TRACEBACK.sub("", message)
    for pattern, repl in ((_FILE_LINE, ""), (_URL, "<url>"), (_PATH, "<path>"), (_ADDRESS, "<address>"),
                          (_HOST, "<host>")):
        message = pattern.sub(repl, message)
    message = " ".join(message.split())
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 1].rstrip() + "…"
    return message


_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def count_tokens(text: str) -> int:
    """Tokens of a text when the remote reports none: words and punctuation marks, an estimate
    (BPE tokenizers give about as many for English prose)."""
    return len(_WORDS.findall(text))
