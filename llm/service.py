"""Text generation for every LLM surface (seeds 000, 001, 002, OpenAI) and for the VLM
chat and OCR prompts: one path, through the model's engine. Knows nothing of HTTP."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from core.config import LimitsSettings
from core import request_context
from core.omp import released
from core.errors import CapabilityMissing, DeadlineExceeded
from core.types import CancelToken, Capability, GenerationParams
from llm.types import ChatMessage, GenerateInput, GenerateOutput, ImagePart, StreamDelta, Usage
from models.manager import ModelManager
from models.selection import ModelSelector
from ocr.service import ImageDecoder


@dataclass(frozen=True)
class ModelInfo:
    id: str
    name: str
    kind: str
    context_length: int | None  # known once loaded
    loaded: bool
    defaults: GenerationParams


class GenerationService:
    def __init__(self, selector: ModelSelector, manager: ModelManager, decoder: ImageDecoder,
                 limits: LimitsSettings) -> None:
        self.selector = selector
        self.manager = manager
        self.decoder = decoder
        self.limits = limits

    # ---- choosing and describing models ------------------------------------------------
    def select(self, model: str | None, *, images: bool = False) -> str:
        """The model that serves: the one named, or the first installed text (or vision) model."""
        capability = Capability.CHAT if images else Capability.GENERATE
        model_id = self.selector.select(capability, model)
        return model_id

    def params_for(self, model_id: str, **overrides) -> GenerationParams:
        """The model's configured defaults with the request's values (None = not given) on top."""
        from dataclasses import replace

        base = self.selector.entry(model_id).spec.generation
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def info(self, model_id: str) -> ModelInfo:
        entry = self.selector.entry(model_id)
        state = self.manager.state(model_id)
        engine = state.engine if state.status == "loaded" else None
        return ModelInfo(id=model_id, name=entry.spec.name, kind=entry.spec.kind,
                         context_length=engine.context_length if engine else None,
                         loaded=state.status == "loaded", defaults=entry.spec.generation)

    # ---- generating --------------------------------------------------------------------
    async def stream(self, inp: GenerateInput, *, timeout_s: float | None = None
                     ) -> tuple[str, AsyncIterator[StreamDelta]]:
        """Validate, queue, and return (model id, deltas). Errors before the first token
        (unknown model, prompt too long, overloaded) raise here, before any byte is sent.
        Closing the iterator early cancels the request in the engine."""
        model_id = self.select(inp.model, images=inp.has_images)
        request_context.note_model(model_id)
        entry = self.selector.entry(model_id)
        if Capability.GENERATE not in entry.capabilities and Capability.CHAT not in entry.capabilities:
            raise CapabilityMissing(f"Model '{model_id}' cannot generate text", param="model")
        state = await self.manager.ensure_loaded(model_id)
        state.touch()
        self.manager.check_capacity(model_id)
        engine = state.engine
        if engine is None:
            raise CapabilityMissing(f"Model '{model_id}' cannot generate text", param="model")
        messages = await self._decode_images(inp.messages, entry.spec.max_pixels) if inp.messages else None
        return model_id, await self._submit(engine, lambda: engine.encode(messages, inp.prompt), inp.params,
                                            timeout_s)

    async def _submit(self, engine, encode, params: GenerationParams, timeout_s: float | None):
        timeout = timeout_s if timeout_s is not None else self.limits.generation_timeout_s
        cancel = CancelToken(deadline=time.monotonic() + timeout)
        prompt = await asyncio.to_thread(released(encode))  # tokenizing and image processing are CPU work
        handle = engine.submit(prompt, params, cancel)  # raises BadRequest/Overloaded before queueing
        ready = getattr(handle, "ready", None)
        if ready is not None:  # a remote engine: its answer's status (4xx, 502, 503, 504) raises here
            await ready()
        return self._deltas(handle, cancel, timeout)

    async def generate_with(self, model_id: str, encode: Callable[[Any], Any], params: GenerationParams, *,
                            timeout_s: float | None = None) -> tuple[GenerateOutput, Any]:
        """Generate from a prompt the model's adapter builds itself (``encode(adapter)``), e.g. a
        model family's own OCR prompt modes. Returns the output and the adapter that made it."""
        started = time.perf_counter()
        request_context.note_model(model_id)
        state = await self.manager.ensure_loaded(model_id)
        state.touch()
        adapter, engine = state.adapter, state.engine
        if engine is None:
            raise CapabilityMissing(f"Model '{model_id}' cannot generate text", param="model")
        deltas = await self._submit(engine, lambda: encode(adapter), params, timeout_s)
        return await self._collect(model_id, deltas, started), adapter

    async def _deltas(self, handle, cancel: CancelToken, timeout: float) -> AsyncIterator[StreamDelta]:
        try:
            async with contextlib.aclosing(aiter(handle)) as stream:  # closed at once when the consumer leaves
                async for delta in stream:
                    if delta.usage is not None and delta.finish_reason:
                        request_context.note_tokens(delta.usage.prompt_tokens, delta.usage.completion_tokens)
                    yield delta
            if handle.finish_reason == "cancelled" and cancel.cancelled:
                raise DeadlineExceeded(f"generation did not finish within {timeout:g} s")
        finally:
            cancel.cancel()  # no-op when finished; stops the engine work when the consumer left

    async def generate(self, inp: GenerateInput, *, timeout_s: float | None = None) -> GenerateOutput:
        """The whole reply at once."""
        started = time.perf_counter()
        model_id, deltas = await self.stream(inp, timeout_s=timeout_s)
        return await self._collect(model_id, deltas, started)

    @staticmethod
    async def _collect(model_id: str, deltas: AsyncIterator[StreamDelta], started: float) -> GenerateOutput:
        parts: list[str] = []
        first: float | None = None
        finish, usage = "stop", Usage(0, 0)
        async for delta in deltas:
            if first is None and delta.text:
                first = time.perf_counter()
            parts.append(delta.text)
            if delta.finish_reason:
                finish, usage = delta.finish_reason, delta.usage or usage
        end = time.perf_counter()
        return GenerateOutput(text="".join(parts), finish_reason=finish, usage=usage, model=model_id,
                              latency=end - started, ttft=(first or end) - started)

    async def _decode_images(self, messages: list[ChatMessage], max_pixels: int) -> list[ChatMessage]:
        out = []
        for m in messages:
            if isinstance(m.content, str):
                out.append(m)
                continue
            parts = []
            for p in m.content:
                if isinstance(p, ImagePart) and not isinstance(p.data, Image.Image):
                    image = await self.decoder.decode(p.data, target_max_pixels=max_pixels, all_frames=False)
                    p = ImagePart(image.pages[0])
                parts.append(p)
            out.append(ChatMessage(m.role, tuple(parts)))
        return out
