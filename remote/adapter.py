"""The adapter of a registry model of kind ``remote``: no weights here, an OpenAI-protocol server
elsewhere. It gives the manager a RemoteEngine instead of a local engine backend, and builds the
OCR prompt of a vision model the way our local VLMs do."""
from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from core.types import Capability, OcrResult
from llm.types import ChatMessage, ImagePart
from models.adapter import InstallState, ModelSpec, OcrOptions
from remote import wire

OCR_PROMPT = "Read all the text in this image. Output only the text, preserving line breaks."


class RemoteAdapter:
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.GENERATE})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        if spec.remote is None:
            return InstallState(False, "no remote engine is configured (config: base_url, ...)")
        return InstallState(True)

    def load(self) -> None:
        """Nothing to load: the remote holds the weights (its URLs are probed once the engine starts)."""

    def unload(self) -> None:
        """Nothing held here; the engine closes its connections when the manager stops it."""

    def memory_bytes(self) -> int:
        return 0

    def supports_language(self, language: str | None) -> bool:
        return True

    def make_engine(self, metrics: Any = None):
        """The engine the manager runs for this model: requests go to the remote's URLs."""
        from remote.engine import RemoteEngine

        cfg = self.spec.remote
        return RemoteEngine(cfg, name=self.spec.id, framework=self.spec.framework or "openai",
                            remote_model=cfg.remote_model or self.spec.id, max_queue=self.spec.max_queue,
                            metrics=metrics)

    # ---- OCR prompts of a remote vision model (vision: true) ----------------------------------------
    def encode_ocr(self, page: Image.Image, options: OcrOptions) -> wire.RemotePrompt:
        """The OCR instruction (language folded in) over the page, or its region cropped."""
        from ocr.languages import normalize_language

        if options.region is not None:
            page = page.crop(options.region)
        prompt = self.spec.options.get("ocr_prompt") or OCR_PROMPT
        if options.language:
            lang = normalize_language(options.language)
            prompt = f"{prompt} The text is in {lang.name if lang else options.language.strip()}."
        return wire.encode([ChatMessage("user", (ImagePart(page), prompt))], None)

    def parse_ocr(self, text: str, page_size: tuple[int, int], options: OcrOptions) -> OcrResult:
        return OcrResult(text=text.strip(), model=self.spec.id)


def remote_capabilities(spec: ModelSpec) -> frozenset[Capability]:
    """Text generation always; chat about images and OCR prompts when the remote reads images."""
    if spec.remote is not None and spec.remote.vision:
        return frozenset({Capability.GENERATE, Capability.CHAT, Capability.OCR})
    return frozenset({Capability.GENERATE})
