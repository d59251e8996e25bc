"""The "small" benchmark checkpoint: a random Qwen2 causal LM of about 27M parameters.

Hidden 512, 8 layers, 8 heads (2 KV heads), intermediate 1408 and a byte-level BPE of
about 4,000 tokens. Unlike the tiny checkpoints (which measure framework overhead), its
forward pass costs about as much per token as a real small model on CPU, so batching
gains show up the way they would in production. Written under the registry id of the
default text model, so the server serves it with no configuration.

    python scripts/bench_models.py DIR      # writes DIR/qwen2_5_0_5b/
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
    SEED,
    _qwen_text_config,
    _save,
    _shape_output_head,
    qwen_tokenizer,
    train_bpe_json,
)

SMALL_ID = "qwen2_5_0_5b"
SMALL_VOCAB = 4000  # total tokens, special tokens and the 256 byte symbols included
SMALL_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, intermediate_size=1408)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help=f"models dir; the checkpoint goes to OUT_DIR/{SMALL_ID}/")
    args = parser.parse_args(argv)
    path = build_small_causal_lm(args.out_dir / SMALL_ID)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"{SMALL_ID}: {path} ({size / 1e6:.1f} MB, vocab {cfg.vocab_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
