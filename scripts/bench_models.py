"""The "small" benchmark checkpoints: a random Qwen2 causal LM of about 27M parameters, and a
random Qwen2-VL of about 30M built the same way (``build_small_qwen2_vl``).

Hidden 512, 8 layers, 8 heads (2 KV heads), intermediate 1408 and a byte-level BPE of
about 4,000 tokens. Unlike the tiny checkpoints (which measure framework overhead), its
forward pass costs about as much per token as a real small model on CPU, so batching
gains show up the way they would in production. Written under the registry id of the
default text model, so the server serves it with no configuration.

The small Qwen2-VL pairs a 6-layer text model of the same width and tokenizer with an
8-block vision tower (width 256, MLP 1024) of 8.2M parameters (29.2M in all): at the benchmark's
224x168 image (192 patches) the tower costs about as much as the prompt's prefill, as in the
real 2B model, so images are not free the way they are on the tiny checkpoint.

    python scripts/bench_models.py DIR          # writes DIR/qwen2_5_0_5b/
    python scripts/bench_models.py DIR --vlm    # and DIR/qwen_vl_2b/ (the small Qwen2-VL)
"""
from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.make_tiny_models import (  # noqa: E402
    MAX_PIXELS,
    MIN_PIXELS,
    SEED,
    _token_ids,
    _qwen_text_config,
    _save,
    _shape_output_head,
    qwen_tokenizer,
    train_bpe_json,
)

SMALL_ID = "qwen2_5_0_5b"
SMALL_VLM_ID = "qwen_vl_2b"  # served under the default VLM's registry id, like the text one
SMALL_VOCAB = 4000  # total tokens, special tokens and the 256 byte symbols included
SMALL_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, intermediate_size=1408)
SMALL_VLM_TEXT_LAYERS = 6
# Qwen2-VL's vision tower: ViT blocks on 14-pixel patches, 2x2 merged into one text token;
# the merger projects to the text width.
SMALL_VISION = dict(depth=8, embed_dim=256, hidden_size=SMALL_SHAPE["hidden_size"], num_heads=4,
                    mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

# Letters the pseudo-words are drawn from: a corpus of random syllables in several scripts
# gives the trainer thousands of frequent pairs, so it reaches the full vocabulary.
_ALPHABETS = {
    "latin": ("bcdfghjklmnprstvwz", "aeiouy"),
    "cyrillic": ("бвгджзклмнпрстфхцчшщ", "аеиоуыэюяё"),
    "greek": ("βγδζθκλμνξπρστφχψ", "αεηιουω"),
}
_CJK_FIRST, _CJK_COUNT = 0x4E00, 600  # common block start; a few hundred ideographs


def _corpus(rng: random.Random, n_words: int = 6000, n_lines: int = 12000) -> list[str]:
    """Lines of Zipf-distributed pseudo-words, so frequent words become single tokens."""
    words: list[str] = []
    for i in range(n_words):
        script = ("latin", "cyrillic", "greek", "cjk")[i % 4]
        if script == "cjk":
            words.append("".join(chr(_CJK_FIRST + rng.randrange(_CJK_COUNT)) for _ in range(rng.randint(1, 3))))
            continue
        consonants, vowels = _ALPHABETS[script]
        syllables = rng.randint(1, 4)
        words.append("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    weights = [1.0 / (rank + 1) for rank in range(n_words)]
    lines = []
    for _ in range(n_lines):
        picked = rng.choices(words, weights=weights, k=rng.randint(6, 14))
        lines.append(" ".join(picked) + rng.choice([".", ",", "!", "?", ""]))
    return lines


@functools.lru_cache(maxsize=1)
def _small_bpe_json() -> str:
    return train_bpe_json(_corpus(random.Random(SEED)), SMALL_VOCAB)


def small_tokenizer():
    """The ~4,000-token BPE wrapped like the tiny checkpoints' Qwen tokenizer."""
    return qwen_tokenizer(_small_bpe_json())


def build_small_causal_lm(out: Path) -> Path:
    """Write the ~27M-parameter Qwen2 causal LM and its tokenizer to ``out``; return ``out``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tokenizer = small_tokenizer()
    config = _qwen_text_config(tokenizer, **SMALL_SHAPE, tie_word_embeddings=False,
                               max_position_embeddings=4096,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    # Same shaping as the tiny checkpoints (special tokens never picked, replies run to
    # max_tokens), rescaled so the logit spread matches at hidden 512 instead of 64.
    _shape_output_head(model, tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_((64 / SMALL_SHAPE["hidden_size"]) ** 0.5)
    _save(out, model, tokenizer, tokenizer)
    return out


def build_small_qwen2_vl(out: Path) -> Path:
    """Write the ~30M-parameter Qwen2-VL (text, vision tower, processor) to ``out``; return ``out``."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    out = Path(out)
    tokenizer = small_tokenizer()
    # head_dim 64: the (t, h, w) multimodal RoPE sections sum to 32, Qwen2-VL's own split.
    text = _qwen_text_config(tokenizer, **{**SMALL_SHAPE, "num_hidden_layers": SMALL_VLM_TEXT_LAYERS},
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [16, 8, 8]})
    config = Qwen2VLConfig(text_config=text, vision_config=SMALL_VISION, tie_word_embeddings=False,
                           **_token_ids(tokenizer))
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _shape_output_head(model, tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_((64 / SMALL_SHAPE["hidden_size"]) ** 0.5)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    shape = dict(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**shape), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**shape),
                                 chat_template=tokenizer.chat_template)
    _save(out, model, processor, tokenizer)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help=f"models dir; the checkpoint goes to OUT_DIR/{SMALL_ID}/")
    parser.add_argument("--vlm", action="store_true", help=f"also write OUT_DIR/{SMALL_VLM_ID}/ (small Qwen2-VL)")
    args = parser.parse_args(argv)
    paths = {SMALL_ID: build_small_causal_lm(args.out_dir / SMALL_ID)}
    if args.vlm:
        paths[SMALL_VLM_ID] = build_small_qwen2_vl(args.out_dir / SMALL_VLM_ID)
    for name, path in paths.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{name}: {path} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
