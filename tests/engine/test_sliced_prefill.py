"""A long prompt prefilled a few layers per engine step (engine/sliced_prefill.py): the same
cache and logits as one forward per chunk (bitwise), a bounded slice per step while rows decode
(one layer when the budget is spent at once), chunks cut to the budget while rows decode and
whole when nothing does, and greedy replies through the engine identical to one prefill (also
with layers in pieces, engine/layer_pieces.py, which tests/engine/test_layer_pieces.py tests)."""
from __future__ import annotations

import pytest
import torch

from engine.backend import BatchBackend, EncodedPrompt
from engine.quant import quantize_int4_weight_only
from tests.engine.test_engine import greedy, run_batch
from tests.engine.test_lean_decode import tiny_llama

pytestmark = pytest.mark.timeout(180)

TEXT = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 5


@pytest.fixture(autouse=True)
def whole_layers(request, monkeypatch):
    """These tests are of whole layers and chunks cut to the budget (PIECES off), except where a
    test asks for ``pieces``; layers run in pieces are tests/engine/test_layer_pieces.py's."""
    import engine.sliced_prefill

    params = getattr(getattr(request.node, "callspec", None), "params", {})
    monkeypatch.setattr(engine.sliced_prefill, "PIECES", params.get("pieces", False))


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen2-int4"])
def model(request):
    model, tokenizer = tiny_llama(arch=request.param.split("-")[0])
    if request.param.endswith("int4"):
        quantize_int4_weight_only(model)
    return model, tokenizer


def prefill_parts(backend: BatchBackend, prompt: EncodedPrompt, sliced: bool) -> tuple[torch.Tensor, int]:
    """Prefill ``prompt`` chunk by chunk (``sliced``: one layer per call); (logits, calls)."""
    part = backend.begin_prefill(prompt)
    calls = 0
    while True:
        calls += 1
        logits = backend.sliced.advance(part, backend.prefill_chunk, 0.0) if sliced \
            else backend._run_part(part, backend.prefill_chunk)
        if logits is not None:
            if sliced:
                backend._finish_part(part)  # the row joins, as prefill_chunk_step does
            return logits, calls


def assert_same_to_rounding(a: BatchBackend, b: BatchBackend, logits: torch.Tensor, whole: torch.Tensor,
                            tol: float) -> None:
    """``a``'s prefill gave ``logits`` and ``b``'s ``whole``: they, and the two caches, agree
    within ``tol``; the greedy token and the next decode steps' tokens are the same."""
    torch.testing.assert_close(logits, whole, rtol=tol, atol=tol)
    for x, y in zip(a.cache.layers, b.cache.layers):
        torch.testing.assert_close(x.keys, y.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(x.values, y.values, rtol=tol, atol=tol)
    tokens = logits.argmax(-1).tolist()
    assert tokens == whole.argmax(-1).tolist()
    for _ in range(4):
        la, lb = a.decode(tokens), b.decode(tokens)
        assert la.argmax(-1).tolist() == lb.argmax(-1).tolist()
        tokens = la.argmax(-1).tolist()


def test_sliced_prefill_is_bitwise_one_forward_per_chunk(model):
    model, tokenizer = model
    prompt = EncodedPrompt(tokenizer(TEXT)["input_ids"])
    n, chunk, layers = len(prompt.input_ids), 16, model.config.num_hidden_layers
    a = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    b = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    assert a.sliced is not None and a.chunked(prompt)
    sliced, calls = prefill_parts(a, prompt, True)
    whole, _ = prefill_parts(b, prompt, False)
    assert calls == -(-n // chunk) * layers  # a budget spent at once: one layer per call
    assert torch.equal(sliced, whole)
    for x, y in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    # And the next decode steps agree too.
    tokens = sliced.argmax(-1).tolist()
    for _ in range(3):
        la, lb = a.decode(tokens), b.decode(tokens)
        assert torch.equal(la, lb)
        tokens = la.argmax(-1).tolist()


def test_a_slice_is_bounded_while_rows_decode_and_a_chunk_when_none_do(model):
    model, tokenizer = model
    backend = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=16)
    prompt = EncodedPrompt(tokenizer(TEXT)["input_ids"])
    layers = model.config.num_hidden_layers
    # Nothing decoding: each engine step runs a whole chunk.
    part = backend.begin_prefill(prompt)
    assert backend.prefill_chunk_step(part) is None and part.done == 16 and part.sliced is None
    # A row decoding whose steps take ~no time: one layer per engine step.
    tokens = backend.prefill([EncodedPrompt(tokenizer("hello there")["input_ids"])]).argmax(-1).tolist()
    backend.decode(tokens)
    backend.last_step = (1e-9, 1e-9)  # (the last step, the usual one)
    assert backend.prefill_chunk_step(part) is None and part.sliced.layer == 1
    # Steps that take ages: the rest of the chunk, and the next ones, within one call.
    backend.last_step = (1e3, 1e3)
    logits = None
    while logits is None:
        logits = backend.prefill_chunk_step(part)
    assert part.done == len(prompt.input_ids) and backend.batch_size == 2
    assert layers > 1


def test_chunks_are_cut_to_what_one_layer_runs_within_the_budget(model):
    """While rows decode, a chunk is cut so that one of its layers fits the budget at the rate
    the recent layers ran: shorter late in a long prompt, where its attention reads every
    earlier position; whole when nothing decodes."""
    from engine.sliced_prefill import CUT_STEP

    model, tokenizer = model
    sliced = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=512).sliced
    assert sliced.chunk_size(3000, 512, None) == 512
    assert sliced.chunk_size(0, 512, 1.0) == 2 * CUT_STEP  # nothing measured yet: a small one
    rate = 1e9
    sliced._rates.extend([rate] * 3)
    budget = sliced.layer_macs(200, 0) / rate
    early, late = sliced.chunk_size(0, 512, budget), sliced.chunk_size(400, 512, budget)
    assert early == 192 and CUT_STEP <= late < early and late % CUT_STEP == 0
    for size, done in ((early, 0), (late, 400)):
        assert sliced.layer_macs(size, done) <= budget * rate < sliced.layer_macs(size + CUT_STEP, done)
    assert sliced.chunk_size(10**6, 512, budget) == CUT_STEP  # never below one step


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("chunk", [16, 64])
def test_engine_replies_identical_to_one_prefill(model, chunk, pieces):
    model, tokenizer = model

    def encode(messages, prompt):
        return EncodedPrompt(tokenizer(prompt)["input_ids"])

    params = greedy(10)
    requests = [(None, TEXT, params), (None, "short one", params), (None, TEXT[::-1], params)]
    one = [run_batch(BatchBackend(model, tokenizer, encode, threads=1), [r])[0][0] for r in requests]
    sliced = BatchBackend(model, tokenizer, encode, threads=1, prefill_chunk=chunk)
    assert sliced.sliced is not None and (sliced.sliced.pieces is not None) == pieces
    assert [text for text, _ in run_batch(sliced, requests)] == one


def test_the_slice_takes_the_models_share_of_a_decode_step(tmp_path):
    """The model setting `prefill_slice_share` reaches the engine: while rows decode, each
    slice's budget is that share of their usual step, and chunks are cut so that a layer takes
    LAYER_FIT of it; a share out of range is refused."""
    from pydantic import ValidationError

    from core.config import ModelConfig
    from engine.long_prompts import LAYER_FIT
    from llm.causal import CausalLMAdapter
    from models.registry import spec_from_config

    with pytest.raises(ValidationError, match="prefill_slice_share"):
        ModelConfig(name="m", kind="causal_lm", prefill_slice_share=0)
    assert ModelConfig(name="m", kind="causal_lm").prefill_slice_share == 0.5
    spec = spec_from_config("m", ModelConfig(name="m", kind="causal_lm", prefill_slice_share=0.25), tmp_path, tmp_path)
    adapter = CausalLMAdapter(spec)
    adapter.model, adapter.tokenizer = tiny_llama(dtype=torch.float32)
    backend = adapter.engine_backend()
    backend.prefill_chunk = 16
    assert backend.slice_share == 0.25
    tokenizer = adapter.tokenizer
    budgets = []
    advance = backend.sliced.advance
    backend.sliced.advance = lambda part, size, budget, cut: budgets.append((budget, cut)) or advance(part, size, budget, cut)
    part = backend.begin_prefill(EncodedPrompt(tokenizer(TEXT)["input_ids"]))
    tokens = backend.prefill([EncodedPrompt(tokenizer("hello there")["input_ids"])]).argmax(-1).tolist()
    backend.decode(tokens)
    backend.last_step = (0.04, 0.04)
    backend.prefill_chunk_step(part)
    assert budgets == [(pytest.approx(0.01), pytest.approx(0.01 * LAYER_FIT))]


def test_a_slice_stops_at_a_chunk_boundary_when_the_next_chunks_layer_would_overrun(model):
    """After a chunk's last layer, the next chunk's first layer is predicted at the recent rate
    (it may be longer and sit later than the layer just run): a slice that cannot fit it ends
    at the boundary instead of overrunning its budget."""
    model, tokenizer = model
    backend = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=16)
    prompt = EncodedPrompt(tokenizer(TEXT)["input_ids"])
    part = backend.begin_prefill(prompt)
    layers = model.config.num_hidden_layers
    for _ in range(layers - 1):  # one layer per call: the first chunk up to its last layer
        assert backend.sliced.advance(part, 16, 0.0) is None
    assert part.sliced.layer == layers - 1
    # Layers seemingly ran at one multiply-add per second: no layer of the next chunk fits a
    # second, however fast the one just run was.
    backend.sliced._rates.extend([1.0] * 8)
    assert backend.sliced.advance(part, 16, 1.0) is None
    assert part.sliced is None and part.done == 16


def test_a_slow_step_takes_its_excess_out_of_the_slice_after_it(model):
    """A decode step that ran slow has spent part of the rows' gap: its excess over SLOW_STEP
    usual steps comes out of the slice, which waits when not even one layer then fits, though
    never more than MAX_WAITS steps in a row. A step up to SLOW_STEP leaves the whole budget."""
    import time

    from engine.long_prompts import MAX_WAITS, SLOW_STEP

    model, tokenizer = model
    backend = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=16)
    # Each layer takes 30 ms; the rows' usual step 100 ms, so a slice's budget is 50 ms.
    real = backend.sliced.layers
    backend.sliced.layers = [lambda *a, layer=layer, **kw: time.sleep(0.03) or layer(*a, **kw) for layer in real]
    part = backend.begin_prefill(EncodedPrompt(tokenizer(TEXT)["input_ids"]))
    tokens = backend.prefill([EncodedPrompt(tokenizer("hello there")["input_ids"])]).argmax(-1).tolist()
    backend.decode(tokens)
    layers = model.config.num_hidden_layers

    def progress() -> int:  # layers run (chunks of 16 tokens)
        return part.done // 16 * layers + (part.sliced.layer if part.sliced is not None else 0)

    def step(took: float) -> int:
        """One engine step after a decode step of ``took`` usual steps; the layers it ran."""
        backend.last_step = (0.1 * took, 0.1)
        before = progress()
        assert backend.prefill_chunk_step(part) is None
        return progress() - before

    assert step(1.0) == 1                        # the first layer measures the rate
    assert step(SLOW_STEP) == 1                  # slow, but within SLOW_STEP: the whole budget
    for _ in range(MAX_WAITS):
        assert step(SLOW_STEP + 0.45) == 0      # 5 ms left: no layer fits, it waits
    assert part.waits == MAX_WAITS
    assert step(SLOW_STEP + 0.45) == 1          # ... but not one step more
    assert part.waits == 0
    assert step(0.9) == 1


def test_the_slice_runs_after_the_rows_step_and_before_their_tokens_go_out(model, monkeypatch):
    """In every engine step with rows decoding, the long prompt's slice comes after their
    decode step (so its budget knows that step's time) and before the step's tokens are
    delivered."""
    from engine.engine import Engine

    model, tokenizer = model

    def encode(messages, prompt):
        return EncodedPrompt(tokenizer(prompt)["input_ids"])

    backend = BatchBackend(model, tokenizer, encode, threads=1, prefill_chunk=16)
    events: list[str] = []
    decode, chunk_step = backend.decode, backend.prefill_chunk_step
    backend.decode = lambda tokens: events.append("decode") or decode(tokens)
    backend.prefill_chunk_step = lambda part: events.append("slice") or chunk_step(part)
    deliver = Engine._deliver
    monkeypatch.setattr(Engine, "_deliver", staticmethod(lambda items: events.append("deliver") or deliver(items)))
    replies = run_batch(backend, [(None, "short one", greedy(40)), (None, TEXT, greedy(3))])
    assert all(text for text, _ in replies)
    steps = " ".join(events).split("deliver")
    with_both = [s.split() for s in steps if "decode" in s and "slice" in s]
    assert len(with_both) >= model.config.num_hidden_layers  # the prompt advanced while the row decoded
    assert all(s == ["decode", "slice"] for s in with_both)


def test_the_last_rows_tokens_go_out_before_a_slice_with_nothing_decoding(model, monkeypatch):
    """When the last decoding rows finish, nothing waits for the long prompt's next slice, which
    is then a whole chunk: their last tokens and their end go out before it, not after it."""
    from engine.engine import Engine

    model, tokenizer = model

    def encode(messages, prompt):
        return EncodedPrompt(tokenizer(prompt)["input_ids"])

    backend = BatchBackend(model, tokenizer, encode, threads=1, prefill_chunk=16)
    events: list = []
    decode, chunk_step = backend.decode, backend.prefill_chunk_step
    backend.decode = lambda tokens: events.append("decode") or decode(tokens)
    backend.prefill_chunk_step = lambda part: events.append(("slice", backend.batch_size)) or chunk_step(part)
    deliver = Engine._deliver
    monkeypatch.setattr(Engine, "_deliver", staticmethod(
        lambda items: events.append(("deliver", [item.finish_reason for _, item in items])) or deliver(items)))
    replies = run_batch(backend, [(None, "short one", greedy(3)), (None, TEXT, greedy(3))])
    assert all(text for text, _ in replies)
    end = next(i for i, e in enumerate(events) if e[0] == "deliver" and "length" in e[1])  # the short row's end
    assert events[end - 1] == "decode"  # right after its last step, before any slice
    later = [e for e in events[end:] if e[0] == "slice"]
    assert later and later[0][1] == 0  # the prompt's next slice, with nothing decoding


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_layer_the_budget_does_not_fit_runs_in_row_blocks(arch, monkeypatch):
    """With SPLIT_LAYERS, a slice left less than a layer runs that layer's next rows (the first chunk's
    causal mask built, a later chunk's cut from its own):
    the cache and the logits are one forward per chunk's to rounding, and so are the next
    decode steps' tokens. A layer that fits runs whole."""
    import engine.sliced_prefill
    from engine.sliced_prefill import CUT_STEP, ROW_STEP

    monkeypatch.setattr(engine.sliced_prefill, "SPLIT_LAYERS", True)  # off by default
    model, tokenizer = tiny_llama(dtype=torch.float32, arch=arch)
    prompt = EncodedPrompt(tokenizer(TEXT * 3)["input_ids"])
    chunk, n, layers = 3 * CUT_STEP, len(prompt.input_ids), model.config.num_hidden_layers
    assert n > 2 * chunk
    a = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    b = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=chunk)
    sliced = a.sliced
    rate = 1e9  # planned at a fixed rate, with a budget of one block and a bit: one block a call
    monkeypatch.setattr(sliced, "_rate", lambda first=True, boundary=False: rate)
    sliced._rates.extend([rate] * 8)
    part = a.begin_prefill(prompt)
    seen = []
    logits = None
    while logits is None:
        start = part.done + (part.sliced.row if part.sliced is not None else 0)
        budget = sliced.layer_macs(ROW_STEP, start) * 1.01 / rate
        before = (part.done, part.sliced.layer if part.sliced else 0, part.sliced.row if part.sliced else 0)
        logits = sliced.advance(part, chunk, budget, budget * 1e3)  # chunks whole: cut at 1,000 blocks
        seen.append(before)
    a._finish_part(part)
    blocks = chunk // ROW_STEP
    assert {row for _, _, row in seen} == {i * ROW_STEP for i in range(blocks)}  # every layer in blocks
    # each whole chunk's layers a block a call (the last chunk's few rows may share one)
    assert sum(done < n // chunk * chunk for done, _, _ in seen) == (n // chunk) * layers * blocks
    whole, _ = prefill_parts(b, prompt, False)
    assert_same_to_rounding(a, b, logits, whole, 1e-4)
    # A budget that fits the whole layer runs it whole, as before.
    part = a.begin_prefill(EncodedPrompt(tokenizer(TEXT[::-1] * 3)["input_ids"]))  # not a cached prefix
    assert part.done == 0
    runs = []
    run_rows = sliced._run_rows
    monkeypatch.setattr(sliced, "_run_rows", lambda part, c, rows: runs.append(rows) or run_rows(part, c, rows))
    assert sliced.advance(part, chunk, sliced.layer_macs(chunk, 0) * 1.2 / rate, 1e3) is None
    assert runs[0] == chunk
