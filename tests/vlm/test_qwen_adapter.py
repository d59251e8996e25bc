"""QwenVLAdapter against tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints.

The weights are noise, so these tests check plumbing that does not depend on output
quality: token accounting, finish reasons, sampling controls, cancellation, the pixel
budget, and that unloading really releases the model.
"""
from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from core.errors import ModelLoadFailed, ModelNotInstalled, ModelUnavailable
from core.types import CancelToken, Capability, GenerationParams
from models.adapter import GenerativeAdapter, ModelSpec, adapter_class
from engine.engine import Engine
from llm.types import ChatMessage, ImagePart
from vlm.qwen import OCR_PROMPT, QwenVLAdapter, fit_pixels, ocr_prompt

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["qwen_vl_2b", "qwen2_5_vl_3b", "qwen3_vl_2b"]
MAX_PIXELS = 112 * 112
MIN_PIXELS = 56 * 56
# One image token covers a (patch * merge)^2 pixel square: 14*2 for Qwen2/2.5-VL, 16*2 for Qwen3-VL.
FACTOR = {"qwen_vl_2b": 28, "qwen2_5_vl_3b": 28, "qwen3_vl_2b": 32}


def make_spec(models_dir: Path, model_id: str, **kw) -> ModelSpec:
    return ModelSpec(id=model_id, name=model_id, kind="qwen_vl", path=models_dir / model_id,
                     max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS,
                     generation=GenerationParams(max_new_tokens=8), **kw)


def text_image(size=(640, 400)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(["Invoice 12345", "Total: 678.90", "Thank you"]):
        draw.text((20, 20 + 40 * i), line, fill="black")
    return img


class CancelAfter(CancelToken):
    """Not cancelled for the first `polls` polls, cancelled from then on."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.polls_left = polls

    @property
    def cancelled(self) -> bool:
        self.polls_left -= 1
        return self.polls_left < 0


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tiny_models_dir):
    a = QwenVLAdapter(make_spec(tiny_models_dir, request.param))
    a.load()
    yield a
    a.unload()


def generate(adapter, messages, params):
    """Run one request through a real engine over the adapter's backend; (text, usage)."""
    async def main():
        engine = Engine(adapter.engine_backend(), name=adapter.spec.id)
        engine.start()
        try:
            handle = engine.submit(engine.encode(messages, None), params, CancelToken())
            text = "".join([d.text async for d in handle])
            return text, handle.usage
        finally:
            engine.stop()

    return asyncio.run(main())


def greedy(n: int = 8, **kw) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0, **kw)


# ---- per family ------------------------------------------------------------------

def test_memory_bytes_counts_parameters(adapter):
    model = adapter.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert adapter.memory_bytes() >= params > 100_000


# ---- lifecycle -------------------------------------------------------------------

@pytest.mark.parametrize("model_id", FAMILIES)
def test_unload_frees_the_model(tiny_models_dir, model_id):
    a = QwenVLAdapter(make_spec(tiny_models_dir, model_id))
    assert a.memory_bytes() == 0
    a.load()
    assert a.memory_bytes() > 0
    generate(a, [ChatMessage("user", (ImagePart(text_image()), "hi"))], greedy(2))  # must not pin the model
    ref = weakref.ref(a.model)
    a.unload()
    gc.collect()
    assert a.memory_bytes() == 0
    assert ref() is None
    a.load()  # and it comes back
    assert generate(a, [ChatMessage("user", "hi")], greedy(2))[1].completion_tokens == 2
    a.unload()


def test_check_installed(tiny_models_dir, tmp_path):
    ok = QwenVLAdapter.check_installed(make_spec(tiny_models_dir, "qwen3_vl_2b"))
    assert ok.installed and ok.reason == ""
    missing = ModelSpec(id="qwen3_vl_2b", name="q", kind="qwen_vl", path=Path("weights/qwen3_vl_2b"))
    state = QwenVLAdapter.check_installed(missing)
    assert not state.installed and state.reason == "no weights at weights/qwen3_vl_2b"
    (tmp_path / "empty").mkdir()
    state = QwenVLAdapter.check_installed(ModelSpec(id="e", name="e", kind="qwen_vl", path=tmp_path / "empty"))
    assert not state.installed and "config.json" in state.reason
    assert not QwenVLAdapter.check_installed(ModelSpec(id="n", name="n", kind="qwen_vl")).installed
    with pytest.raises(ModelNotInstalled):
        QwenVLAdapter(missing).load()


def test_broken_checkpoint_raises_clean_error(tmp_path, caplog):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": 3}))
    (bad / "tokenizer.json").write_text("not json")
    spec = ModelSpec(id="broken", name="b", kind="qwen_vl", path=bad)
    with caplog.at_level("ERROR"), pytest.raises(ModelLoadFailed) as info:
        QwenVLAdapter(spec).load()
    assert info.value.code == "MODEL_LOAD_FAILED"
    assert str(tmp_path) not in info.value.message and "broken" in info.value.message
    assert any(r.exc_info for r in caplog.records), "the real exception must be logged"


def test_protocol_and_registry():
    assert adapter_class("qwen_vl") is QwenVLAdapter
    assert QwenVLAdapter.capabilities == {Capability.OCR, Capability.CHAT, Capability.GENERATE}
    a = QwenVLAdapter(ModelSpec(id="x", name="x", kind="qwen_vl"))
    assert isinstance(a, GenerativeAdapter)
    assert a.supports_language("Russian") and a.supports_language(None)
    assert a.memory_bytes() == 0
    with pytest.raises(ModelUnavailable):
        a.engine_backend()


def test_import_and_check_installed_do_not_import_torch():
    code = ("import sys; from pathlib import Path; from models.adapter import ModelSpec; "
            "from vlm.qwen import QwenVLAdapter; "
            "QwenVLAdapter.check_installed(ModelSpec(id='a', name='a', kind='qwen_vl', path=Path('w'))); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- helpers and the builder -----------------------------------------------------

def test_fit_pixels():
    out = fit_pixels(Image.new("L", (4000, 1000)), MIN_PIXELS, MAX_PIXELS)
    assert out.mode == "RGB" and out.width * out.height <= MAX_PIXELS
    assert abs(out.width / out.height - 4.0) < 0.1
    up = fit_pixels(Image.new("RGB", (10, 20)), MIN_PIXELS, MAX_PIXELS)
    assert up.width * up.height >= MIN_PIXELS * 0.95 and abs(up.height / up.width - 2.0) < 0.1
    same = Image.new("RGB", (100, 100))
    assert fit_pixels(same, MIN_PIXELS, MAX_PIXELS).size == (100, 100)


def test_ocr_prompt_names_the_language():
    assert ocr_prompt("ru") == ocr_prompt("rus") == ocr_prompt("russian") == f"{OCR_PROMPT} The text is in Russian."
    assert ocr_prompt("zh-CN").endswith("in Chinese.") and ocr_prompt("Klingon").endswith("in Klingon.")
    assert ocr_prompt(None) == OCR_PROMPT and ocr_prompt(None, "Transcribe.") == "Transcribe."


def test_builder_is_deterministic_and_small(tiny_models_dir, tmp_path):
    from scripts.make_tiny_models import build_tiny_models

    again = build_tiny_models(tmp_path, ["qwen_vl_2b"])
    assert again == {"qwen_vl_2b": tmp_path / "qwen_vl_2b"}
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        digest = [hashlib.sha256((d / "qwen_vl_2b" / name).read_bytes()).hexdigest()
                  for d in (tiny_models_dir, tmp_path)]
        assert digest[0] == digest[1], name
    for model_id in FAMILIES:
        folder = tiny_models_dir / model_id
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert 300_000 < size < 3_000_000
        gen = json.loads((folder / "generation_config.json").read_text())
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        assert gen["eos_token_id"] and gen["pad_token_id"] is not None
        assert tok["eos_token"] == "<|im_end|>" and tok["pad_token"] == "<|endoftext|>"
    with pytest.raises(KeyError):
        build_tiny_models(tmp_path, ["nope"])


def test_builder_cli(tmp_path):
    out = subprocess.run([sys.executable, "scripts/make_tiny_models.py", str(tmp_path), "--ids", "qwen3_vl_2b"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert "qwen3_vl_2b" in out and (tmp_path / "qwen3_vl_2b" / "config.json").is_file()
