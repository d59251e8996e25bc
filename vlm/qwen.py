"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL through transformers' generic image-text-to-text API.

All three families share the ChatML prompt format and the processor's pixel budget,
so one adapter serves them. torch and transformers are imported in ``load`` only:
the registry imports this module just to list models and check installation.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from core.errors import BadRequest, ModelUnavailable
from core.types import Capability, OcrResult
from llm.types import ChatMessage, ImagePart
from models.adapter import OcrOptions
from models.hf import ProcessorModelAdapter
from ocr.languages import normalize_language


DEFAULT_MIN_PIXELS = 56 * 56  # Qwen2-VL's, when neither the configuration nor the processor says
OCR_PROMPT = "Read all the text in this image. Output only the text, preserving line breaks."

def fit_pixels(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB copy scaled (aspect kept) so that min_pixels <= w*h <= max_pixels."""
    image = image.convert("RGB")
    w, h = image.size
    area = w * h
    if area > max_pixels:
        scale = (max_pixels / area) ** 0.5
    elif area < min_pixels:
        scale = (min_pixels / area) ** 0.5
    else:
        return image
    # floor when shrinking so rounding never overshoots the budget
    size = (max(1, int(w * scale)), max(1, int(h * scale))) if scale < 1 else \
        (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


class QwenVLAdapter(ProcessorModelAdapter):
    capabilities = frozenset({Capability.OCR, Capability.CHAT, Capability.GENERATE})

    # ---- the engine's view -------------------------------------------------------------

    def engine_backend(self):
        """The loaded model as the engine drives it (multimodal RoPE, images at prefill)."""
        from engine.backend import BatchBackend

        if self.model is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        backend = BatchBackend(self.model, self.processor.tokenizer, self.encode, mrope=True, threads=self.spec.threads)
        # Image features on the engine's vision worker, off the decode loop (off: inside prefill).
        backend.vision_ahead = bool(self.spec.options.get("vision_worker", True))
        return backend

    def encode(self, messages, prompt: str | None):
        """Chat messages (text and PIL image parts) or a raw prompt -> token ids and image tensors."""
        from engine.backend import EncodedPrompt

        if messages is None:
            return EncodedPrompt(list(self.processor.tokenizer(prompt)["input_ids"]))
        turns, images = [], []
        for m in messages:
            if isinstance(m.content, str):
                turns.append({"role": m.role, "content": m.content})
                continue
            parts = []
            for p in m.content:
                if isinstance(p, str):
                    parts.append({"type": "text", "text": p})
                else:
                    images.append(self._fit(p.data))
                    parts.append({"type": "image"})
            turns.append({"role": m.role, "content": parts})
        text = self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        kwargs: dict[str, Any] = {}
        if images and _takes_pixel_range(self.processor.image_processor):
            kwargs["size"] = {"shortest_edge": self._min_pixels(), "longest_edge": self.spec.max_pixels}
        out = self.processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
        vision = {k: out[k] for k in ("pixel_values", "image_grid_thw") if images and k in out}
        types = out.get("mm_token_type_ids")
        return EncodedPrompt(out["input_ids"][0].tolist(), vision, types[0].tolist() if types is not None else None)

    def encode_ocr(self, page: Image.Image, options: OcrOptions):
        """The OCR instruction (language folded in) over the page (or its region), as a chat turn."""
        if options.region is not None:  # Qwen-VL has no box prompt: it reads the cropped region
            page = page.crop(options.region)
        prompt = ocr_prompt(options.language, self.spec.options.get("ocr_prompt"))
        return self.encode([ChatMessage("user", (ImagePart(page), prompt))], None)

    def parse_ocr(self, text: str, page_size: tuple[int, int], options: OcrOptions) -> OcrResult:
        return OcrResult(text=text.strip(), model=self.spec.id)

    def _min_pixels(self) -> int:
        """The configured minimum, else the one the model's own processor publishes."""
        if self.spec.min_pixels:
            return self.spec.min_pixels
        size = getattr(self.processor.image_processor, "size", None)
        published = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        return int(published or DEFAULT_MIN_PIXELS)

    def _fit(self, image: Image.Image) -> Image.Image:
        image = fit_pixels(image, self._min_pixels(), self.spec.max_pixels)
        w, h = image.size
        if max(w, h) / min(w, h) >= 200:  # Qwen's smart_resize rejects these
            raise BadRequest("the image is too narrow or too tall to process", code="IMAGE_ASPECT_RATIO")
        return image


def ocr_prompt(language: str | None, custom: str | None = None) -> str:
    """The instruction that turns a VLM into an OCR engine, with the language hint folded in."""
    prompt = custom or OCR_PROMPT
    if language:
        lang = normalize_language(language)
        prompt = f"{prompt} The text is in {lang.name if lang else language.strip()}."
    return prompt


def _takes_pixel_range(image_processor) -> bool:
    """Whether the processor sizes images by a pixel range (Qwen's smart_resize).

    transformers 5 keeps ``size`` as a SizeDict, not a dict, and deprecates the
    per-call ``min_pixels``/``max_pixels`` kwargs in favour of this ``size`` form.
    """
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict):
        return "longest_edge" in size
    return getattr(size, "longest_edge", None) is not None
