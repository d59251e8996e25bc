"""dots.ocr served natively (vlm/dots_ocr/modeling.py), without the published remote code.

OCR prompt modes, chosen from OcrOptions (and the model's ``options`` in config.yaml):

| request                         | prompt                | text returned                          | blocks |
| ------------------------------- | --------------------- | -------------------------------------- | ------ |
| ``region`` set (any format)     | grounding OCR of box  | the text in the box                    | one, the region |
| format ``json``                 | layout with all text  | cell texts in reading order            | every cell: box, category, text |
| format ``markdown``             | layout with all text  | a Markdown page (tables HTML, formulas $$) | every cell |
| format ``layout``               | layout only           | empty                                  | every cell: box and category |
| format ``text`` (the default)   | ``options.text_mode``: ``ocr`` (text only, the model skips page headers/footers) or ``layout`` (layout with all text, joined) | text | none for ``ocr`` |

``options.prompt_mode`` (``layout_all`` / ``layout_only`` / ``ocr``) forces one mode for every
request without a region. The language hint is not needed: the prompts are fixed and the model
reads every language it was trained on.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from core.errors import BadRequest, ModelLoadFailed, ModelNotInstalled, ModelUnavailable
from core.types import Capability, OcrBlock, OcrResult
from llm.types import ChatMessage, ImagePart
from models.adapter import InstallState, ModelSpec, OcrOptions
from models.hf import TorchModelAdapter, resolve_device_dtype, weights_install_state

from . import processing as P

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_FORMAT_MODES = {"json": "layout_all", "markdown": "layout_all", "layout": "layout_only"}
MODES = ("layout_all", "layout_only", "ocr", "grounding")


class DotsOcrAdapter(TorchModelAdapter):
    capabilities = frozenset({Capability.OCR, Capability.GENERATE})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.tokenizer: Any = None
        self.norm = (P.IMAGE_MEAN, P.IMAGE_STD)

    def _forget(self) -> None:
        self.model = self.tokenizer = None

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        state = weights_install_state(spec, _TOKENIZER_FILES)
        if state.installed and not any(Path(spec.path).glob("*.safetensors")):
            return InstallState(False, f"no safetensors weights in {Path(spec.path).as_posix()}")
        return state

    # ---- lifecycle ---------------------------------------------------------------

    def load(self) -> None:
        if self.model is not None:
            return
        if not self.check_installed(self.spec).installed:
            raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
        from transformers import AutoTokenizer

        from .modeling import DotsOCRForCausalLM, config_from_published

        path = Path(self.spec.path)
        device, dtype, attn = resolve_device_dtype(self.spec)
        try:
            config = config_from_published(json.loads((path / "config.json").read_text()))
        except (OSError, ValueError, TypeError):
            log.exception("reading %s/config.json failed", path)
            raise ModelLoadFailed(f"model '{self.spec.id}': config.json does not describe dots.ocr") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model, info = DotsOCRForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, attn_implementation=attn, local_files_only=True,
                output_loading_info=True)
        except Exception:
            log.exception("loading %s from %s failed", self.spec.id, path)
            raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
        mismatch = _mismatch(info)
        if mismatch:
            log.error("%s: checkpoint does not match dots.ocr: %s", self.spec.id, info)
            raise ModelLoadFailed(f"model '{self.spec.id}': the weights do not match dots.ocr ({mismatch})")
        pad = tokenizer.convert_tokens_to_ids(P.IMG_PAD)
        if pad != config.image_token_id or any(tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
                                               for t in P.SPECIAL_TOKENS):
            raise ModelLoadFailed(f"model '{self.spec.id}': the tokenizer lacks dots.ocr's image and chat tokens")
        self.norm = _normalisation(path)
        model.to(device).eval()
        self.tokenizer, self.model = tokenizer, model
        log.info("loaded %s on %s (%s, %s), %.1f MB", self.spec.id, device, dtype, attn, self.memory_bytes() / 2**20)

    # ---- the engine's view -------------------------------------------------------------

    def engine_backend(self):
        """The loaded model as the engine drives it (1-D positions, images at prefill)."""
        from engine.backend import BatchBackend

        if self.model is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        return BatchBackend(self.model, self.tokenizer, self.encode, threads=self.spec.threads)

    def encode(self, messages, prompt: str | None):
        """Chat messages (text and PIL image parts) or a raw prompt -> token ids and image tensors."""
        import numpy as np
        import torch

        from engine.backend import EncodedPrompt

        if messages is None:
            return EncodedPrompt(self._ids(prompt or ""))
        turns, images = [], []
        for m in messages:
            if isinstance(m.content, str):
                turns.append((m.role, m.content))
                continue
            text = []
            for part in m.content:
                if isinstance(part, str):
                    text.append(part)
                else:
                    images.append(self._image(part.data))
                    text.append(P.image_placeholder(images[-1]))
            turns.append((m.role, "".join(text)))
        ids = self._ids(P.format_chat(turns))
        if not images:
            return EncodedPrompt(ids)
        vision = {"pixel_values": torch.from_numpy(np.concatenate([i.pixel_values for i in images])),
                  "image_grid_thw": torch.tensor([i.grid_thw for i in images], dtype=torch.long)}
        return EncodedPrompt(ids, vision)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _image(self, image: Image.Image) -> P.ImageInput:
        try:
            return P.preprocess(image, (self.spec.min_pixels or P.MIN_PIXELS), self.spec.max_pixels, *self.norm)
        except ValueError:
            raise BadRequest("the image is too narrow or too tall to process", code="IMAGE_ASPECT_RATIO") from None

    # ---- OCR ---------------------------------------------------------------------------

    def ocr_mode(self, options: OcrOptions) -> str:
        """Which prompt mode serves these options (see the module docstring)."""
        if options.region is not None:
            return "grounding"
        forced = self.spec.options.get("prompt_mode")
        if forced in MODES:
            return forced
        if options.format in _FORMAT_MODES:
            return _FORMAT_MODES[options.format]
        return "layout_all" if self.spec.options.get("text_mode") == "layout" else "ocr"

    def encode_ocr(self, page: Image.Image, options: OcrOptions):
        mode = self.ocr_mode(options)
        prompt = P.PROMPTS[mode]
        if mode == "grounding":
            resized = P.smart_resize(*page.size, (self.spec.min_pixels or P.MIN_PIXELS), self.spec.max_pixels)
            prompt = P.grounding_prompt(options.region, page.size, resized)
        return self.encode([ChatMessage("user", (ImagePart(page), prompt))], None)

    def parse_ocr(self, text: str, page_size: tuple[int, int], options: OcrOptions) -> OcrResult:
        from .layout import clean_repetition, parse_layout, to_markdown

        mode = self.ocr_mode(options)
        if mode in ("ocr", "grounding"):
            cleaned, looped = clean_repetition(text)
            if looped:
                log.warning("%s: cut a repetition loop from the output", self.spec.id)
            cleaned = cleaned.strip()
            blocks = [OcrBlock(cleaned, box=tuple(options.region))] if mode == "grounding" and cleaned else []
            return OcrResult(text=cleaned, blocks=blocks, model=self.spec.id)
        resized = P.smart_resize(*page_size, (self.spec.min_pixels or P.MIN_PIXELS), self.spec.max_pixels)
        layout = parse_layout(text, resized, page_size)
        if layout.problems:
            log.warning("%s: layout output repaired: %s", self.spec.id, "; ".join(layout.problems))
        blocks = [OcrBlock(c.text, box=c.bbox, category=c.category) for c in layout.cells]
        if not layout.parsed:  # keep what the model said rather than nothing
            return OcrResult(text="" if mode == "layout_only" else clean_repetition(text)[0].strip(),
                             model=self.spec.id)
        page_text = to_markdown(layout.cells) if options.format == "markdown" else layout.text
        return OcrResult(text=page_text, blocks=blocks, model=self.spec.id)


def _mismatch(info: dict) -> str:
    """A short account of how the checkpoint differs from the architecture ('' when it matches)."""
    parts = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "wrong shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            parts.append(f"{len(names)} {label}, e.g. {', '.join(names[:3])}")
    return "; ".join(parts)


def _normalisation(path: Path) -> tuple:
    """Image mean/std from the checkpoint's preprocessor_config.json when it has them."""
    try:
        cfg = json.loads((path / "preprocessor_config.json").read_text())
        return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return P.IMAGE_MEAN, P.IMAGE_STD
