"""The compiled layers of the lean decode step (engine/native_step.cpp), built at first use.

The C++ source runs the same ATen operations as engine/lean_decode.py's Python loop, so the
logits do not change (tests/engine/test_native_step.py): it removes the interpreter between the
~1,500 operations of a step, and runs ~700 element-wise ones (RMSNorm, RoPE) as loops that round
exactly where they do. It also holds the int4 and int8 weight-only matmuls for fp32
activations (avx2 + fma; ATen's are scalar for fp32), which engine/quant.py's layers use too
(``int4_mm``, ``int8_mm``, ``fast_kernels``). It is built once per source, flags and torch version with torch's own
extension builder (a C++ compiler and ninja are needed; ~40 s on two cores) into
``$CHATVLM_NATIVE_DIR`` (by default ``~/.cache/chatvlm/native``), in a background thread:
until it is ready, or when it cannot be built, the Python loop runs and nothing else changes.
Processes building at once wait for one another on an OS lock that a killed build releases.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_step.cpp")

_lock = threading.Lock()
_state: dict[str, Any] = {"status": "idle", "error": None, "thread": None}
_ready = threading.Event()


# -ffp-contract=off: a multiply and an add in the element-wise loops stay two roundings, as in
# ATen (no fused multiply-add), so the logits stay bitwise. -fopenmp: ATen's parallel_for is an
# OpenMP pragma in its headers, so without it the kernels here would run on one thread (the
# library then shares torch's own libgomp, loaded under the same name). A compiler without
# OpenMP builds it without (BASE_CFLAGS): the same results, the kernels on one thread.
BASE_CFLAGS = ["-O3", "-ffp-contract=off"]
CFLAGS = BASE_CFLAGS + ["-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _library_name(cflags: list[str] | None = None, ldflags: list[str] | None = None) -> str:
    flags = (CFLAGS if cflags is None else cflags) + (LDFLAGS if ldflags is None else ldflags)
    key = SOURCE.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return f"chatvlm_native_{digest}"


def build_dir() -> Path:
    """Where the library is built: $CHATVLM_NATIVE_DIR, else ~/.cache/chatvlm/native."""
    return Path(os.environ.get("CHATVLM_NATIVE_DIR") or Path.home() / ".cache" / "chatvlm" / "native")


def _build() -> None:
    try:
        from torch.utils import cpp_extension

        # ninja from the virtual environment (the `ninja` wheel) when it is not on PATH.
        venv_bin = str(Path(sys.executable).parent)
        if shutil.which("ninja") is None and venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        if shutil.which("ninja") is None:
            raise RuntimeError("ninja is not installed (pip install ninja)")
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError("no C++ compiler (install g++)")
        attempts = [(CFLAGS, LDFLAGS), (BASE_CFLAGS, [])]
        for i, (cflags, ldflags) in enumerate(attempts):
            name = _library_name(cflags, ldflags)
            folder = build_dir() / name
            folder.mkdir(parents=True, exist_ok=True)
            try:
                # Copies: the builder appends torch's own flags to the lists it is given.
                cpp_extension.load(name, [str(SOURCE)], is_python_module=False, verbose=False,
                                   extra_cflags=list(cflags), extra_ldflags=list(ldflags), build_directory=str(folder))
                break
            except Exception as exc:  # noqa: BLE001 - e.g. a compiler without OpenMP: once more without
                if i == len(attempts) - 1:
                    raise
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                log.info("building the native step with OpenMP failed, building it without (its kernels "
                         "then run on one thread): %s", last)
        torch.ops.chatvlm_native.slot_stride()  # registered
        _state["fast_kernels"] = bool(torch.ops.chatvlm_native.fast_kernels())
        _state["status"] = "ready"
        log.info("native decode step: built and loaded")
    except Exception as exc:  # noqa: BLE001 - any failure leaves the Python loop in charge
        _state["status"], _state["error"] = "unavailable", f"{type(exc).__name__}: {exc}"
        log.warning("native decode step unavailable, the Python step runs: %s", _state["error"])
    finally:
        _ready.set()


def start_build() -> None:
    """Build and load the extension in a background thread (once per process)."""
    with _lock:
        if _state["status"] != "idle":
            return
        _state["status"] = "building"
        thread = threading.Thread(target=_build, name="native-step-build", daemon=True)
        _state["thread"] = thread
        thread.start()


def status() -> str:
    """idle | building | ready | unavailable"""
    return _state["status"]


def error() -> str | None:
    return _state["error"]


def wait(timeout: float | None = None) -> bool:
    """Start the build if needed and wait for it; whether the native step is ready."""
    start_build()
    _ready.wait(timeout)
    return _state["status"] == "ready"


def decode_layers(*args: Any) -> torch.Tensor:
    return torch.ops.chatvlm_native.decode_layers(*args)


def argmax_rows(logits: torch.Tensor) -> list[int] | None:
    """``logits.argmax(-1).tolist()`` for a (rows, vocab) bf16 or fp32 CPU matrix, from the
    compiled loop; None when it is not built (or for other inputs): the caller runs ATen's."""
    if _state["status"] != "ready" or logits.device.type != "cpu" or logits.dim() != 2 \
            or logits.dtype not in (torch.bfloat16, torch.float32) or logits.shape[1] == 0:
        return None
    return list(torch.ops.chatvlm_native.argmax_rows(logits.contiguous()))


def fast_kernels() -> bool:
    """Whether the compiled int4 and int8 matmuls for fp32 activations run here (built, on a CPU
    with avx2 and fma): ``int4_mm`` and ``int8_mm`` use them, else ATen's kernels."""
    return _state["status"] == "ready" and bool(_state.get("fast_kernels"))


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """``torch.ops.aten._weight_int4pack_mm_for_cpu`` on the same buffers; for fp32 activations,
    the compiled kernel when ``fast_kernels()`` (ATen's is scalar for them)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and fast_kernels():
        return torch.ops.chatvlm_native.int4_mm(x, packed, group, scales_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``torch.ops.aten._weight_int8pack_mm`` on the same buffers (CPU or CUDA); for fp32
    activations on the CPU, the compiled kernel when ``fast_kernels()``."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and fast_kernels():
        return torch.ops.chatvlm_native.int8_mm(x, weight, scales)
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def slot_stride() -> int:
    return int(torch.ops.chatvlm_native.slot_stride())
