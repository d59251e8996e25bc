"""Precision per model: every precision this machine runs loads the tiny causal LM and
generates through the engine; a precision the device cannot run is refused at load with a
clear message (the CPU's feature flags are the input that decides, so they are what the
refusal tests vary)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core.errors import ModelLoadFailed
from models import precision as precision_mod
from models.adapter import ModelSpec
from models.precision import cpu_has_bf16, resolve_precision
from tests.engine.test_engine import PROMPTS, greedy, run_batch

pytestmark = pytest.mark.timeout(180)


def spec(path=None, **kw) -> ModelSpec:
    return ModelSpec(id="m", name="m", kind="causal_lm", path=path, device="cpu", **kw)


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU feature flags precision resolution sees."""
    def set_flags(*names: str) -> None:
        monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset(names))
    return set_flags


def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_without(flags):
    flags("avx512f", "avx512_bf16")
    assert resolve_precision(spec()).dtype == torch.bfloat16
    flags("avx2", "amx_bf16")
    assert resolve_precision(spec()).dtype == torch.bfloat16
    flags("avx2")
    p = resolve_precision(spec())
    assert (p.dtype, p.quantization, p.label) == (torch.float32, "none", "float32")


def test_auto_keeps_toy_checkpoints_at_fp32_on_the_cpu(flags, tiny_models_dir, tmp_path):
    flags("avx512_bf16")
    assert resolve_precision(spec(tiny_models_dir / "qwen2_5_0_5b")).dtype == torch.float32
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:
        f.truncate(precision_mod.TOY_WEIGHT_BYTES + 1)  # sparse: the size is what is read
    assert resolve_precision(spec(big)).dtype == torch.bfloat16


def test_auto_quantization_on_the_cpu_is_lossless_int4_for_gguf_weights_only(flags, tmp_path):
    """The int8 CPU kernel loses at batch 16 (docs/BENCHMARKS.md): auto never picks it on the CPU;
    GGUF weights get the lossless int4 copy (dense kept for big batches), other weights nothing."""
    flags("avx512_bf16")
    p = resolve_precision(spec(tmp_path / "m.gguf"))
    assert (p.label, p.lossless) == ("bfloat16+int4_weight_only", True)
    assert resolve_precision(spec(tmp_path), gguf=True).label == "bfloat16+int4_weight_only"
    assert resolve_precision(spec(tmp_path)).label == "bfloat16"
    assert resolve_precision(spec(tmp_path / "m.gguf", quantization="none")).quantization == "none"
    p = resolve_precision(spec(tmp_path), quantization="int4_weight_only")
    assert (p.label, p.lossless) == ("bfloat16+int4_weight_only", False)
    p = resolve_precision(spec(tmp_path), quantization="int8_weight_only")
    assert p.label == "bfloat16+int8_weight_only"


@pytest.mark.parametrize("kw, flag_set, message", [
    ({"dtype": "bfloat16"}, ("avx2",), "bfloat16 is not supported on this CPU"),
    ({"dtype": "float16"}, ("avx2", "avx512_bf16"), "float16 needs a GPU or a CPU with avx512_fp16"),
    ({"dtype": "float16", "quantization": "int8_weight_only"}, ("avx512_fp16",), "not float16"),
    ({"quantization": "int4_weight_only", "dtype": "float16"}, ("avx512_fp16",), "not float16"),
    ({"quantization": "int2"}, ("avx512_bf16",), "unknown quantization 'int2'"),
])
def test_a_precision_the_device_cannot_run_is_refused(flags, kw, flag_set, message):
    flags(*flag_set)
    with pytest.raises(ModelLoadFailed, match=message):
        resolve_precision(spec(**kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ModelLoadFailed, match="CUDA requested but not available"):
        resolve_precision(dataclasses.replace(spec(), device="cuda"))


def test_refused_precision_fails_the_adapter_load_cleanly(flags, tiny_models_dir):
    from llm.causal import CausalLMAdapter

    flags("avx2")
    adapter = CausalLMAdapter(spec(tiny_models_dir / "qwen2_5_0_5b", dtype="bfloat16"))
    with pytest.raises(ModelLoadFailed, match="bfloat16 is not supported"):
        adapter.load()
    assert adapter.model is None


def runnable() -> list[tuple[str, str]]:
    out = [("float32", "none"), ("float32", "int8_weight_only"), ("float32", "int4_weight_only")]
    if cpu_has_bf16():
        out += [("bfloat16", "none"), ("bfloat16", "int8_weight_only"), ("bfloat16", "int4_weight_only")]
    if "avx512_fp16" in precision_mod.cpu_flags():
        out.append(("float16", "none"))
    return out


@pytest.mark.parametrize("dtype, quantization", runnable())
def test_each_precision_loads_and_generates_alone_and_batched(tiny_models_dir, dtype, quantization):
    from engine.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear
    from llm.causal import CausalLMAdapter

    adapter = CausalLMAdapter(spec(tiny_models_dir / "qwen2_5_0_5b", dtype=dtype, quantization=quantization))
    adapter.load()
    try:
        assert adapter.model.dtype == getattr(torch, dtype)
        int8 = [m for m in adapter.model.modules() if isinstance(m, Int8WeightOnlyLinear)]
        int4 = [m for m in adapter.model.modules() if isinstance(m, Int4WeightOnlyLinear)]
        assert bool(int8) == (quantization != "none")  # int4 mode: the output head is int8
        assert bool(int4) == (quantization == "int4_weight_only")
        if int8:
            assert all(m.weight_int8.dtype == torch.int8 for m in int8)
        params = greedy(6)
        # 5 prompts together: more rows than the int8 kernel's GEMV limit, so both paths run.
        batch = run_batch(adapter.engine_backend(), [(m, p, params) for m, p in PROMPTS[:5]])
        solo = run_batch(adapter.engine_backend(), [(PROMPTS[0][0], PROMPTS[0][1], params)])
        for text, handle in batch + solo:
            assert handle.finish_reason == "length" and handle.usage.completion_tokens == 6
            assert text.strip()
    finally:
        adapter.unload()


def test_int8_weight_only_linear_matches_the_dequantized_weights():
    from engine.quant import GEMV_ROWS, Int8WeightOnlyLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    q = Int8WeightOnlyLinear(linear, torch.float32)
    dequant = q.weight_int8.float() * q.scales[:, None]
    assert (dequant - linear.weight).abs().max() <= q.scales.max() / 2 + 1e-6  # rounding, nothing more
    for rows in (1, GEMV_ROWS, GEMV_ROWS + 3):  # the int8 kernel and the dequantized GEMM
        x = torch.randn(rows, 64)
        torch.testing.assert_close(q(x), x @ dequant.t() + linear.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if cpu_has_bf16() else [torch.float32])
def test_int4_linear_matches_its_dequantized_weights_and_keeps_the_dense_path(dtype):
    from engine.quant import GEMV_ROWS, INT4_GROUP, Int4WeightOnlyLinear, int4_pack, small_rows

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96).to(dtype)
    packed, scales_zeros, error = int4_pack(linear.weight)
    assert 0 < error < 0.2
    q = Int4WeightOnlyLinear(linear, packed, scales_zeros)
    # The int4 copy's own dequantization: minimum + step * q per group of 32 inputs.
    w = linear.weight.float().reshape(96, -1, INT4_GROUP)
    low, step = w.amin(-1, keepdim=True), (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
    dequant = (low + ((w - low) / step).round() * step).reshape(96, 128)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    # The int4 kernel for a few rows (fp32: the compiled one, once loaded; engine/quant.small_rows).
    few = small_rows(dtype)
    for rows in sorted({1, few} - {0}):
        x = torch.randn(rows, 128, dtype=dtype)
        torch.testing.assert_close(q(x).float(), x.float() @ dequant.t() + linear.bias.float(), rtol=tol, atol=tol)
    x = torch.randn(max(few, GEMV_ROWS) + 3, 128, dtype=dtype)  # many rows: the dense weight, exactly
    torch.testing.assert_close(q(x), linear(x))


def test_lossless_int4_takes_only_layers_already_at_4_bits():
    """A layer whose weights sit on a 4-bit grid per group (a GGUF Q4 file's) is recovered to the
    dtype's rounding and goes int4; one with more levels stays dense in lossless mode."""
    from engine.quant import INT4_GROUP, Int4WeightOnlyLinear, quantize_int4_weight_only

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 32))
    with torch.no_grad():
        w = torch.randn(32, 64).reshape(32, -1, INT4_GROUP)
        low, step = w.amin(-1, keepdim=True), (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
        model[0].weight.copy_((low + ((w - low) / step).round() * step).reshape(32, 64))
    counts = quantize_int4_weight_only(model, lossless=True)
    assert counts == {"int4": 1, "int8": 0, "dense": 1}
    assert isinstance(model[0], Int4WeightOnlyLinear) and type(model[1]) is torch.nn.Linear
    x = torch.randn(2, 64)
    torch.testing.assert_close(model[0](x), torch.nn.functional.linear(x, model[0].weight, model[0].bias),
                               rtol=1e-4, atol=1e-4)
