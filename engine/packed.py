"""Dense weights reordered once into oneDNN's blocked layout, for decode steps of a few rows.

A bf16 ``F.linear`` on the CPU already runs oneDNN, but it reorders the weight into the blocked
layout its kernel reads at every call: for a decode step of 5-64 rows that reorder is a large
part of each matmul. ``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once
(``_reorder_linear_weight``, the layout inductor's freezing uses) skips it: at 16 rows a
135M model's projections and output head take about half the time (docs/BENCHMARKS.md).

The values are those of ``F.linear`` on the plain weight for bf16 at up to PACKED_ROWS rows on
this machine. That is a property of the kernels, not a promise, so it is checked twice:
``available`` once per process on a few layer shapes, and ``pack_checked`` on every weight as it
is packed (a mismatch switches packing off for the model). The logits stay bitwise
transformers' (tests/engine/test_native_step.py). The copy costs the dense weights' memory once
more, so ``auto`` packs models whose dense weights fit in AUTO_LIMIT_BYTES.
"""
from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Rows up to which the packed weight is used (and checked); past this a plain GEMM is as fast.
PACKED_ROWS = 64
# The batch size oneDNN picks the blocked layout for.
PACK_BATCH = 16
# The fewest rows a packed weight serves (the int4 kernel takes up to 4): checked with the others.
GEMV_CHECK_ROWS = 5
# ``auto`` packs a model whose dense projection weights take at most this many bytes.
AUTO_LIMIT_BYTES = 2 << 30

_checked: dict[torch.dtype, bool] = {}
_lock = threading.Lock()


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def available(dtype: torch.dtype) -> bool:
    """Whether packed weights of ``dtype`` give F.linear's values here (checked once)."""
    if dtype != torch.bfloat16:  # fp32 runs MKL's sgemm in F.linear: other values
        return False
    with _lock:
        if dtype not in _checked:
            _checked[dtype] = _check(dtype)
        return _checked[dtype]


def _check(dtype: torch.dtype) -> bool:
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)
        for n, k in ((960, 576), (576, 1536), (1152, 896)):
            w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            packed = pack(w)
            for rows in (1, 5, 16, 33, PACKED_ROWS):
                x = torch.randn(rows, k, generator=gen).to(dtype)
                if not (torch.equal(_linear(x, packed, None), F.linear(x, w))
                        and torch.equal(_linear(x, packed, b), F.linear(x, w, b))):
                    log.info("packed %s weights give other values than F.linear here: not used", dtype)
                    return False
        return True
    except Exception as exc:  # no oneDNN in this build, an op missing: plain weights
        log.info("packed weights are not available: %s", exc)
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) reordered for oneDNN's linear; the values are those of ``weight``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)


class PackMismatch(RuntimeError):
    """A packed weight gave other values than F.linear on its plain weight."""


def pack_checked(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``pack(weight)``, after checking on this very weight that it gives F.linear's values at
    a few row counts up to PACKED_ROWS (raises PackMismatch otherwise)."""
    out = pack(weight)
    gen = torch.Generator().manual_seed(weight.shape[0] * 31 + weight.shape[1])
    for rows in (GEMV_CHECK_ROWS, PACK_BATCH, PACKED_ROWS):
        x = torch.randn(rows, weight.shape[1], generator=gen).to(weight.dtype)
        if not torch.equal(_linear(x, out, bias), F.linear(x, weight, bias)):
            raise PackMismatch(f"packed {tuple(weight.shape)} weight differs from F.linear at {rows} rows")
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) from ``pack(weight)``."""
    return _linear(x, packed, bias)


def wanted(setting: object, dense_bytes: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether to pack: ``setting`` is options.packed_decode: false (never), true (any size), or
    anything else (``auto``: up to AUTO_LIMIT_BYTES of dense weights)."""
    choice = str(setting).strip().lower()
    if choice in ("false", "off", "0", "no"):
        return False
    if device.type != "cpu" or not available(dtype):
        return False
    if choice not in ("true", "on", "1", "yes") and dense_bytes > AUTO_LIMIT_BYTES:
        log.info("not packing %d MB of dense weights (packed_decode: auto packs up to %d MB)",
                 dense_bytes >> 20, AUTO_LIMIT_BYTES >> 20)
        return False
    return True
