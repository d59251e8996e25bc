"""Chat about an image, in domain types. Knows nothing of HTTP."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from core.config import LimitsSettings
from core.deadline import deadline
from core.errors import DeadlineExceeded
from core.types import Capability, GenerationParams, GenerationResult
from models.manager import ModelManager
from models.selection import ModelSelector
from ocr.service import ImageDecoder

DEFAULT_PROMPT = "Describe this image"


@dataclass
class ChatOutcome:
    response: str
    model: str
    prompt: str
    processing_time: float
    image_size: tuple[int, int] | None
    result: GenerationResult


class ChatService:
    def __init__(self, selector: ModelSelector, manager: ModelManager, decoder: ImageDecoder,
                 limits: LimitsSettings) -> None:
        self.selector = selector
        self.manager = manager
        self.decoder = decoder
        self.limits = limits

    def params_for(self, model_id: str, *, temperature: float | None, max_tokens: int | None,
                   top_p: float | None = None) -> GenerationParams:
        """The model's generation defaults, overridden by what the request gives."""
        base = self.selector.entry(model_id).spec.generation
        overrides = {k: v for k, v in (("temperature", temperature), ("max_new_tokens", max_tokens),
                                       ("top_p", top_p)) if v is not None}
        return replace(base, **overrides)

    async def chat(self, data: bytes | None, *, prompt: str | None, model: str | None,
                   temperature: float | None, max_tokens: int | None) -> ChatOutcome:
        """Answer ``prompt`` about the image with a vision-language model, within the deadline."""
        model_id = self.selector.select(Capability.CHAT, model)
        params = self.params_for(model_id, temperature=temperature, max_tokens=max_tokens)
        prompt = prompt if prompt and prompt.strip() else DEFAULT_PROMPT
        started = time.perf_counter()
        async with deadline(self.limits.request_timeout_s) as cancel:
            image = None
            if data is not None:
                spec = self.selector.entry(model_id).spec
                image = await self.decoder.decode(data, target_max_pixels=spec.max_pixels, all_frames=False)
            result: GenerationResult = await self.manager.run(
                model_id, "chat", image.pages[0] if image else None, prompt, params, cancel=cancel)
        if result.finish_reason == "cancelled" and cancel.cancelled:
            raise DeadlineExceeded(f"the request did not finish within {self.limits.request_timeout_s:g} s")
        return ChatOutcome(response=result.text, model=model_id, prompt=prompt,
                           processing_time=time.perf_counter() - started,
                           image_size=image.original_size if image else None, result=result)
