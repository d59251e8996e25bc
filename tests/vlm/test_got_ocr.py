"""GotOcrAdapter against a tiny random-weight GOT-OCR2 checkpoint, through the real engine.

The weights are noise, so the tests check what does not depend on output quality: the prompt
GOT's processor writes for each mode, image tensors and image-token counts (multi-crop too),
that pages batched together read the same as alone, parsing, and the lifecycle.
"""
from __future__ import annotations

import asyncio
import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from core.errors import BadRequest, ModelLoadFailed, ModelNotInstalled, ModelUnavailable
from core.types import CancelToken, Capability, GenerationParams, OcrResult
from engine.engine import Engine
from llm.types import ChatMessage, ImagePart
from models.adapter import ADAPTER_KINDS, PENDING_KINDS, GenerativeOcrAdapter, ModelSpec, OcrOptions, adapter_class
from models.registry import KIND_CAPABILITIES
from vlm.got_ocr import STOP, GotOcrAdapter

IMAGE_TOKENS = 256  # per 1024 px tile: 64x64 patches, two stride-2 convolutions
SYSTEM = "<|im_start|>system\nYou should follow the instructions carefully and explain your answers in detail."


def make_spec(models_dir: Path, **options) -> ModelSpec:
    return ModelSpec(id="got_ocr", name="GOT", kind="got_ocr", path=models_dir / "got_ocr",
                     generation=GenerationParams(max_new_tokens=8), options={"max_crops": 2, **options})


def page(size=(800, 600), seed: int = 0) -> Image.Image:
    img = Image.new("RGB", size, (255, 255 - 30 * seed, 255))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate([f"Invoice {seed}", "Total: 678.90", "Thank you"]):
        draw.text((20 + 10 * seed, 20 + 40 * i), line, fill="black")
    return img


@pytest.fixture(scope="module")
def got(tiny_models_dir):
    a = GotOcrAdapter(make_spec(tiny_models_dir))
    a.load()
    yield a
    a.unload()


def greedy(n: int = 6) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0)


def run_together(adapter, prompts, params):
    """Submit every encoded prompt before the engine starts, so they share one prefill and batch."""
    async def main():
        engine = Engine(adapter.engine_backend(), name="got")
        try:
            handles = [engine.submit(p, params, CancelToken()) for p in prompts]
            engine.start()

            async def text(h):
                return "".join([d.text async for d in h])

            return await asyncio.gather(*(text(h) for h in handles)), handles
        finally:
            await asyncio.to_thread(engine.stop, 10.0)

    return asyncio.run(main())


def prompt_text(adapter, encoded) -> str:
    """The decoded prompt with the run of image tokens folded to <imgpad>*N."""
    text = adapter.processor.tokenizer.decode(encoded.input_ids)
    n = text.count("<imgpad>")
    return text.replace("<imgpad>" * n, f"<imgpad>*{n}")


def gotq(query: str, tiles: int = 1) -> str:
    return (f"{SYSTEM}<|im_end|><|im_start|>user\n<img><imgpad>*{IMAGE_TOKENS * tiles}</img>\n{query}"
            "<|im_end|><|im_start|>assistant\n")


# ---- prompts: one per mode, as GOT defines them ---------------------------------------

def test_prompt_of_each_mode(got):
    img = page()
    prompts = {fmt: got.encode_ocr(img, OcrOptions(format=fmt)) for fmt in ("text", "markdown", "json")}
    prompts["region"] = got.encode_ocr(img, OcrOptions(region=(100, 150, 400, 450)))
    prompts["region_md"] = got.encode_ocr(img, OcrOptions(format="markdown", region=(0, 0, 800, 300)))

    assert prompt_text(got, prompts["text"]) == gotq(" OCR: ")
    assert prompt_text(got, prompts["markdown"]) == gotq(" OCR with format: ")
    assert prompts["json"].input_ids == prompts["text"].input_ids  # GOT has no layout mode: plain OCR
    # the box in GOT's frame: 0..1000 of the page's width and height
    assert prompt_text(got, prompts["region"]) == gotq("[125, 250, 500, 750] OCR: ")
    assert prompt_text(got, prompts["region_md"]) == gotq("[0, 0, 1000, 500] OCR with format: ")
    distinct = {tuple(p.input_ids) for k, p in prompts.items() if k != "json"}
    assert len(distinct) == 4
    image_id = got.model.config.image_token_id
    for p in prompts.values():
        assert p.input_ids.count(image_id) == IMAGE_TOKENS
        assert tuple(p.vision["pixel_values"].shape) == (1, 3, 1024, 1024)


def test_large_page_is_read_as_tiles_plus_a_thumbnail(got, tiny_models_dir):
    wide = page((2400, 1100))
    crop = got.encode_ocr(wide, OcrOptions())
    assert tuple(crop.vision["pixel_values"].shape) == (3, 3, 1024, 1024)  # 2 tiles (max_crops) + thumbnail
    assert prompt_text(got, crop) == gotq(" OCR upon the patch reference: ", tiles=3)
    md = got.encode_ocr(wide, OcrOptions(format="markdown"))
    assert prompt_text(got, md) == gotq(" OCR with format upon the patch reference: ", tiles=3)
    # a region is read over the whole page, never tiled; pages within the input are not tiled
    assert got.encode_ocr(wide, OcrOptions(region=(0, 0, 1200, 1100))).vision["pixel_values"].shape[0] == 1
    assert got.encode_ocr(page((1024, 700)), OcrOptions()).vision["pixel_values"].shape[0] == 1
    off = GotOcrAdapter(make_spec(tiny_models_dir, multi_crop="false"))
    off.processor = got.processor  # prompt building needs only the processor
    assert prompt_text(off, off.encode_ocr(wide, OcrOptions())) == gotq(" OCR: ")


def test_bad_region_and_format_are_client_errors(got):
    for region in [(400, 10, 100, 50), (10, 10, 10, 50), (900, 700, 1000, 800)]:  # inverted, empty, off-page
        with pytest.raises(BadRequest) as info:
            got.encode_ocr(page(), OcrOptions(region=region))
        assert info.value.code == "BAD_REGION" and info.value.param == "region"
    # a box reaching past the page is clipped to it
    clipped = got.encode_ocr(page(), OcrOptions(region=(400, 300, 5000, 5000)))
    assert "[500, 500, 1000, 1000] OCR" in prompt_text(got, clipped)
    with pytest.raises(BadRequest) as info:
        got.encode_ocr(page(), OcrOptions(format="__import__('os')"))
    assert info.value.code == "BAD_FORMAT"


def test_chat_messages_and_raw_prompts(got):
    img = page()
    from_chat = got.encode([ChatMessage("user", (ImagePart(img), "ignored: GOT takes no instructions"))], None)
    assert from_chat.input_ids == got.encode_ocr(img, OcrOptions()).input_ids
    with pytest.raises(BadRequest) as info:
        got.encode([ChatMessage("user", (ImagePart(img), ImagePart(img)))], None)
    assert info.value.code == "TOO_MANY_IMAGES"
    text = got.encode([ChatMessage("user", "Hello")], None)
    assert got.processor.tokenizer.decode(text.input_ids) == "<|im_start|>user\nHello<|im_end|><|im_start|>assistant\n"
    assert not text.vision
    assert got.encode(None, "Hello").input_ids == got.processor.tokenizer("Hello")["input_ids"]


# ---- through the engine --------------------------------------------------------------------

def test_every_mode_reads_through_the_engine(got):
    img = page()
    modes = [OcrOptions(format="text"), OcrOptions(format="markdown"), OcrOptions(format="json"),
             OcrOptions(region=(100, 150, 400, 450))]
    texts, handles = run_together(got, [got.encode_ocr(img, o) for o in modes], greedy(6))
    for text, handle, options in zip(texts, handles, modes):
        assert handle.usage.completion_tokens == 6
        result = got.parse_ocr(text, img.size, options)
        assert isinstance(result, OcrResult) and result.model == "got_ocr"
        assert result.text == text.strip() and result.text
        if options.format == "json":
            assert result.blocks and all(b.box is None and b.category is None for b in result.blocks)
        else:
            assert result.blocks == []


def test_three_pages_in_one_batch_read_as_alone(got):
    """Several images per request (multi-crop) and several requests concatenate in row order."""
    prompts = [got.encode_ocr(page((2400, 1100), 1), OcrOptions()),  # 3 images
               got.encode_ocr(page((640, 480), 2), OcrOptions(format="markdown")),
               got.encode_ocr(page((800, 600), 3), OcrOptions(region=(0, 0, 400, 300)))]
    solo = [run_together(got, [p], greedy(6))[0][0] for p in prompts]
    together, handles = run_together(got, prompts, greedy(6))
    assert together == solo
    assert [h.usage.prompt_tokens for h in handles] == [len(p.input_ids) for p in prompts]
    # the images really steer the reply: rows fed each other's pictures would not match
    twin = got.encode_ocr(page((800, 600), 5), OcrOptions(region=(0, 0, 400, 300)))
    assert twin.input_ids == prompts[2].input_ids
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine runs a toy model; splitting costs more than it saves
    try:
        logits = got.engine_backend().prefill(prompts)
        solo_logits = torch.cat([got.engine_backend().prefill([p]) for p in prompts])
        twin_logits = got.engine_backend().prefill([twin])
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(logits, solo_logits, atol=1e-4)
    assert (twin_logits - logits[2:]).abs().max() > 1e-2


def test_stop_string_ends_the_reply(got):
    backend = got.engine_backend()
    assert got.processor.tokenizer.convert_tokens_to_ids(STOP) in backend.eos_ids


def test_parse_ocr_strips_the_stop_string():
    a = GotOcrAdapter(ModelSpec(id="got_ocr", name="g", kind="got_ocr"))
    out = a.parse_ocr("  # Title\n\n| a | b |\n$x^2$ \n<|im_end|>junk", (10, 10), OcrOptions(format="markdown"))
    assert out.text == "# Title\n\n| a | b |\n$x^2$" and out.blocks == []
    blocks = a.parse_ocr("line one\n\n  line two  <|im_end|>", (10, 10), OcrOptions(format="json")).blocks
    assert [b.text for b in blocks] == ["line one", "line two"]
    assert all(b.box is None and b.category is None and b.confidence is None for b in blocks)
    assert a.parse_ocr("", (10, 10), OcrOptions(format="json")).blocks == []


# ---- lifecycle and registry -------------------------------------------------------------------

def test_unload_frees_the_model(tiny_models_dir):
    a = GotOcrAdapter(make_spec(tiny_models_dir))
    assert a.memory_bytes() == 0
    a.load()
    assert a.memory_bytes() > 100_000
    run_together(a, [a.encode_ocr(page(), OcrOptions())], greedy(2))  # must not pin the model
    ref = weakref.ref(a.model)
    a.unload()
    gc.collect()
    assert a.memory_bytes() == 0 and ref() is None and a.processor is None
    with pytest.raises(ModelUnavailable):
        a.engine_backend()
    a.load()  # and it comes back
    assert run_together(a, [a.encode_ocr(page(), OcrOptions())], greedy(2))[1][0].usage.completion_tokens == 2
    a.unload()


def test_check_installed(tiny_models_dir, tmp_path):
    ok = GotOcrAdapter.check_installed(make_spec(tiny_models_dir))
    assert ok.installed and ok.reason == ""
    missing = ModelSpec(id="got_ocr", name="g", kind="got_ocr", path=Path("weights/got_ocr"))
    state = GotOcrAdapter.check_installed(missing)
    assert not state.installed and state.reason == "no weights at weights/got_ocr"
    (tmp_path / "empty").mkdir()
    state = GotOcrAdapter.check_installed(ModelSpec(id="e", name="e", kind="got_ocr", path=tmp_path / "empty"))
    assert not state.installed and "config.json" in state.reason
    (tmp_path / "empty" / "config.json").write_text("{}")
    state = GotOcrAdapter.check_installed(ModelSpec(id="e", name="e", kind="got_ocr", path=tmp_path / "empty"))
    assert not state.installed and "tokenizer or processor" in state.reason
    assert GotOcrAdapter.check_installed(ModelSpec(id="n", name="n", kind="got_ocr")).reason == \
        "no weights path configured"
    with pytest.raises(ModelNotInstalled):
        GotOcrAdapter(missing).load()


def test_wrong_or_broken_checkpoint_raises_clean_error(tiny_models_dir, tmp_path, caplog):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "got_ocr2", "vision_config": 3}))
    (bad / "tokenizer.json").write_text("not json")
    for path in (bad, tiny_models_dir / "qwen_vl_2b"):  # broken; a real checkpoint of another family
        caplog.clear()
        with caplog.at_level("ERROR"), pytest.raises(ModelLoadFailed) as info:
            GotOcrAdapter(ModelSpec(id="got_ocr", name="g", kind="got_ocr", path=path)).load()
        assert info.value.code == "MODEL_LOAD_FAILED" and str(path) not in info.value.message
        assert any(r.exc_info for r in caplog.records), "the real exception must be logged"


def test_protocol_and_registry():
    assert adapter_class("got_ocr") is GotOcrAdapter and "got_ocr" in ADAPTER_KINDS
    assert "got_ocr" not in PENDING_KINDS
    assert GotOcrAdapter.capabilities == KIND_CAPABILITIES["got_ocr"] == {Capability.OCR, Capability.GENERATE}
    a = GotOcrAdapter(ModelSpec(id="x", name="x", kind="got_ocr"))
    assert isinstance(a, GenerativeOcrAdapter)
    assert a.supports_language("Chinese")
