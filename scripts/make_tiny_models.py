"""Build tiny random-weight checkpoints for tests, with no network access.

Each checkpoint uses transformers' own config and model classes at toy sizes, and is
saved with ``save_pretrained`` next to a real processor (tokenizer, image and video
processor, chat template). So the server's adapters load them exactly like the real
weights, through ``AutoProcessor`` / ``AutoModelForImageTextToText`` with
``local_files_only=True``. The outputs are noise, but shapes, token ids, prompt
building and generation plumbing are all real.

Adding a family is one entry in ``BUILDERS`` (id -> function writing the folder).

    python scripts/make_tiny_models.py DIR [--ids qwen_vl_2b,qwen3_vl_2b]
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 640  # trained BPE size before special tokens; small keeps folders ~1 MB

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Same pre-tokenisation as the Qwen2 tokenizer, so text splits the way production does.
_QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_CORPUS = """\
Read all the text in this image. Output only the text, preserving line breaks.
The quick brown fox jumps over the lazy dog. Invoice number 12345, total due: $678.90.
You are a helpful assistant. Describe the picture in one sentence, please.
Dear customer, thank you for your order. Your parcel will arrive on Monday.
Съешь же ещё этих мягких французских булок, да выпей чаю.
Распознай весь текст на изображении. Текст на русском языке. Счёт № 42 от 1 марта.
Москва, улица Ленина, дом 7, квартира 15. Итого к оплате: 1 250 рублей.
我能吞下玻璃而不伤身体。请识别图片中的所有文字。
北京市朝阳区建国路八十八号。发票金额：人民币三百元整。今天天气很好。
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? " ' @ # % & _ | ~ ^
"""

# A Qwen-style ChatML template written for these tests: a default system turn, string
# or list content, and vision placeholders the processor expands to the real count.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message.role != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part.type == 'text' %}{{ part.text }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's published template adds no default system turn (Qwen2/2.5 add "You are a helpful
# assistant."): the same template without that branch.
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if loop.first and message.role != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}", "")
assert QWEN3_CHAT_TEMPLATE != CHAT_TEMPLATE

# Processors work at toy resolution so a test image is a handful of vision tokens.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    """Train once per process; the JSON string is immutable, so callers get fresh copies."""
    return train_bpe_json(_CORPUS.splitlines() * 4, VOCAB_SIZE)


def train_bpe_json(lines, vocab_size: int) -> str:
    """A byte-level BPE with Qwen's pre-tokenisation and special tokens, trained on ``lines``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok.to_str()


def qwen_tokenizer(bpe_json: str | None = None):
    """A fast tokenizer with Qwen's special tokens: eos <|im_end|>, pad <|endoftext|>.
    ``bpe_json`` is a trained BPE (default: the small one trained here)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe_json or _trained_bpe_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen_text_config(tokenizer, **extra) -> dict:
    # head_dim 16 -> the three mrope sections (t, h, w) must sum to 8.
    cfg = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    cfg.update(extra)
    return cfg


def _shape_output_head(model, tokenizer) -> None:
    """Make replies long: widen the random logits and zero the special tokens' rows.

    With the default init the logits are nearly flat (std ~0.16), so sampling hits an
    end-of-turn token every few hundred steps. Scaled to std ~3, a zeroed row (logit 0,
    the median) is almost never sampled and never the greedy pick: replies run to
    ``max_new_tokens``, which the tests and the server's long-generation checks rely on.
    The output head is untied, so the input embeddings are unaffected.
    """
    import torch

    ids = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight.normal_(0.0, 0.4)  # * sqrt(hidden 64) -> logit std ~3.2
        weight[ids] = 0.0


def _save(out: Path, model, processor, tokenizer) -> None:
    from transformers import GenerationConfig

    # Stop on either end marker, as the real Qwen checkpoints do.
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_qwen_vl(out: Path, *, config_cls, model_cls, processor_cls, video_cls,
                   vision: dict, text_extra: dict | None = None,
                   patch_size: int = 14, image_mean=None, image_std=None,
                   chat_template: str = CHAT_TEMPLATE) -> None:
    import torch
    from transformers import Qwen2VLImageProcessor

    tokenizer = qwen_tokenizer()
    config = config_cls(
        text_config=_qwen_text_config(tokenizer, **(text_extra or {})),
        vision_config=vision,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    _shape_output_head(model, tokenizer)

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    norm = {} if image_mean is None else {"image_mean": image_mean, "image_std": image_std}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=patch_size, merge_size=2,
                                            temporal_patch_size=2, **norm)
    video_processor = video_cls(size=size, patch_size=patch_size, merge_size=2,
                                temporal_patch_size=2, **norm)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor, chat_template=chat_template)
    _save(out, model, processor, tokenizer)


def build_qwen2_vl(out: Path) -> None:
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    _build_qwen_vl(
        out, config_cls=Qwen2VLConfig, model_cls=Qwen2VLForConditionalGeneration,
        processor_cls=Qwen2VLProcessor, video_cls=Qwen2VLVideoProcessor,
        # The merger projects straight to `hidden_size`, so it must equal the text width.
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    )


def build_qwen2_5_vl(out: Path) -> None:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLVideoProcessor)

    _build_qwen_vl(
        out, config_cls=Qwen2_5_VLConfig, model_cls=Qwen2_5_VLForConditionalGeneration,
        processor_cls=Qwen2_5_VLProcessor, video_cls=Qwen2VLVideoProcessor,
        # window 56 px = 4 patches = 2 merged tokens, so windowed attention is exercised
        # even at toy resolution; block 1 keeps full attention as in the real model.
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                    out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
    )


def build_qwen3_vl(out: Path) -> None:
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)

    half = [0.5, 0.5, 0.5]
    _build_qwen_vl(
        out, config_cls=Qwen3VLConfig, model_cls=Qwen3VLForConditionalGeneration,
        processor_cls=Qwen3VLProcessor, video_cls=Qwen3VLVideoProcessor,
        # Position embeddings are a square grid interpolated to the image, hence 8*8.
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                    out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0]),
        text_extra=dict(head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        patch_size=16, image_mean=half, image_std=half, chat_template=QWEN3_CHAT_TEMPLATE,
    )


def build_qwen2_causal_lm(out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                          kv_heads: int = 2, intermediate: int = 128) -> None:
    """A Qwen2 causal LM (the architecture of Qwen2.5-0.5B-Instruct) with its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = qwen_tokenizer()
    text = _qwen_text_config(tokenizer, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                             intermediate_size=intermediate, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**text)).eval()
    _shape_output_head(model, tokenizer)
    _save(out, model, tokenizer, tokenizer)


GOT_IMAGE_TOKENS = ["<img>", "</img>", "<imgpad>"]


def build_got_ocr2(out: Path) -> None:
    """GOT-OCR 2.0 (the stepfun-ai/GOT-OCR-2.0-hf layout): a SAM-style windowed ViT at the real
    1024 px input (the processor always gives 256 image tokens per 1024 px tile), a Qwen2 decoder.
    No chat template: the processor writes GOT's own ChatML prompt."""
    import torch
    from transformers import (GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2ImageProcessor,
                              GotOcr2Processor)

    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(GOT_IMAGE_TOKENS, special_tokens=True)
    tokenizer.chat_template = None
    # 2048 positions: room for a 7-image multi-crop prompt (1792 image tokens), and a reply that
    # random weights never end stops at the context instead of at config.yaml's 4096 tokens.
    text = _qwen_text_config(tokenizer, tie_word_embeddings=False, max_position_embeddings=2048,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    # Tiny widths, real geometry: 1024 / patch 16 = 64x64 patches in windows of 14; the projector's
    # two stride-2 convs leave 16x16 = 256 tokens. Both layers windowed: a global layer over 4096
    # patches costs ~0.35 s an image on one core, ten times the rest of the tower.
    vision = dict(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                  mlp_dim=32, image_size=1024, patch_size=16, window_size=14, global_attn_indexes=[],
                  initializer_range=0.02)  # SAM's default 1e-10 makes every image look the same
    config = GotOcr2Config(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"))
    torch.manual_seed(SEED)
    model = GotOcr2ForConditionalGeneration(config).eval()
    _shape_output_head(model, tokenizer)
    image_processor = GotOcr2ImageProcessor(size={"height": 1024, "width": 1024})
    processor = GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer)
    _save(out, model, processor, tokenizer)


def build_dots_ocr(out: Path) -> None:
    """dots.ocr (our native vlm/dots_ocr/modeling.py): a Qwen2 decoder plus a vision tower, saved
    like the published checkpoint (config.json in its key style, safetensors, a tokenizer with the
    <|img|> <|imgpad|> <|endofimg|> and <|user|>/<|assistant|> tokens); no processor files."""
    import json
    import sys

    import torch
    from transformers import GenerationConfig

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # run as a script: the repository's packages are not importable yet
        sys.path.insert(0, root)
    from vlm.dots_ocr.modeling import DotsOCRConfig, DotsOCRForCausalLM
    from vlm.dots_ocr.processing import SPECIAL_TOKENS

    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    tokenizer.chat_template = None
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|endofassistant|>", "<|imgpad|>",
                                                           "<|video_pad|>")}
    eos = [ids["<|endoftext|>"], ids["<|endofassistant|>"]]
    text = _qwen_text_config(tokenizer, tie_word_embeddings=False, eos_token_id=eos,
                             pad_token_id=ids["<|endoftext|>"],
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    # head_dim 16 splits into 4 row and 4 column rotary frequencies; the merger maps 4*32 -> 64.
    vision = dict(embed_dim=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=1, post_norm=True, use_bias=False)
    config = DotsOCRConfig(vision_config=vision, image_token_id=ids["<|imgpad|>"],
                           video_token_id=ids["<|video_pad|>"], **text)
    torch.manual_seed(SEED)
    model = DotsOCRForCausalLM(config).eval()
    _shape_output_head(model, tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))] = 0.0
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Rewrite config.json the way the published one reads (rope_theta, attention_bias, remote-code keys).
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg.update(attention_bias=True, architectures=["DotsOCRForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_dots_ocr.DotsOCRForCausalLM"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


# registry id -> builder writing that folder.
BUILDERS: dict[str, Callable[[Path], None]] = {
    "qwen2_5_0_5b": build_qwen2_causal_lm,
    "qwen_vl_2b": build_qwen2_vl,
    "qwen2_5_vl_3b": build_qwen2_5_vl,
    "qwen3_vl_2b": build_qwen3_vl,
    "dots_ocr": build_dots_ocr,
    "got_ocr": build_got_ocr2,
}


def build_tiny_models(out_dir: Path, ids: list[str] | None = None) -> dict[str, Path]:
    """Write ``out_dir/<id>/`` for each id (all known ids by default); return id -> folder."""
    out_dir = Path(out_dir)
    ids = list(BUILDERS) if ids is None else ids
    unknown = [i for i in ids if i not in BUILDERS]
    if unknown:
        raise KeyError(f"unknown tiny model ids: {', '.join(unknown)} (known: {', '.join(BUILDERS)})")
    written: dict[str, Path] = {}
    for model_id in ids:
        BUILDERS[model_id](out_dir / model_id)
        written[model_id] = out_dir / model_id
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--ids", help=f"comma-separated subset of: {','.join(BUILDERS)}")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ids = [i.strip() for i in args.ids.split(",") if i.strip()] if args.ids else None
    unknown = sorted(set(ids or ()) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown ids {','.join(unknown)}; known: {','.join(BUILDERS)}")
    for model_id, path in build_tiny_models(args.out_dir, ids).items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{model_id}: {path} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
