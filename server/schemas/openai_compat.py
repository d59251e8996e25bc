"""Requests of the OpenAI-compatible surface (/v1); the responses are in ``openai_responses``.

Requests own their validation and their conversion to a ``GenerateInput``. Malformed values
(wrong type, out of range) fail pydantic validation (400 VALIDATION_ERROR, as OpenAI answers); well-formed values this server
cannot honour (n > 1, tools, logprobs, penalties, JSON mode) raise ``BadRequest`` (400) in the
conversion, with a stable code and the offending parameter.
Unknown fields are ignored: the SDK sends ``extra_body`` entries at the top level.

Images: ``data:`` URLs are decoded here. http(s) URLs are refused (400 IMAGE_URL_NOT_ALLOWED)
unless the operator enables ``image_urls``; then the router fetches the URLs the request lists
(``ChatCompletionRequest.remote_image_urls``, through ``core.remote_images``) before the
conversion and hands their bytes in, so the conversion stays synchronous.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema

from core.errors import BadRequest, PayloadTooLarge
from core.types import GenerationParams
from llm.types import ChatMessage, GenerateInput, ImagePart, Part
from server.schemas.json_types import JsonBool, JsonFloat, SignedSeed, json_int
from server.schemas.sse_doc import model_schema

MAX_STOP = 4
DEFAULT_MODEL_NAMES = ("", "default")


def documented_as(schema: dict[str, Any]) -> WithJsonSchema:
    """The schema OpenAPI shows for a field that parses more than it serves: values outside it
    still parse (the SDK may send them) and are then refused with a specific 400 in OpenAI's shape."""
    return WithJsonSchema(schema)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


class ModelResolver(Protocol):
    """What the conversion needs from the generation service (``services.llm``)."""

    def select(self, model: str | None, *, images: bool = False) -> str: ...

    def params_for(self, model_id: str, **overrides: Any) -> GenerationParams: ...


def unsupported(param: str, message: str) -> BadRequest:
    return BadRequest(message, param=param, code="UNSUPPORTED_PARAMETER")


# ---- images: data: URLs ------------------------------------------------------------------
def url_scheme(url: str) -> str:
    """The lower-case scheme of an image URL ("" when it has none)."""
    return url.split(":", 1)[0].strip().lower() if ":" in url else ""


def is_remote_image_url(url: str) -> bool:
    return url_scheme(url) in ("http", "https")


def image_bytes(url: str, *, max_bytes: int, param: str) -> bytes:
    """The bytes of a base64 ``data:`` URL. The encoded length is checked before decoding."""
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        raise BadRequest("image URLs (http/https) are not enabled on this server; send the image inline "
                         "as a data: URL (data:image/png;base64,...)", param=param, code="IMAGE_URL_NOT_ALLOWED")
    if scheme != "data":
        raise BadRequest("image_url.url must be a data: URL (data:image/png;base64,...)",
                         param=param, code="INVALID_IMAGE_URL")
    header, comma, payload = url.strip()[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise BadRequest("image_url.url must be a base64 data: URL (data:image/png;base64,...)",
                         param=param, code="INVALID_IMAGE_URL")
    if len(payload) > 4 * -(-max_bytes // 3):  # base64 of max_bytes bytes: 4 * ceil(n / 3) characters
        raise PayloadTooLarge(f"image is larger than {max_bytes / 2**20:g} MB", param=param, code="FILE_TOO_LARGE")
    if any(c in payload for c in "\n\r\t "):
        payload = "".join(payload.split())  # some encoders wrap lines
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image_url.url is not valid base64", param=param, code="INVALID_IMAGE_URL") from None
    if not data:
        raise BadRequest("image_url.url holds no data", param=param, code="INVALID_IMAGE_URL")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image is larger than {max_bytes / 2**20:g} MB", param=param, code="FILE_TOO_LARGE")
    return data


# ---- chat messages -----------------------------------------------------------------------
class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,...; or an https URL when the server enables image URLs "
                                 "(config image_urls: allow-listed hosts, public addresses only, timeout and "
                                 "byte cap; otherwise 400 IMAGE_URL_NOT_ALLOWED)",
                     # A custom format: "a URL of an image", which no JSON Schema keyword can state.
                     json_schema_extra={"format": "image-url"})
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted and ignored: the model's "
                                                          "configured pixel budget applies")


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class OtherContent(BaseModel):
    """A part type this server does not take (input_audio, file, refusal, ...): refused with 400."""

    model_config = ConfigDict(extra="allow")
    type: str


def _part_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("text", "image_url") else "other"


ContentPart = Annotated[Union[Annotated[TextContent, Tag("text")], Annotated[ImageContent, Tag("image_url")],
                              Annotated[OtherContent, Tag("other")]], Discriminator(_part_tag)]


def _message_schema(schema: dict[str, Any]) -> None:
    # What to_chat_message refuses with a 400: no content in a non-assistant message, an image
    # outside a user message.
    role_is = lambda role: {"properties": {"role": {"const": role}}, "required": ["role"]}  # noqa: E731
    schema["allOf"] = [
        {"if": role_is("assistant"),
         "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}},
        {"if": role_is("user"), "else": {"properties": {"content": {"anyOf": [
            {"not": {"type": "array"}}, {"type": "array", "items": {"properties": {"type": {"const": "text"}}}}]}}}},
    ]


class ChatRequestMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_message_schema)

    role: Annotated[Literal["system", "developer", "user", "assistant", "tool", "function"],
                    documented_as({"type": "string", "enum": ["system", "developer", "user", "assistant"]})] = Field(
        description="'developer' is treated as 'system'; 'tool' and 'function' are not supported (400)")
    content: Annotated[str | list[ContentPart] | None, documented_as(_nullable({"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"anyOf": [model_schema(TextContent), model_schema(ImageContent)]}}]}))] = Field(
        None, description="Required but in assistant messages; image_url parts only in user messages")
    name: str | None = Field(None, description="Accepted and ignored")
    tool_calls: Annotated[list[dict[str, Any]] | None, documented_as(_nullable({"type": "array", "maxItems": 0}))] = \
        Field(None, description="Not supported (400 when not empty)")

    def remote_image_urls(self, index: int) -> list[tuple[str, str]]:
        """(param, url) of the http(s) image URLs of this message (user messages only take images)."""
        if self.role != "user" or not isinstance(self.content, list):
            return []
        return [(f"messages.{index}.content.{j}.image_url.url", part.image_url.url)
                for j, part in enumerate(self.content)
                if isinstance(part, ImageContent) and is_remote_image_url(part.image_url.url)]

    def to_chat_message(self, index: int, *, max_image_bytes: int,
                        fetched: Mapping[str, bytes] | None = None) -> ChatMessage:
        where = f"messages.{index}"
        if self.role in ("tool", "function"):
            raise BadRequest(f"{where}: role '{self.role}' is not supported (this server does not call tools)",
                             param=f"{where}.role", code="UNSUPPORTED_ROLE")
        if self.tool_calls:
            raise unsupported(f"{where}.tool_calls", "tool calls are not supported")
        role = "system" if self.role == "developer" else self.role
        if self.content is None:
            if role != "assistant":
                raise BadRequest(f"{where}.content is required", param=f"{where}.content", code="MISSING_CONTENT")
            return ChatMessage(role, "")
        if isinstance(self.content, str):
            return ChatMessage(role, self.content)
        parts: list[Part] = []
        for j, part in enumerate(self.content):
            param = f"{where}.content.{j}"
            if isinstance(part, TextContent):
                parts.append(part.text)
            elif isinstance(part, ImageContent):
                if role != "user":
                    raise BadRequest(f"images are only accepted in user messages, not in {self.role} messages",
                                     param=param, code="UNSUPPORTED_CONTENT")
                url = part.image_url.url
                data = fetched.get(url) if fetched else None
                if data is None:
                    data = image_bytes(url, max_bytes=max_image_bytes, param=f"{param}.image_url.url")
                parts.append(ImagePart(data))
            else:
                raise BadRequest(f"content part type '{part.type}' is not supported (use 'text' or 'image_url')",
                                 param=f"{param}.type", code="UNSUPPORTED_CONTENT")
        if all(isinstance(p, str) for p in parts):  # text-only: one string, as text-only models expect
            return ChatMessage(role, "\n".join(parts))  # type: ignore[arg-type]
        return ChatMessage(role, tuple(parts))


# ---- requests ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: JsonBool | None = Field(None, description="Send a last chunk with usage and no choices")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Annotated[str, documented_as({"type": "string", "const": "text"})] = Field(
        description="Only 'text' is supported")


class _Sampling(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=256, description="A model id from /v1/models; "
                              "'default' or empty: the first installed model of the text preference list")
    max_tokens: json_int(ge=1, le=32768) | None = Field(None, description="Most tokens to generate")
    temperature: JsonFloat | None = Field(None, ge=0.0, le=2.0, description="0 means greedy; "
                                          "omitted: the model's configured default")
    top_p: JsonFloat | None = Field(None, gt=0.0, le=1.0)
    seed: SignedSeed | None = Field(None, description="Same seed, same sampled text (any integer: taken modulo "
                                                      "2**63)")
    stop: Annotated[str | list[str] | None, documented_as(_nullable({"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP}]}))] = Field(
        None, description=f"Up to {MAX_STOP} sequences; the reply ends before one")
    n: Annotated[json_int(ge=1, le=128) | None, documented_as(_nullable({"type": "integer", "const": 1}))] = Field(
        1, description="Only 1 is supported")
    stream: JsonBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[JsonFloat | None, documented_as(_nullable({"type": "number", "const": 0}))] = Field(
        None, ge=-2.0, le=2.0, description="Only 0 is supported")
    frequency_penalty: Annotated[JsonFloat | None, documented_as(_nullable({"type": "number", "const": 0}))] = Field(
        None, ge=-2.0, le=2.0, description="Only 0 is supported")
    logit_bias: Annotated[dict[str, JsonFloat] | None,
                          documented_as(_nullable({"type": "object", "maxProperties": 0}))] = Field(
        None, description="Not supported (400 when not empty)")
    user: str | None = Field(None, description="Accepted and ignored")
    # vLLM-style extras (the SDK's extra_body)
    top_k: json_int(ge=-1) | None = Field(None, description="0 or -1: off")
    repetition_penalty: JsonFloat | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: JsonBool | None = Field(None, description="Generate exactly max_tokens tokens")

    @property
    def model_name(self) -> str | None:
        name = (self.model or "").strip()
        return None if name.lower() in DEFAULT_MODEL_NAMES else name

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOP:
            raise BadRequest(f"at most {MAX_STOP} stop sequences are allowed", param="stop", code="INVALID_PARAMETER")
        return tuple(s for s in stops if s)

    def _check_supported(self) -> None:
        if (self.n or 1) != 1:
            raise unsupported("n", "only n=1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise unsupported(name, f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_overrides(self) -> dict[str, Any]:
        """GenerationParams fields the request sets (None: the model's configured default)."""
        stops = self._stops()
        return {"max_new_tokens": self._max_tokens(), "temperature": self.temperature, "top_p": self.top_p,
                "top_k": 0 if self.top_k == -1 else self.top_k, "repetition_penalty": self.repetition_penalty,
                "seed": self.seed, "stop": stops or None, "ignore_eos": self.ignore_eos}

    def _finish(self, inp: GenerateInput, resolver: ModelResolver) -> GenerateInput:
        overrides = self.sampling_overrides()
        inp.model = resolver.select(inp.model, images=inp.has_images)
        inp.params = resolver.params_for(inp.model, **overrides)
        return inp


class ChatCompletionRequest(_Sampling):
    messages: list[ChatRequestMessage] = Field(min_length=1)
    max_completion_tokens: json_int(ge=1, le=32768) | None = Field(None, description="Wins over max_tokens")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}")
    logprobs: Annotated[JsonBool | None, documented_as(_nullable({"type": "boolean", "const": False}))] = Field(
        None, description="Only false")
    top_logprobs: Annotated[json_int(ge=0, le=20) | None, documented_as(_nullable({"type": "integer", "const": 0}))] \
        = Field(None, description="Not supported (only 0)")
    tools: Annotated[list[dict[str, Any]] | None, documented_as(_nullable({"type": "array", "maxItems": 0}))] = Field(
        None, description="Not supported (400 when not empty)")
    tool_choice: Annotated[str | dict[str, Any] | None,
                           documented_as(_nullable({"type": "string", "enum": ["none", "auto"]}))] = Field(
        None, description="Only 'none' or 'auto' without tools")
    functions: Annotated[list[dict[str, Any]] | None,
                         documented_as(_nullable({"type": "array", "maxItems": 0}))] = Field(
        None, description="Not supported (400 when not empty)")

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _check_supported(self) -> None:
        super()._check_supported()
        if self.tools or self.functions:
            raise unsupported("tools" if self.tools else "functions", "tools are not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tools are not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported("response_format", f"response_format '{self.response_format.type}' is not supported "
                                                 "(only 'text')")
        if self.logprobs or self.top_logprobs:
            raise unsupported("logprobs", "logprobs are not supported")

    def remote_image_urls(self) -> list[tuple[str, str]]:
        """(param, url) of every http(s) image URL the request holds, for the router to fetch."""
        return [pair for i, m in enumerate(self.messages) for pair in m.remote_image_urls(i)]

    def to_generate_input(self, resolver: ModelResolver, *, max_image_bytes: int,
                          fetched: Mapping[str, bytes] | None = None) -> GenerateInput:
        """Check, decode inline images (``fetched``: bytes of fetched URLs, by URL), choose the model
        and fill in its generation parameters."""
        self._check_supported()
        messages = [m.to_chat_message(i, max_image_bytes=max_image_bytes, fetched=fetched)
                    for i, m in enumerate(self.messages)]
        return self._finish(GenerateInput(messages=messages, model=self.model_name), resolver)


class CompletionRequest(_Sampling):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], documented_as({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}]})] = Field(
        description="A raw prompt (no chat template): a non-empty string, or a list of exactly one "
                    "(token ids: 400)")
    echo: Annotated[JsonBool | None, documented_as(_nullable({"type": "boolean", "const": False}))] = Field(
        None, description="Only false")
    best_of: Annotated[json_int(ge=1, le=128) | None, documented_as(_nullable({"type": "integer", "const": 1}))] = \
        Field(None, description="Only 1")
    suffix: Annotated[str | None, documented_as(_nullable({"type": "string", "maxLength": 0}))] = Field(
        None, description="Not supported")
    logprobs: Annotated[json_int(ge=0, le=5) | None, documented_as(_nullable({"type": "integer", "const": 0}))] = \
        Field(None, description="Not supported (only 0)")

    def _prompt(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                if prompt and not all(isinstance(p, str) for p in prompt):
                    raise unsupported("prompt", "token-id prompts are not supported; send text")
                raise unsupported("prompt", "send one prompt per request (a string or a list of one string)")
            prompt = prompt[0]
        if not prompt:
            raise BadRequest("prompt must not be empty", param="prompt", code="INVALID_PARAMETER")
        return prompt

    def _check_supported(self) -> None:
        super()._check_supported()
        if self.echo:
            raise unsupported("echo", "echo is not supported")
        if (self.best_of or 1) != 1:
            raise unsupported("best_of", "only best_of=1 is supported")
        if self.suffix:
            raise unsupported("suffix", "suffix is not supported")
        if self.logprobs:
            raise unsupported("logprobs", "logprobs are not supported")

    def to_generate_input(self, resolver: ModelResolver) -> GenerateInput:
        """Check, choose the model and fill in its generation parameters."""
        self._check_supported()
        return self._finish(GenerateInput(prompt=self._prompt(), model=self.model_name), resolver)
