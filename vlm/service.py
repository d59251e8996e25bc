"""Chat about an image (seed 003 /chat), in domain types. Knows nothing of HTTP.

The vision-language models generate through the one generation path (llm.service)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from core.config import LimitsSettings
from core.imaging import displayed_size
from core.types import Capability, GenerationParams
from llm.service import GenerationService
from llm.types import ChatMessage, GenerateInput, GenerateOutput, ImagePart
from models.selection import ModelSelector
from ocr.pages import ImageDecoder

DEFAULT_PROMPT = "Describe this image"


@dataclass
class ChatOutcome:
    response: str
    model: str
    prompt: str
    processing_time: float
    image_size: tuple[int, int] | None
    result: GenerateOutput


class ChatService:
    def __init__(self, selector: ModelSelector, llm: GenerationService, decoder: ImageDecoder,
                 limits: LimitsSettings) -> None:
        self.selector = selector
        self.llm = llm
        self.decoder = decoder
        self.limits = limits

    async def chat(self, data: bytes | None, *, prompt: str | None, model: str | None,
                   temperature: float | None, max_tokens: int | None) -> ChatOutcome:
        """Answer ``prompt`` about the image with a vision-language model, within the request deadline."""
        model_id = self.selector.select(Capability.CHAT, model)
        params: GenerationParams = self.llm.params_for(model_id, temperature=temperature, max_new_tokens=max_tokens)
        prompt = prompt if prompt and prompt.strip() else DEFAULT_PROMPT
        started = time.perf_counter()
        parts: tuple = (prompt,)
        size = None
        if data is not None:
            size = displayed_size(data)
            if size is None or size[0] * size[1] > self.limits.max_image_pixels:
                # Not a readable image header: decode now for the precise 4xx, before any model loads.
                size = (await self.decoder.decode(data, target_max_pixels=64 * 64, all_frames=False)).original_size
            # The generation service decodes the image (first frame, the model's pixel budget)
            # after its capacity check: a full model refuses before any decoding.
            parts = (ImagePart(data), prompt)
        result = await self.llm.generate(GenerateInput(messages=[ChatMessage("user", parts)], model=model_id,
                                                       params=params), timeout_s=self.limits.request_timeout_s)
        return ChatOutcome(response=result.text, model=model_id, prompt=prompt,
                           processing_time=time.perf_counter() - started, image_size=size, result=result)
