"""A long prompt's layers run in pieces of rows while rows decode (engine/layer_pieces.py):
the cache and logits one forward per chunk's to rounding, chunks kept whole, each piece sized
to the time left at its phase's rate, and a layer begun in pieces finished when the batch
empties."""
from __future__ import annotations

import pytest
import torch

from engine import layer_pieces
from engine.backend import BatchBackend, EncodedPrompt
from engine.layer_pieces import BLOCK_ROWS, PHASES
from engine.quant import quantize_int4_weight_only
from tests.engine.test_lean_decode import tiny_llama
from tests.engine.test_sliced_prefill import assert_same_to_rounding

pytestmark = pytest.mark.timeout(180)

TEXT = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 6


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen2-int4"])
def model(request):
    model, tokenizer = tiny_llama(dtype=torch.float32, arch=request.param.split("-")[0])
    if request.param.endswith("int4"):
        quantize_int4_weight_only(model)
    return model, tokenizer


def prefill(backend: BatchBackend, prompt: EncodedPrompt, budget: float | None) -> tuple[torch.Tensor, list]:
    """Prefill ``prompt`` through the slicer, each call with ``budget``; (logits, the pieces run
    as (phase, layer, chunk start, r0, r1))."""
    runs = []
    run = backend.sliced.pieces.run

    def record(phase, layer, index, chunk, cache, r0, r1, mask=None):
        runs.append((phase, index, chunk.start, r0, r1))
        run(phase, layer, index, chunk, cache, r0, r1, mask)

    backend.sliced.pieces.run = record
    part = backend.begin_prefill(prompt)
    while True:
        logits = backend.sliced.advance(part, backend.prefill_chunk, budget)
        if logits is not None:
            backend._finish_part(part)  # the row joins, as prefill_chunk_step does
            return logits, runs


def test_pieces_are_one_forward_per_chunk_to_rounding(model):
    """With no time to spare every call runs one block: every phase of every layer in blocks of
    BLOCK_ROWS, each chunk whole. The cache, the logits and the next decode steps' tokens are
    those of one forward per chunk."""
    model, tokenizer = model
    prompt = EncodedPrompt(tokenizer(TEXT)["input_ids"])
    chunk, n, layers = 3 * BLOCK_ROWS, len(prompt.input_ids), model.config.num_hidden_layers
    assert n > 3 * chunk and n % chunk
    a = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    b = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    assert a.sliced.pieces is not None
    logits, runs = prefill(a, prompt, 0.0)
    whole = b.prefill([prompt]) if n <= chunk else None
    part = b.begin_prefill(prompt)
    while whole is None:
        whole = b._run_part(part, chunk)
    # Every (layer, phase) of every chunk in blocks of BLOCK_ROWS, in order.
    expected = []
    for start in range(0, n, chunk):
        tokens = min(chunk, n - start)
        for layer in range(layers):
            for phase in PHASES:
                expected += [(phase, layer, start, r, min(tokens, r + BLOCK_ROWS)) for r in range(0, tokens, BLOCK_ROWS)]
    assert runs == expected
    assert_same_to_rounding(a, b, logits, whole, 1e-5)


def test_a_piece_is_sized_to_the_time_left_at_its_phases_rate(model, monkeypatch):
    """The rows of a piece are the most blocks whose multiply-adds fit the time left at the
    phase's recent rate; the attention's cost grows with the positions it reads; a slice runs
    pieces until the next one does not fit, and at least one block."""
    model, tokenizer = model
    pieces = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=512).sliced.pieces
    for phase in PHASES:
        assert pieces.rows_within(phase, 0, 0, 512, 1.0) == BLOCK_ROWS  # not measured: one block measures it
        assert pieces.rows_within(phase, 0, 0, 512, None) == 512        # no limit: the rest
    rate = 1e9
    monkeypatch.setattr(pieces, "rate", lambda phase: rate)
    for phase in PHASES:
        for start, r0 in ((0, 0), (3000, 64)):
            allowed = pieces.macs(phase, start, r0, r0 + 5 * BLOCK_ROWS + 3) / rate
            assert pieces.rows_within(phase, start, r0, 512, allowed) == 5 * BLOCK_ROWS
            assert pieces.rows_within(phase, start, r0, r0 + 40, allowed) == 40  # the rest fits
            assert pieces.rows_within(phase, start, r0, 512, 0.0) == 0
    late = pieces.macs("attend", 3000, 0, BLOCK_ROWS) / rate
    assert pieces.rows_within("attend", 0, 0, 512, late) > 8 * BLOCK_ROWS  # early rows read fewer positions


def test_a_slice_fills_its_budget_in_pieces_and_chunks_keep_their_size(model, monkeypatch):
    """While rows decode, a slice runs pieces until the next does not fit the time left (or
    the cut, when less); the chunk is not cut (its layers' pieces are); with no time left a
    slice still runs one block, and that block is the least a slice is predicted to take."""
    import time

    model, tokenizer = model
    backend = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=64)
    sliced = backend.sliced
    pieces = sliced.pieces
    rate = 1e9  # every phase runs at this many multiply-adds a second, on a clock of its own
    monkeypatch.setattr(pieces, "rate", lambda phase: rate)
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    runs = []

    def run(phase, layer, index, chunk, cache, r0, r1, mask=None):
        runs.append((phase, index, r0, r1))
        clock[0] += pieces.macs(phase, chunk.start, r0, r1) / rate

    monkeypatch.setattr(pieces, "run", run)

    def seconds(phase, r0, r1):
        return pieces.macs(phase, 0, r0, r1) / rate

    part = backend.begin_prefill(EncodedPrompt(tokenizer(TEXT)["input_ids"]))
    budget = seconds("proj", 0, 64) + seconds("attend", 0, 16) * 1.01  # the whole first phase and a block
    assert sliced.advance(part, 64, budget) is None
    assert runs == [("proj", 0, 0, 64), ("attend", 0, 0, 16)] and part.sliced.tokens == 64
    runs.clear()
    cut = seconds("attend", 16, 48) * 1.01
    assert sliced.advance(part, 64, 1.0, cut) is None  # the cut, less than the budget: 2 blocks
    assert runs == [("attend", 0, 16, 48)]
    runs.clear()
    assert sliced.advance(part, 64, -1.0) is None  # no time at all: still one block
    assert runs == [("attend", 0, 48, 64)]
    assert sliced.next_slice_time(part, 64, 0.0) == pytest.approx(seconds("mlp", 0, 16))  # the least a slice runs


def test_a_chunk_begins_only_at_a_slices_start(model):
    """Beginning a chunk (its embeddings and mask) takes time the pieces are not planned with: a
    slice with time left ends at a chunk's end, and the next slice begins the next chunk."""
    model, tokenizer = model
    backend = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=3 * BLOCK_ROWS)
    part = backend.begin_prefill(EncodedPrompt(tokenizer(TEXT)["input_ids"]))
    assert backend.sliced.advance(part, 3 * BLOCK_ROWS, 1e3) is None
    assert part.sliced is None and part.done == 3 * BLOCK_ROWS
    assert backend.sliced.advance(part, 3 * BLOCK_ROWS, 1e3) is None
    assert part.sliced is None and part.done == 6 * BLOCK_ROWS


def test_a_layer_begun_in_pieces_is_finished_when_the_batch_empties(model):
    """A slice with no budget (nothing decodes) finishes the layer under way in pieces, then
    runs whole layers to the chunk's end; the result is the same."""
    model, tokenizer = model
    prompt = EncodedPrompt(tokenizer(TEXT)["input_ids"])
    chunk = 3 * BLOCK_ROWS
    a = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    b = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    part = a.begin_prefill(prompt)
    assert a.sliced.advance(part, chunk, 0.0) is None and a.sliced.advance(part, chunk, 0.0) is None
    assert part.sliced.phase == 0 and part.sliced.row == 2 * BLOCK_ROWS  # two blocks of the first phase
    assert a.sliced.advance(part, chunk, None) is None  # the rest of the chunk
    assert part.sliced is None and part.done == chunk
    logits = None
    while logits is None:
        logits = a.sliced.advance(part, chunk, None)
    a._finish_part(part)
    whole, _ = prefill(b, prompt, None)
    torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)


def test_models_whose_layers_have_other_parts_are_not_run_in_pieces():
    """A layer with query and key norms (Qwen3) is not one this runs: the slicer keeps whole
    layers for it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert not layer_pieces.supported(Qwen3ForCausalLM(config))
    llama, _ = tiny_llama()
    assert layer_pieces.supported(llama)
