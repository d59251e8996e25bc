"""Which precision a model runs at: the device, the dtype of its activations and weights, and
an optional weight-only quantization, resolved from the registry entry and what the device
can run. A precision the device cannot run is a clear load error, never a crash mid-request.

    dtype: auto | float32 | bfloat16 | float16
    quantization: auto | none | int8_weight_only | int4_weight_only

``auto`` dtype is bf16 on CUDA (when the GPU has bf16) and on CPUs with native bf16 dot
products (avx512_bf16 or AMX), else fp32; toy-size checkpoints (under TOY_WEIGHT_BYTES on disk,
the tests' and benchmarks' tiny models) stay fp32 on the CPU: their steps are bound by per-op
overhead, which bf16's casts only add to.

``auto`` quantization is the smallest precision that keeps quality *and* does not slow the
batch, for weights that came from a GGUF file (already quantized):
- on a GPU, int8 weight-only (per channel, it loses nothing measurable: docs/BENCHMARKS.md);
- on the CPU, lossless int4 weight-only (engine/quant.py): the layers the file held at 4 bits
  get an exact int4 copy for small-batch decoding and keep their dense weight for big batches
  and prefill, so no batch size gets slower; layers stored at more bits stay dense.
``int8_weight_only`` alone loses 3-4x at batch 16 on the CPU (ATen's int8 kernel walks the
weights per few rows): set it for a latency-bound, one-user CPU server. Everything else: none.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelLoadFailed
from models.adapter import ModelSpec

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int8_weight_only", "int4_weight_only")
# What `auto` quantization picks for GGUF-sourced weights on a GPU (the smallest precision that
# kept the quality guard of docs/BENCHMARKS.md).
GGUF_QUANTIZATION = "int8_weight_only"
TOY_WEIGHT_BYTES = 20 * 2**20  # ~5M fp32 parameters, as engine/backend.py's TOY_MODEL_PARAMS


@dataclass(frozen=True)
class Precision:
    device: str
    dtype: object  # torch.dtype
    quantization: str  # "none" | "int8_weight_only" | "int4_weight_only"
    attn: str
    lossless: bool = False  # int4: only the layers already stored at 4 bits (auto on GGUF weights)

    @property
    def label(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return name if self.quantization == "none" else f"{name}+{self.quantization}"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16() -> bool:
    """Native bf16 dot products: without them bf16 matmuls are emulated and slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def weight_bytes(spec: ModelSpec) -> int | None:
    """Bytes of the checkpoint's weight files on disk (None: not a folder of them)."""
    if spec.path is None or not Path(spec.path).is_dir():
        return None
    files = [f for pattern in ("*.safetensors", "*.bin") for f in Path(spec.path).glob(pattern)]
    return sum(f.stat().st_size for f in files) if files else None


def from_gguf(spec: ModelSpec) -> bool:
    """Whether the entry's weights come from a GGUF file (the path names one, or a folder of one)."""
    from models.gguf import gguf_file

    return gguf_file(Path(spec.path) if spec.path is not None else None) is not None or \
        bool(spec.options.get("from_gguf"))


def resolve_precision(spec: ModelSpec, *, quantization: str | None = None, gguf: bool | None = None) -> Precision:
    """The precision ``spec`` loads at on this machine. ``quantization`` overrides the entry's
    (a load request's choice); ``gguf`` overrides the GGUF detection. Imports torch."""
    import torch

    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise ModelLoadFailed(f"model '{spec.id}': CUDA requested but not available")
    bf16_ok = torch.cuda.is_bf16_supported() if on_cuda else cpu_has_bf16()
    if spec.dtype == "auto":
        dtype = torch.bfloat16 if bf16_ok else (torch.float16 if on_cuda else torch.float32)
        size = None if on_cuda else weight_bytes(spec)
        if size is not None and size < TOY_WEIGHT_BYTES:
            dtype = torch.float32
    elif spec.dtype in DTYPES:
        dtype = getattr(torch, spec.dtype)
    else:
        raise ModelLoadFailed(f"model '{spec.id}': unknown dtype '{spec.dtype}' (one of {', '.join(DTYPES)})")
    if dtype == torch.bfloat16 and not bf16_ok:
        where = "this GPU" if on_cuda else "this CPU (no avx512_bf16 or AMX)"
        raise ModelLoadFailed(f"model '{spec.id}': bfloat16 is not supported on {where}; use dtype float32 or auto")
    if dtype == torch.float16 and not on_cuda and "avx512_fp16" not in cpu_flags():
        raise ModelLoadFailed(f"model '{spec.id}': float16 needs a GPU or a CPU with avx512_fp16; "
                              "use dtype auto, bfloat16 or float32")

    quant = quantization if quantization is not None else getattr(spec, "quantization", "none")
    lossless = False
    if quant == "auto":
        quant = "none"
        if from_gguf(spec) if gguf is None else gguf:
            from engine.quant import int4_kernel_available

            if on_cuda:
                quant = GGUF_QUANTIZATION
            elif int4_kernel_available(device) and dtype != torch.float16:
                quant, lossless = "int4_weight_only", True
    if quant not in QUANTIZATIONS:
        raise ModelLoadFailed(f"model '{spec.id}': unknown quantization '{quant}' "
                              f"(one of {', '.join(QUANTIZATIONS)})")
    if quant == "int8_weight_only":
        from engine.quant import int8_kernel_available

        if not int8_kernel_available(device):
            raise ModelLoadFailed(f"model '{spec.id}': int8_weight_only has no kernel on {device}")
        if dtype == torch.float16 and not on_cuda:
            raise ModelLoadFailed(f"model '{spec.id}': int8_weight_only on the CPU runs with float32 or "
                                  "bfloat16 activations, not float16")
    if quant == "int4_weight_only":
        from engine.quant import int4_kernel_available

        if not int4_kernel_available(device):
            raise ModelLoadFailed(f"model '{spec.id}': int4_weight_only runs on the CPU only here "
                                  "(use int8_weight_only on a GPU)")
        if dtype == torch.float16:
            raise ModelLoadFailed(f"model '{spec.id}': int4_weight_only runs with float32 or bfloat16 "
                                  "activations, not float16")
    attn = spec.options.get("attn_implementation") or (
        "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa")
    return Precision(device, dtype, quant, attn, lossless)


def apply_quantization(model, precision: Precision) -> None:
    """Quantize the loaded model in place as ``precision`` says (no-op for none)."""
    if precision.quantization == "int8_weight_only":
        from engine.quant import quantize_int8_weight_only

        quantize_int8_weight_only(model, precision.dtype)
    elif precision.quantization == "int4_weight_only":
        from engine.quant import quantize_int4_weight_only

        counts = quantize_int4_weight_only(model, lossless=precision.lossless)
        log.info("int4 weight-only%s: %s", " (lossless)" if precision.lossless else "", counts)
