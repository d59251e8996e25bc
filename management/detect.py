"""What a model's files are: path confinement to the allowed roots, the kind of a Hugging Face
folder, and the checks of a GGUF file. Cheap: reads a few small files, imports no model code."""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import BadRequest

LOCAL_FRAMEWORKS = ("transformers", "gguf", "rapidocr", "tesseract")
REMOTE_FRAMEWORKS = ("vllm", "sglang", "llama.cpp", "openai")  # an OpenAI-protocol server elsewhere (remote/)

# Hugging Face model_type -> registry kind.
_MODEL_TYPES = {"qwen2_vl": "qwen_vl", "qwen2_5_vl": "qwen_vl", "qwen3_vl": "qwen_vl",
                "got_ocr2": "got_ocr", "dots_ocr": "dots_ocr"}
_SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")
GGUF_MAGIC = b"GGUF"


def _bad_path(message: str) -> BadRequest:
    # Never echo the path back: the message says what is wrong, the client knows what it sent.
    return BadRequest(message, param="config.model_path", code="INVALID_MODEL_PATH")


def confine(raw: object, roots: list[Path]) -> Path:
    """The resolved path when it lies inside one of ``roots`` (symlinks followed), else 400.
    A relative path is taken under the first root (models_dir)."""
    if not isinstance(raw, str) or not raw.strip():
        raise _bad_path("config.model_path is required for this framework (a path inside the models folder)")
    if "\x00" in raw or len(raw) > 4096:
        raise _bad_path("config.model_path is not a valid path")
    path = Path(raw)
    if ".." in path.parts:
        raise _bad_path("config.model_path must not contain '..'")
    if not path.is_absolute():
        path = roots[0] / path
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _bad_path("config.model_path does not exist") from None
    for root in roots:
        try:
            if resolved.is_relative_to(root.resolve()):
                return resolved
        except OSError:
            continue
    raise _bad_path("config.model_path must be inside models_dir or a folder of management.model_roots")


def detect_kind(folder: Path) -> str:
    """The registry kind of a Hugging Face folder, from its files (400 when it is none we serve)."""
    if not folder.is_dir():
        raise _bad_path("config.model_path must be a folder for framework 'transformers'")
    if any((folder / f).is_file() for f in _SENTENCE_TRANSFORMERS_FILES):
        return "embedding"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise _bad_path("the folder holds no readable config.json (a Hugging Face model folder)") from None
    if not isinstance(config, dict):
        raise _bad_path("config.json does not hold an object")
    kind = _MODEL_TYPES.get(str(config.get("model_type", "")))
    if kind:
        return kind
    architectures = config.get("architectures") or []
    if any(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures):
        return "causal_lm"
    raise BadRequest("the folder's model type is not one this server serves (causal LM, Qwen-VL, GOT-OCR, "
                     "dots.ocr, sentence-transformers)", param="config.model_path", code="UNSUPPORTED_MODEL")


def check_gguf(path: Path) -> None:
    """A regular file named *.gguf that starts with the GGUF magic bytes."""
    if not path.is_file():
        raise _bad_path("config.model_path must be a .gguf file for framework 'gguf'")
    if path.suffix.lower() != ".gguf":
        raise _bad_path("config.model_path must end in .gguf")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError:
        raise _bad_path("config.model_path cannot be read") from None
    if magic != GGUF_MAGIC:
        raise _bad_path("config.model_path is not a GGUF file (no GGUF magic bytes)")


def check_framework(framework: str) -> None:
    if framework in LOCAL_FRAMEWORKS or framework in REMOTE_FRAMEWORKS:
        return
    works = ", ".join(LOCAL_FRAMEWORKS + REMOTE_FRAMEWORKS)
    raise BadRequest(f"unknown framework '{framework[:40]}'; use one of: {works}", param="framework",
                     code="UNSUPPORTED_FRAMEWORK")
