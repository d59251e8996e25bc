"""GOT-OCR 2.0 through transformers' native GotOcr2 classes (the stepfun-ai/GOT-OCR-2.0-hf layout).

GOT is an OCR model, not a chat model: its processor writes the whole prompt itself from a
few switches (formatted output, a region box or colour, multi-crop), and the model answers
with the page's text, ending its turn with ``<|im_end|>``. This adapter maps OcrOptions onto
those switches and runs the result through the generation engine like any other model.
torch and transformers are imported in ``load`` only.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from core.errors import BadRequest, ModelUnavailable
from core.types import Capability, OcrBlock, OcrResult
from llm.causal import text_of
from models.adapter import OcrOptions
from models.hf import ProcessorModelAdapter


STOP = "<|im_end|>"  # GOT closes its answer with the ChatML end of turn
FORMATS = ("text", "markdown", "json")
DEFAULT_MAX_CROPS = 6  # tiles per page in multi-crop mode (a thumbnail is added on top)

class GotOcrAdapter(ProcessorModelAdapter):
    """Plain, formatted (markdown/LaTeX) and region OCR with GOT-OCR 2.0.

    ``spec.options``: ``multi_crop`` (default true) reads a page larger than the model's
    1024 px input as tiles plus a thumbnail, at most ``max_crops`` tiles (default 6);
    ``multi_crop_min_side`` (default: the input side) is the longer page side from which
    it does so. Region OCR by colour, which GOT also knows, is not offered: OcrOptions has
    no colour field.
    """

    capabilities = frozenset({Capability.OCR, Capability.GENERATE})

    def _attention(self, attn: str):
        # The GOT wrapper and its SAM-style vision tower only have eager attention; the Qwen2
        # decoder takes sdpa (or flash-attn on CUDA).
        return {"": "eager", "vision_config": "eager", "text_config": attn}

    def _check_family(self, processor, model) -> None:
        if model.config.model_type != "got_ocr2" or not hasattr(processor, "image_processor"):
            raise TypeError(f"not a GOT-OCR 2.0 checkpoint: {model.config.model_type}")

    # ---- the engine's view -------------------------------------------------------------

    def engine_backend(self):
        """The loaded model as the engine drives it: images at prefill, 1D positions, and
        GOT's end of turn as a stop token (the published generation config ends on
        <|endoftext|> only; the model card stops on the string <|im_end|>)."""
        from engine.backend import BatchBackend

        if self.model is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        tokenizer = self.processor.tokenizer
        backend = BatchBackend(self.model, tokenizer, self.encode, threads=self.spec.threads)
        stop_id = tokenizer.convert_tokens_to_ids(STOP)
        if isinstance(stop_id, int) and stop_id != tokenizer.unk_token_id:  # None when unknown
            backend.eos_ids = backend.eos_ids | {stop_id}
        return backend

    def encode(self, messages, prompt: str | None):
        """A raw prompt, or chat messages: with one image, GOT's plain OCR prompt over it (GOT
        follows no free-form instruction, so the text parts are not used); without images, the
        turns as ChatML for the Qwen2 decoder."""
        from engine.backend import EncodedPrompt

        tokenizer = self.processor.tokenizer
        if messages is None:
            return EncodedPrompt(list(tokenizer(prompt)["input_ids"]))
        images = [p.data for m in messages if not isinstance(m.content, str)
                  for p in m.content if not isinstance(p, str)]
        if len(images) > 1:
            raise BadRequest(f"model '{self.spec.id}' reads one image per request", param="messages",
                             code="TOO_MANY_IMAGES")
        if images:
            return self.encode_ocr(images[0], OcrOptions())
        text = "".join(f"<|im_start|>{m.role}\n{text_of(m.content)}{STOP}" for m in messages)
        return EncodedPrompt(list(tokenizer(text + "<|im_start|>assistant\n")["input_ids"]))

    # ---- OCR ---------------------------------------------------------------------------

    def encode_ocr(self, page: Image.Image, options: OcrOptions):
        """GOT's own prompt for the page: "OCR" or "OCR with format", over a region box when
        one is given, or over tiles of a large page ("upon the patch reference")."""
        from engine.backend import EncodedPrompt

        if options.format not in FORMATS:
            raise BadRequest(f"unknown OCR format '{options.format}' (known: {', '.join(FORMATS)})",
                             param="format", code="BAD_FORMAT")
        if self.processor is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        image = page.convert("RGB")
        kwargs: dict[str, Any] = {"format": options.format == "markdown"}
        if options.region is not None:
            # In page pixels; the processor turns it into GOT's 0..1000 frame of this image.
            kwargs["box"] = list(_clamped_region(options.region, image.size))
        elif self._multi_crop(image.size):
            kwargs.update(crop_to_patches=True, min_patches=1,
                          max_patches=int(self.spec.options.get("max_crops", DEFAULT_MAX_CROPS)))
        out = self.processor(images=image, return_tensors="pt", **kwargs)
        return EncodedPrompt(out["input_ids"][0].tolist(), {"pixel_values": out["pixel_values"]})

    def parse_ocr(self, text: str, page_size: tuple[int, int], options: OcrOptions) -> OcrResult:
        """The answer without the stop string. For ``json``, one block per non-empty line in
        reading order, without boxes or categories: GOT does not locate what it reads."""
        text = text.split(STOP, 1)[0].strip()
        blocks = []
        if options.format == "json":
            blocks = [OcrBlock(text=line.strip()) for line in text.splitlines() if line.strip()]
        return OcrResult(text=text, blocks=blocks, model=self.spec.id)

    def _multi_crop(self, size: tuple[int, int]) -> bool:
        if not _truthy(self.spec.options.get("multi_crop", True)):
            return False
        tile = self.processor.image_processor.size  # a SizeDict in transformers 5
        side = max(int(tile.height), int(tile.width))
        return max(size) > int(self.spec.options.get("multi_crop_min_side", side))


def _clamped_region(region, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """x1, y1, x2, y2 clipped to the page; a box with no area left is the client's error."""
    w, h = size
    x1, y1, x2, y2 = (int(v) for v in region)
    x1, x2 = max(0, min(x1, w)), max(0, min(x2, w))
    y1, y2 = max(0, min(y1, h)), max(0, min(y2, h))
    if x2 <= x1 or y2 <= y1:
        raise BadRequest("the region must be x1,y1,x2,y2 with x1 < x2 and y1 < y2 inside the page",
                         param="region", code="BAD_REGION")
    return x1, y1, x2, y2


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)
