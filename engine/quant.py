"""Weight-only quantization of a loaded model's linear layers, on torch's own kernels.

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

QUANTIZATIONS = ("none", "int8_weight_only")
# Rows up to which the int8 kernel beats dequantize + GEMM (measured: scripts/bench_precision.py).
GEMV_ROWS = 4


def int8_kernel_available(device: torch.device | str) -> bool:
    """Whether ATen has the int8 weight-only matmul for this device type."""
    kind = torch.device(device).type
    return kind in ("cpu", "cuda") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8 per output channel; activations keep their dtype."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
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
        if flat.shape[0] <= GEMV_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
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
