"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL through transformers' generic image-text-to-text API.

All three families share the ChatML prompt format and the processor's pixel budget,
so one adapter serves them. torch and transformers are imported in ``load`` only:
the registry imports this module just to list models and check installation.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from core.errors import BadRequest, ModelLoadFailed, ModelNotInstalled, ModelUnavailable
from core.types import CancelToken, Capability, GenerationParams, GenerationResult, OcrResult
from models.adapter import InstallState, ModelSpec, OcrOptions

log = logging.getLogger(__name__)

OCR_PROMPT = "Read all the text in this image. Output only the text, preserving line breaks."
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json",
                    "tokenizer.json", "tokenizer_config.json")
_LANGUAGES = {
    "en": "English", "eng": "English", "ru": "Russian", "rus": "Russian",
    "zh": "Chinese", "zho": "Chinese", "chi": "Chinese", "chi_sim": "Chinese",
    "chi_tra": "Chinese", "uk": "Ukrainian", "ukr": "Ukrainian", "de": "German",
    "deu": "German", "fr": "French", "fra": "French", "es": "Spanish", "spa": "Spanish",
    "ja": "Japanese", "jpn": "Japanese", "ko": "Korean", "kor": "Korean",
}


def language_name(hint: str) -> str:
    """"ru" / "rus" / "russian" -> "Russian"; unknown hints are passed through as given."""
    key = hint.strip().lower().replace("-", "_")
    return _LANGUAGES.get(key) or _LANGUAGES.get(key.split("_")[0]) or hint.strip().title()


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


class QwenVLAdapter:
    capabilities = frozenset({Capability.OCR, Capability.CHAT, Capability.GENERATE})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._model: Any = None
        self._processor: Any = None

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        if spec.path is None:
            return InstallState(False, "no weights path configured")
        path = Path(spec.path)
        if not path.is_dir():
            return InstallState(False, f"no weights at {path.as_posix()}")
        if not (path / "config.json").is_file():
            return InstallState(False, f"no config.json in {path.as_posix()}")
        if not any((path / name).is_file() for name in _PROCESSOR_FILES):
            return InstallState(False, f"no processor or tokenizer files in {path.as_posix()}")
        return InstallState(True)

    # ---- lifecycle ---------------------------------------------------------------

    def load(self) -> None:
        if self._model is not None:
            return
        state = self.check_installed(self.spec)
        if not state.installed:
            raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = self.spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = device.startswith("cuda")
        if self.spec.dtype == "auto":
            dtype = torch.bfloat16 if on_cuda else torch.float32
        else:
            dtype = getattr(torch, self.spec.dtype, None)
        attn = self.spec.options.get("attn_implementation") or (
            "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa")
        try:
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {self.spec.dtype!r}")
            if on_cuda and not torch.cuda.is_available():
                raise RuntimeError("CUDA requested but not available")
            processor = AutoProcessor.from_pretrained(self.spec.path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                self.spec.path, local_files_only=True, dtype=dtype, attn_implementation=attn)
            model.to(device).eval()
        except Exception:
            log.exception("loading %s from %s failed", self.spec.id, self.spec.path)
            raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
        self._processor, self._model = processor, model
        log.info("loaded %s on %s (%s, %s), %.1f MB", self.spec.id, device, dtype, attn,
                 self.memory_bytes() / 2**20)

    def unload(self) -> None:
        if self._model is None:
            return
        on_cuda = self._model.device.type == "cuda"
        self._model = self._processor = None
        gc.collect()
        if on_cuda:
            import torch
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        model = self._model
        if model is None:
            return 0
        tensors = [*model.parameters(), *model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def supports_language(self, language: str | None) -> bool:
        return True

    # ---- inference ---------------------------------------------------------------

    def ocr(self, image: Image.Image, options: OcrOptions, cancel: CancelToken) -> OcrResult:
        prompt = self.spec.options.get("ocr_prompt", OCR_PROMPT)
        if options.language:
            prompt = f"{prompt} The text is in {language_name(options.language)}."
        params = GenerationParams(
            max_new_tokens=options.max_new_tokens or self.spec.generation.max_new_tokens,
            temperature=0.0, repetition_penalty=self.spec.generation.repetition_penalty)
        result = self.chat(image, prompt, params, cancel)
        return OcrResult(text=result.text.strip(), blocks=[], model=self.spec.id)

    def chat(self, image: Image.Image | None, prompt: str, params: GenerationParams,
             cancel: CancelToken) -> GenerationResult:
        if self._model is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        if cancel.cancelled:  # don't spend a prefill on a request nobody waits for
            return GenerationResult(text="", finish_reason="cancelled", model=self.spec.id)
        import torch

        inputs = self._encode(image, prompt).to(device=self._model.device, dtype=self._model.dtype)
        prompt_len = inputs["input_ids"].shape[1]
        criteria = _Criteria(cancel, params.stop, self._processor.tokenizer, prompt_len)
        kwargs = self._generation_kwargs(params)
        # A seed applies to this request only; unseeded requests keep drawing from the global RNG.
        rng = contextlib.nullcontext() if params.seed is None else \
            torch.random.fork_rng(devices=self._rng_devices())
        with torch.inference_mode(), rng:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = self._model.generate(**inputs, **kwargs, stopping_criteria=[criteria])
        new = output[0, prompt_len:]
        text = self._processor.tokenizer.decode(new, skip_special_tokens=True)
        eos = self._model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        if criteria.cancelled:
            reason = "cancelled"
        elif criteria.stopped:
            reason = "stop"
            text = _cut_at_stop(text, params.stop)
        elif len(new) and len(new) >= params.max_new_tokens and int(new[-1]) not in eos:
            reason = "length"
        else:
            reason = "stop"
        return GenerationResult(text=text, prompt_tokens=prompt_len, completion_tokens=len(new),
                                finish_reason=reason, model=self.spec.id)

    def _encode(self, image: Image.Image | None, prompt: str):
        content: Any = prompt
        images = None
        kwargs: dict[str, Any] = {}
        if image is not None:
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
            spec = self.spec
            images = [fit_pixels(image, spec.min_pixels, spec.max_pixels)]
            w, h = images[0].size
            if max(w, h) / min(w, h) >= 200:  # Qwen's smart_resize rejects these
                raise BadRequest("the image is too narrow or too tall to process")
            if _takes_pixel_range(self._processor.image_processor):
                kwargs["size"] = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
        text = self._processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        return self._processor(text=[text], images=images, return_tensors="pt", **kwargs)

    def _generation_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens,
                                  "repetition_penalty": params.repetition_penalty}
        if params.greedy:
            # transformers applies the sampling warpers only when sampling, so a checkpoint's
            # temperature/top_k defaults need no overriding here (and overriding them warns).
            kwargs["do_sample"] = False
        else:
            # Always explicit: top_k 0 / top_p 1 disable those filters even if the
            # checkpoint's generation_config sets them.
            kwargs.update(do_sample=True, temperature=params.temperature,
                          top_p=params.top_p, top_k=params.top_k)
        return kwargs

    def _rng_devices(self) -> list[int]:
        device = self._model.device
        return [device.index or 0] if device.type == "cuda" else []


class _Criteria:
    """Stops generation once the caller cancels or a stop string appears in the reply."""

    def __init__(self, cancel: CancelToken, stop: tuple[str, ...], tokenizer, prompt_len: int):
        self.cancel, self.stop, self.tokenizer, self.prompt_len = cancel, stop, tokenizer, prompt_len
        # UTF-8 is at most 4 bytes a character and byte-level tokens carry at least one byte,
        # so this many trailing tokens always cover a stop string that just completed
        self.window = 4 * max((len(s) for s in stop), default=0) + 4
        self.cancelled = self.stopped = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.cancel.cancelled:
            self.cancelled = True
        elif self.stop:
            tail = input_ids[0, max(self.prompt_len, input_ids.shape[1] - self.window):]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            self.stopped = any(s in text for s in self.stop)
        done = self.cancelled or self.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _takes_pixel_range(image_processor) -> bool:
    """Whether the processor sizes images by a pixel range (Qwen's smart_resize).

    transformers 5 keeps ``size`` as a SizeDict, not a dict, and deprecates the
    per-call ``min_pixels``/``max_pixels`` kwargs in favour of this ``size`` form.
    """
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict):
        return "longest_edge" in size
    return getattr(size, "longest_edge", None) is not None


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cuts)] if cuts else text
