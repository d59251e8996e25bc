"""Weight-only quantization of a loaded model's linear layers, on torch's own kernels.

Two modes:
- ``int8_weight_only``: every weight int8 per output channel; no dense copy is kept.
- ``int4_weight_only`` (CPU): every weight int4 per group of 32 inputs with a scale and a
  minimum per group, which is GGUF Q4_1's own layout, so weights read from a Q4 GGUF file are
  recovered exactly (to the dtype's rounding of the scales). Decoding a few rows (a small batch)
  runs ATen's int4 kernel, a quarter of bf16's bytes per step (with fp32 activations, for
  which ATen's kernel is scalar, the one compiled with the decode step: ``small_rows``); many
  rows (prefill, a big batch) run the dense weight, which is kept: the memory is dense + 1/4,
  and the step never gets slower than bf16 (docs/BENCHMARKS.md). The output head keeps its dense weight (tied to the
  embeddings in small models, so it costs nothing) and decodes through the int8 kernel.

Decoding reads every weight once per step, so the bytes per weight set the step time once the
Python overhead is gone. int8 weight-only keeps activations in the model's dtype and stores
each ``nn.Linear`` weight as int8 with one scale per output channel (symmetric, absmax / 127).
The matmul is ``torch._weight_int8pack_mm`` (ATen's CPU kernel, also on CUDA), which dequantizes
inside the kernel: no fp copy of the weights exists at run time.

torchao's ``Int8WeightOnlyConfig`` was measured against this on the same model (see
docs/BENCHMARKS.md); it wraps the same idea in a tensor subclass and was no faster here, so the
dependency is not taken.
"""
from __future__ import annotations

import torch
from torch import nn

from engine import native_step

QUANTIZATIONS = ("none", "int8_weight_only", "int4_weight_only")
INT4_GROUP = 32
# A layer whose int4 copy differs from its weights by more than this (relative Frobenius norm)
# was not stored at 4 bits: the lossless mode (``auto`` on GGUF Q4 weights) keeps it dense.
LOSSLESS_INT4_ERROR = 0.01
# Rows up to which the int8 kernel beats dequantize + GEMM (measured: scripts/bench_precision.py).
GEMV_ROWS = 4


# Rows up to which the compiled fp32 kernels (engine/native_step.cpp) beat the dense fp32 GEMM:
# they read a quarter (int8) or an eighth (int4) of its bytes, and on an avx2 CPU without bf16
# the dense GEMM of a few to a few dozen rows is far from the memory's speed (docs/BENCHMARKS.md).
FP32_KERNEL_ROWS = 64


def small_rows(dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """Rows up to which the int4 and int8 copies are read (past them, the dense weight where it
    is kept): GEMV_ROWS for ATen's kernels (bf16, CUDA). For fp32 activations on the CPU ATen's
    kernels are scalar, 5-10x slower than the dense GEMM (measured on an avx2 CPU), so the
    compiled ones run instead, up to FP32_KERNEL_ROWS, once loaded
    (engine/native_step.fast_kernels); until then, or without them, 0: the dense weight."""
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        return FP32_KERNEL_ROWS if native_step.fast_kernels() else 0
    return GEMV_ROWS


def int8_kernel_available(device: torch.device | str) -> bool:
    """Whether ATen has the int8 weight-only matmul for this device type."""
    kind = torch.device(device).type
    return kind in ("cpu", "cuda") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_kernel_available(device: torch.device | str) -> bool:
    """Whether ATen has the int4 weight-only matmul with this packing (the CPU one)."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int8WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8 per output channel; activations keep their dtype."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, keep_dense: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # With the dense weight kept (int4 mode's output head), many rows run a plain GEMM.
        self.dense = linear.weight if keep_dense else None
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        # Buffers, not parameters: nothing here is trainable, and memory accounting still counts them.
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.dtype != self.scales.dtype:
            flat = flat.to(self.scales.dtype)
        rows = flat.shape[0]
        # Without a dense copy, ATen's kernel still takes a few rows (no fp copy of the weights).
        few = small_rows(flat.dtype, flat.device)
        limit = few if self.dense is not None else max(GEMV_ROWS, few)
        if rows <= limit:
            out = native_step.int8_mm(flat, self.weight_int8, self.scales)
        elif self.dense is not None:
            out = flat @ self.dense.t()
        else:
            # ATen's CPU kernel walks the weights once per few rows: past a handful of rows
            # (a batch of decodes, a prefill) one dequantized copy and a GEMM read fewer bytes.
            out = flat @ (self.weight_int8.to(flat.dtype) * self.scales[:, None]).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8_weight_only(model: nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> int:
    """Swap every nn.Linear of ``model`` (except names containing one of ``skip``) in place;
    return how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(s in full for s in skip):
                setattr(module, child_name, Int8WeightOnlyLinear(child, dtype))
                swapped += 1
    return swapped


class Int4WeightOnlyLinear(nn.Module):
    """A Linear with an int4 copy of its weight (groups of 32 inputs, scale and minimum each) for
    matmuls of a few rows, and its dense weight for the rest."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor, scales_zeros: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: shared with whatever it was tied to
        self.bias = linear.bias
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_zeros", scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= small_rows(self.weight.dtype):
            out = native_step.int4_mm(flat.to(self.weight.dtype), self.weight_int4, INT4_GROUP, self.scales_zeros)
            if self.bias is not None:
                out = out + self.bias
        else:
            out = nn.functional.linear(flat, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only (+dense)"


def int4_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(packed int4 weight, scales and zeros, relative error of the int4 copy) of a (out, in) weight."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((w - low) / scale).round().clamp(0, 15)
    error = float((low + q * scale - w).norm() / w.norm().clamp(min=1e-12))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(n, k), 1)
    # The kernel computes (q - 8) * scale + zero: zero is the group's minimum plus 8 steps.
    scales_zeros = torch.stack([scale.squeeze(-1).t(), (low + 8 * scale).squeeze(-1).t()], -1)
    return packed, scales_zeros.to(weight.dtype).contiguous(), error


def quantize_int4_weight_only(model: nn.Module, *, lossless: bool = False,
                              head: tuple[str, ...] = ("lm_head",)) -> dict[str, int]:
    """Give every nn.Linear of ``model`` an int4 copy, in place; the output head (names containing
    one of ``head``) gets an int8 one. ``lossless``: layers whose weights were not already at
    4 bits (their int4 copy differs by more than LOSSLESS_INT4_ERROR) stay as they are.
    Returns how many layers went int4, int8, and stayed dense."""
    counts = {"int4": 0, "int8": 0, "dense": 0}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if any(h in full for h in head):
                setattr(module, child_name, Int8WeightOnlyLinear(child, child.weight.dtype, keep_dense=True))
                counts["int8"] += 1
                continue
            if child.in_features % INT4_GROUP:
                counts["dense"] += 1
                continue
            packed, scales_zeros, error = int4_pack(child.weight)
            if lossless and error > LOSSLESS_INT4_ERROR:
                counts["dense"] += 1
                continue
            setattr(module, child_name, Int4WeightOnlyLinear(child, packed, scales_zeros))
            counts["int4"] += 1
    return counts
