"""Native dots.ocr: the architecture against the published tensor layout, the input pipeline,
the layout parser on realistic (and broken) outputs, and a tiny random checkpoint loaded
through DotsOcrAdapter and run through the real engine."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.errors import ModelLoadFailed
from core.types import CancelToken, Capability, GenerationParams
from engine.engine import Engine
from models.adapter import ModelSpec, OcrOptions, adapter_class
from models.registry import KIND_CAPABILITIES
from vlm.dots_ocr import processing as P
from vlm.dots_ocr.adapter import DotsOcrAdapter
from vlm.dots_ocr.layout import MAX_RUN, clean_repetition, parse_layout, to_markdown
from vlm.dots_ocr.modeling import DotsOCRForCausalLM, DotsVisionTransformer, config_from_published

FIXTURES = Path(__file__).parent / "fixtures"


def published_config() -> dict:
    return json.loads((FIXTURES / "dots_ocr_config.json").read_text())


# ---- architecture ------------------------------------------------------------------

def test_published_config_builds_the_published_tensors():
    config = config_from_published(published_config())
    with torch.device("meta"):
        model = DotsOCRForCausalLM(config)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = json.loads((FIXTURES / "dots_ocr_tensors.json").read_text())
    assert set(got) == set(expected)
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_config_reads_published_keys_only():
    config = config_from_published(published_config())
    assert config.model_type == "dots_ocr" and config.image_token_id == 151665
    assert config.rope_parameters["rope_theta"] == 1000000
    assert config.vision_config.embed_dim == 1536 and config.vision_config.num_hidden_layers == 42
    assert not hasattr(config.vision_config, "attn_implementation") or \
        config.vision_config.attn_implementation != "flash_attention_2"
    with pytest.raises(ValueError):
        config_from_published({**published_config(), "model_type": "qwen2"})


def test_vision_rotary_matches_qwen2_vl():
    """The 2-D rotary (row and column frequencies, merge-window order) equals Qwen2-VL's vision rotary."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.modeling_qwen2_vl import get_vision_position_ids

    from vlm.dots_ocr.modeling import DotsVisionConfig

    cfg = DotsVisionConfig(embed_dim=64, num_attention_heads=4)  # head_dim 16
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    ours = DotsVisionTransformer.rotary(type("T", (), {"cfg": cfg})(), grid, torch.device("cpu"))[0]
    qcfg = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=64, num_heads=4, hidden_size=64, mlp_ratio=1,
                                            spatial_merge_size=2),
                         text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=32, intermediate_size=64,
                                          bos_token_id=None, eos_token_id=None, pad_token_id=None))
    visual = Qwen2VLForConditionalGeneration(qcfg).model.visual
    theirs = visual.rotary_pos_emb(torch.zeros(1), get_vision_position_ids(grid, 2))[0]
    assert torch.allclose(ours, theirs, atol=1e-6)


# ---- input -------------------------------------------------------------------------

def test_smart_resize_and_patches():
    assert P.smart_resize(1000, 700) == (1008, 700)
    w, h = P.smart_resize(5000, 7000, max_pixels=1_000_000)
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 1_000_000
    w, h = P.smart_resize(20, 20)
    assert w * h >= P.MIN_PIXELS
    img = P.preprocess(Image.new("RGB", (90, 60), "white"), max_pixels=112 * 112)
    assert img.size == (84, 56) and img.grid_thw == (1, 4, 6) and img.tokens == 6
    assert img.pixel_values.shape == (24, 3 * 14 * 14)


def test_patch_order_matches_qwen2_vl_processor():
    from transformers import Qwen2VLImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
    ours = P.preprocess(image)
    proc = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=1,
                                 size={"shortest_edge": P.MIN_PIXELS, "longest_edge": P.MAX_PIXELS})
    theirs = proc(images=[image], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == [list(ours.grid_thw)]
    assert np.allclose(theirs["pixel_values"].numpy(), ours.pixel_values, atol=1e-4)


def test_chat_framing_and_grounding_box():
    assert P.format_chat([("user", "hi")]) == "<|user|>hi<|endofuser|><|assistant|>"
    assert P.format_chat([("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")]) == \
        "<|system|>s<|endofsystem|>\n<|user|>a<|endofuser|><|assistant|>b<|endofassistant|>" \
        "<|user|>c<|endofuser|><|assistant|>"
    assert P.grounding_prompt((100, 50, 300, 150), (1000, 500), (500, 250)).endswith("Bounding Box:\n[50, 25, 150, 75]")


# ---- layout parser -------------------------------------------------------------------

CELLS = [
    {"bbox": [28, 20, 540, 60], "category": "Title", "text": "# Quarterly Report"},
    {"bbox": [28, 80, 540, 200], "category": "Text", "text": "Revenue grew by **12%** to $678.90 million."},
    {"bbox": [28, 220, 300, 400], "category": "Picture"},
    {"bbox": [28, 420, 540, 470], "category": "Formula", "text": "\\frac{a}{b} = c"},
    {"bbox": [28, 480, 540, 600], "category": "Table", "text": "<table><tr><td>Q1</td><td>10</td></tr></table>"},
]
RESIZED, ORIGINAL = (560, 616), (1120, 1232)  # boxes double


def test_valid_layout_rescaled_in_reading_order():
    r = parse_layout(json.dumps(CELLS), RESIZED, ORIGINAL)
    assert r.parsed and r.problems == []
    assert [c.category for c in r.cells] == ["Title", "Text", "Picture", "Formula", "Table"]
    assert r.cells[0].bbox == (56, 40, 1080, 120)
    assert r.cells[2].text == "" and r.cells[3].text == "\\frac{a}{b} = c"
    assert r.text.startswith("# Quarterly Report\n\nRevenue grew")
    assert "$$\n\\frac{a}{b} = c\n$$" in to_markdown(r.cells)


def test_truncated_mid_string_keeps_the_partial_text():
    out = json.dumps(CELLS)
    r = parse_layout(out[:out.index("678") + 2], RESIZED, ORIGINAL)
    assert [c.category for c in r.cells] == ["Title", "Text"]
    assert r.cells[1].text.endswith("$67") and "truncated JSON closed" in r.problems


def test_truncated_mid_array_drops_the_partial_element():
    out = json.dumps(CELLS)
    r = parse_layout(out[:out.index("[28, 420") + 6], RESIZED, ORIGINAL)
    assert [c.category for c in r.cells] == ["Title", "Text", "Picture"]
    assert any("trailing partial element" in p for p in r.problems)
    r = parse_layout(out[:out.index('"Formula"') + 4], RESIZED, ORIGINAL)  # category cut short
    assert [c.category for c in r.cells] == ["Title", "Text", "Picture"]


@pytest.mark.parametrize("garbage", ["", "I cannot read this page.", "[{]]]", "{\"bbox\": 3}", "[1, 2, 3]"])
def test_garbage_never_raises(garbage):
    r = parse_layout(garbage, RESIZED, ORIGINAL)
    assert r.cells == [] and (r.problems or r.parsed)


def test_repeated_dots_are_cut():
    looping = '```json\n[{"bbox": [0, 0, 56, 28], "category": "Text", "text": "Contents ' + ". " * 4000
    r = parse_layout(looping, (56, 28), (56, 28))
    assert len(r.cells) == 1 and len(r.cells[0].text) < 120
    toc = "Chapter 1 " + "." * 30 + " 5"
    assert clean_repetition(toc) == (toc, False)  # a normal leader row stays
    text, changed = clean_repetition("Name: " + "_" * 5000)
    assert changed and len(text) <= 6 + MAX_RUN


def test_single_backslash_latex_survives():
    out = '[{"bbox": [0, 0, 28, 28], "category": "Formula", "text": "\\frac{1}{2} + \\alpha"}]'
    r = parse_layout(out, (28, 28), (28, 28))
    assert r.cells[0].text == "\\frac{1}{2} + \\alpha"


# ---- the tiny checkpoint through the adapter and the engine --------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from scripts.make_tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("dots"), ["dots_ocr"])["dots_ocr"]


def make_spec(path: Path, **options) -> ModelSpec:
    return ModelSpec(id="dots_ocr", name="dots.ocr", kind="dots_ocr", path=path, max_pixels=112 * 112,
                     min_pixels=3136, generation=GenerationParams(max_new_tokens=8), options=options)


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    a = DotsOcrAdapter(make_spec(tiny_dir))
    a.load()
    yield a
    a.unload()


def page() -> Image.Image:
    img = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(img).text((20, 20), "Invoice 12345", fill="black")
    return img


def run(adapter, prompt, n=6):
    async def main():
        engine = Engine(adapter.engine_backend(), name="dots_ocr")
        engine.start()
        try:
            handle = engine.submit(prompt, GenerationParams(max_new_tokens=n), CancelToken())
            return "".join([d.text async for d in handle]), handle.usage
        finally:
            engine.stop()
    return asyncio.run(main())


def test_registry_knows_the_kind():
    assert adapter_class("dots_ocr") is DotsOcrAdapter
    assert KIND_CAPABILITIES["dots_ocr"] == {Capability.OCR, Capability.GENERATE}


def test_loads_fp32_on_cpu_without_remote_code(adapter):
    assert adapter.model.dtype == torch.float32 and adapter.model.device.type == "cpu"
    assert adapter.memory_bytes() > 100_000


@pytest.mark.parametrize("fmt,mode", [("text", "ocr"), ("json", "layout_all"), ("layout", "layout_only")])
def test_ocr_modes_through_the_engine(adapter, fmt, mode):
    options = OcrOptions(format=fmt)
    assert adapter.ocr_mode(options) == mode
    prompt = adapter.encode_ocr(page(), options)
    tok = adapter.tokenizer
    n_pad = prompt.input_ids.count(tok.convert_tokens_to_ids("<|imgpad|>"))
    grid = prompt.vision["image_grid_thw"][0].tolist()
    assert n_pad == grid[1] * grid[2] // 4 and prompt.vision["pixel_values"].shape[0] == grid[1] * grid[2]
    assert tok.decode(prompt.input_ids).endswith(P.PROMPTS[mode] + "<|endofuser|><|assistant|>")
    text, usage = run(adapter, prompt)
    assert usage.completion_tokens == 6 and usage.prompt_tokens == len(prompt.input_ids)
    result = adapter.parse_ocr(text, page().size, options)  # noise in, no exception out
    assert result.model == "dots_ocr"


def test_grounding_region(adapter):
    options = OcrOptions(region=(20, 20, 150, 60))
    prompt = adapter.encode_ocr(page(), options)
    assert "Bounding Box:\n[" in adapter.tokenizer.decode(prompt.input_ids)
    result = adapter.parse_ocr("Invoice 12345", page().size, options)
    assert result.text == "Invoice 12345" and result.blocks[0].box == (20, 20, 150, 60)


def test_layout_answer_becomes_blocks_in_page_pixels(adapter):
    size = (600, 400)
    resized = P.smart_resize(*size, 3136, 112 * 112)
    answer = json.dumps([{"bbox": [0, 0, resized[0], resized[1] // 2], "category": "Text", "text": "Hello"}])
    result = adapter.parse_ocr(answer, size, OcrOptions(format="json"))
    assert result.text == "Hello" and result.blocks[0].box == (0, 0, 600, 200)
    assert result.blocks[0].category == "Text"
    assert adapter.parse_ocr(answer, size, OcrOptions(format="layout")).blocks[0].box == (0, 0, 600, 200)


def test_batched_prefill_matches_single(adapter):
    """Two prompts with different images in one prefill: each row gets its own image features."""
    backend = adapter.engine_backend()
    small = page().resize((120, 90))
    a = adapter.encode_ocr(page(), OcrOptions())
    b = adapter.encode_ocr(small, OcrOptions(format="json"))
    both = backend.prefill([a, b])
    backend.keep([])
    alone = []
    for p in (a, b):
        alone.append(backend.prefill([p]))
        backend.keep([])
    assert torch.allclose(both[0], alone[0][0], atol=1e-4) and torch.allclose(both[1], alone[1][0], atol=1e-4)


def test_text_only_chat(adapter):
    from llm.types import ChatMessage

    text, usage = run(adapter, adapter.encode([ChatMessage("user", "Hello")], None), n=3)
    assert usage.completion_tokens == 3


def test_mismatched_checkpoint_is_a_clean_load_error(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors.pop("vision_tower.merger.ln_q.bias")
    tensors["vision_tower.extra.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadFailed) as info:
        DotsOcrAdapter(make_spec(bad)).load()
    assert "vision_tower.merger.ln_q.bias" in info.value.message and str(tmp_path) not in info.value.message
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ModelLoadFailed):
        DotsOcrAdapter(make_spec(bad)).load()
