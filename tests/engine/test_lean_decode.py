"""The lean Llama decode step (engine/lean_decode.py) against transformers' own forward: bitwise
the same logits, step after step, for Llama and Qwen2 (q/k/v biases), for one row, for left-padded rows (the int4 kernel, with
q/k/v and gate/up fused), for a batch past the int4 kernel's rows (dense weights), through rows
leaving and joining; and greedy replies through the engine identical with it on and off.

The models are a tiny Llama and Qwen2 with random weights built here (real transformers model code).
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from core.types import CancelToken, GenerationParams
from engine.backend import BatchBackend, EncodedPrompt
from engine.engine import Engine
from engine.lean_decode import LeanDecoder, lean_supported
from engine.quant import GEMV_ROWS, quantize_int4_weight_only, quantize_int8_weight_only

pytestmark = pytest.mark.timeout(120)


def tiny_llama(dtype=torch.bfloat16, attn="sdpa", arch="llama", **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from scripts.make_tiny_models import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation=attn, dtype=dtype).eval()
    return model, tokenizer


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def int4_llama(request):
    model, tokenizer = tiny_llama(arch=request.param)  # qwen2: q/k/v with biases
    counts = quantize_int4_weight_only(model)
    assert counts["int4"] == 3 * 7
    return model, tokenizer


def prompts(tokenizer, n: int) -> list[EncodedPrompt]:
    texts = ["hello there", "a much longer prompt about the weather and the sea", "x",
             "one two three four five six", "the quick brown fox", "zebra", "what is seven times six"]
    return [EncodedPrompt(tokenizer(texts[i % len(texts)])["input_ids"]) for i in range(n)]


def decode_run(model, tokenizer, rows: int, lean: bool, steps: int = 6, leave_at: int = 3, join: bool = True,
               native: bool = False, packed_decode: object = "auto", ragged_decode: bool = False):
    """Prefill ``rows`` prompts, decode greedily; halfway drop row 0 and let one prompt join.
    Returns every step's logits. ``native``: the compiled layers (engine/native_step.py) when
    built, else the lean step's Python loop. The compiled step is the masked one, bitwise
    transformers' own, unless ``ragged_decode`` (the engine's default: each row attends to its
    own positions, the same values to rounding)."""
    backend = BatchBackend(model, tokenizer, None, threads=1, lean=lean, native=native, packed_decode=packed_decode,
                           ragged_decode=ragged_decode)
    assert (backend.lean is not None) == lean
    backend.lean_rows = 64  # the lean step's dense path too (the engine uses it up to GEMV_ROWS rows)
    tokens = backend.prefill(prompts(tokenizer, rows)).argmax(-1).tolist()
    seen = []
    for step in range(steps):
        if step == leave_at and rows > 1:
            backend.keep(list(range(1, len(tokens))))
            tokens = tokens[1:]
        if step == leave_at + 1 and join:
            joined = backend.prefill([EncodedPrompt(tokenizer("late arrival")["input_ids"])])
            tokens = tokens + joined.argmax(-1).tolist()
        logits = backend.decode(tokens)
        seen.append(logits.clone())
        tokens = logits.argmax(-1).tolist()
    backend.keep([])
    return seen


@pytest.mark.parametrize("rows", [1, 3, GEMV_ROWS + 2])
def test_lean_logits_are_bitwise_the_models(int4_llama, rows):
    model, tokenizer = int4_llama
    ours, theirs = decode_run(model, tokenizer, rows, True), decode_run(model, tokenizer, rows, False)
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)


def test_lean_without_quantization_and_in_float32():
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = tiny_llama(dtype=dtype)
        for a, b in zip(decode_run(model, tokenizer, 2, True), decode_run(model, tokenizer, 2, False)):
            assert torch.equal(a, b)


def test_lean_with_the_int8_head_and_layers():
    model, tokenizer = tiny_llama()
    quantize_int8_weight_only(model, torch.bfloat16)
    for a, b in zip(decode_run(model, tokenizer, 2, True), decode_run(model, tokenizer, 2, False)):
        assert torch.equal(a, b)


def test_fused_projections_only_where_every_part_is_int4(int4_llama):
    model, _ = int4_llama
    lean = LeanDecoder(model)
    assert all(f is not None for f in lean.fused_qkv + lean.fused_up)
    # The fused copies are the model's (non-persistent) buffers: counted in its memory, shared
    # by every backend over it, and not in its state dict.
    names = {n for n, _ in model.named_buffers()}
    assert "model.layers.0.self_attn.lean_int4" in names and "model.layers.0.mlp.lean_int4" in names
    assert not any("lean_" in k for k in model.state_dict())
    again = LeanDecoder(model)
    assert again.fused_qkv[0].owner.lean_int4.data_ptr() == lean.fused_qkv[0].owner.lean_int4.data_ptr()
    plain, _ = tiny_llama()
    lean = LeanDecoder(plain)
    assert all(f is None for f in lean.fused_qkv + lean.fused_up)


def test_models_it_does_not_reproduce_run_transformers_forward():
    eager, tokenizer = tiny_llama(attn="eager")
    assert not lean_supported(eager)
    scaled, _ = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert not lean_supported(scaled)
    assert BatchBackend(eager, tokenizer, None, threads=1).lean is None
    windowed, _ = tiny_llama(arch="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert not lean_supported(windowed)  # sliding-window layers: transformers' forward
    assert lean_supported(tiny_llama(arch="qwen2")[0])


def test_without_the_compiled_layers_the_lean_step_takes_a_few_rows_only(int4_llama, monkeypatch):
    model, tokenizer = int4_llama
    backend = BatchBackend(model, tokenizer, None, threads=1, native=False)
    calls = []
    step = LeanDecoder.__call__
    monkeypatch.setattr(LeanDecoder, "__call__", lambda self, *a: calls.append(a[0].shape[0]) or step(self, *a))
    for rows in (1, GEMV_ROWS, GEMV_ROWS + 1):
        tokens = backend.prefill(prompts(tokenizer, rows)).argmax(-1).tolist()
        backend.decode(tokens)
        backend.keep([])
    assert calls == [1, GEMV_ROWS]


def engine_replies(model, tokenizer, rows: int, new_tokens: int, **backend_kw) -> list[str]:
    """Greedy replies to ``rows`` prompts admitted together through the engine."""
    encoded = prompts(tokenizer, rows)

    async def run() -> list[str]:
        engine = Engine(BatchBackend(model, tokenizer, None, threads=1, **backend_kw), name="lean")
        params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        handles = [engine.submit(p, params, CancelToken()) for p in encoded]
        engine.start()
        try:
            return ["".join([d.text async for d in h]) for h in handles]
        finally:
            await asyncio.to_thread(engine.stop, 10.0)

    return asyncio.run(run())


def test_engine_replies_identical_with_and_without_lean(int4_llama):
    model, tokenizer = int4_llama
    on = engine_replies(model, tokenizer, 4, 12, lean=True, native=False)
    off = engine_replies(model, tokenizer, 4, 12, lean=False)
    assert on == off and all(on)
