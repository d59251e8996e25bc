"""Facts about the machine for /health and /models, found without importing torch."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import psutil


def human_bytes(n: int | float | None) -> str | None:
    if n is None:
        return None
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GB"


@functools.lru_cache(maxsize=1)
def _driver_gpu() -> tuple[bool, str | None]:
    """The NVIDIA driver's view: present only where a GPU really is."""
    root = Path("/proc/driver/nvidia/gpus")
    if not root.is_dir():
        return False, None
    for info in sorted(root.glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                return True, line.split(":", 1)[1].strip()
    return False, None


def gpu_info() -> tuple[bool, str | None]:
    """(available, name). Asks torch only when a model has already imported it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return True, torch.cuda.get_device_name(0)
            return False, None
        except Exception:  # noqa: BLE001 - a broken CUDA setup means "no GPU" here
            return False, None
    return _driver_gpu()


def memory_usage() -> str:
    """This process's resident memory over the machine's total, e.g. '0.3GB/23.4GB'."""
    rss = psutil.Process().memory_info().rss
    total = psutil.virtual_memory().total
    return f"{rss / 2**30:.1f}GB/{total / 2**30:.1f}GB"
