"""IncrementalDetokenizer over the tiny models' real byte-level BPE tokenizer."""
from __future__ import annotations

import random

import pytest

from engine.detok import REPLACEMENT, IncrementalDetokenizer

TEXTS = [
    "我能吞下玻璃而不伤身体。请识别图片中的所有文字。",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Party 🎉🎉 time 👩‍👩‍👧 ok 😀!",
    "Mixed: 北京 Москва 🚀 $678.90 ñ é ü ß 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tokenizer():
    from scripts.make_tiny_models import qwen_tokenizer

    return qwen_tokenizer()


def stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    return detok, pieces


def assert_valid(piece: str) -> None:
    assert REPLACEMENT not in piece, repr(piece)
    piece.encode("utf-8")  # strict: raises on a lone surrogate
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in piece), repr(piece)


@pytest.mark.parametrize("text", TEXTS, ids=["zh", "ru", "emoji", "mixed"])
def test_one_token_at_a_time_gives_whole_characters(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    # The tokenizer really splits characters across tokens for this text (else the test proves nothing).
    split = [i for i in ids if REPLACEMENT in tokenizer.decode([i])]
    assert split, "expected some token holding a partial UTF-8 character"
    detok, pieces = stream(tokenizer, ids)
    for piece in pieces:
        assert_valid(piece)
    tail = detok.flush()
    assert tail == ""  # the text ends on a whole character: nothing was left behind
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert sum(1 for p in pieces if p) > 1  # really incremental, not all at the end


def test_emoji_bytes_are_held_until_the_character_is_complete(tokenizer):
    ids = tokenizer("ab😀")["input_ids"]
    emoji = tokenizer("😀")["input_ids"]
    assert len(emoji) > 1 and ids[-len(emoji):] == emoji
    detok = IncrementalDetokenizer(tokenizer)
    head = "".join(detok.push(i) for i in ids[:-len(emoji)])
    assert head == "ab"
    assert [detok.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert detok.push(emoji[-1]) == "😀"
    assert detok.flush() == ""


def test_truncated_character_is_held_back_and_flushed_at_the_end(tokenizer):
    emoji = tokenizer("😀")["input_ids"]
    ids = tokenizer("Привет ")["input_ids"] + emoji[:-1]  # the last byte(s) never arrive
    detok, pieces = stream(tokenizer, ids)
    for piece in pieces:
        assert_valid(piece)
    assert "".join(pieces) == "Привет "
    assert pieces[-(len(emoji) - 1):] == [""] * (len(emoji) - 1)
    tail = detok.flush()
    assert tail and set(tail) == {REPLACEMENT}  # what was held back comes out only now
    assert "".join(pieces) + tail == tokenizer.decode(ids)
    assert detok.flush() == ""  # flushing twice gives nothing more


def test_special_tokens_are_skipped(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("да")["input_ids"] + [end] + tokenizer(" 好")["input_ids"]
    detok, pieces = stream(tokenizer, ids)
    assert "".join(pieces) + detok.flush() == "да 好"
    keep = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(keep.push(i) for i in ids) + keep.flush() == "да<|im_end|> 好"


def test_random_token_streams_concatenate_to_the_full_decode(tokenizer):
    """Whatever a (random-weight) model emits, the streamed pieces plus the flush equal one
    decode of all ids, and a piece never ends in the middle of a character."""
    rng = random.Random(7)
    vocab = len(tokenizer)
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        detok, pieces = stream(tokenizer, ids)
        tail = detok.flush()
        assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True), ids
        assert all(not p.endswith(REPLACEMENT) for p in pieces), ids
