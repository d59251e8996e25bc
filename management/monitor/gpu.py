"""GPU figures through NVIDIA's management library (``nvidia-ml-py``, imported as ``pynvml``), behind
a small reader interface so a fake device can stand in for a shape test.

With no driver (or no GPU) the first read fails once, fast, and every later read answers ``[]`` at
once: never an error, never a wait.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

log = logging.getLogger("chatvlm.monitor")
MB = 2**20


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str | None
    memory_usage: float | None     # MB


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as seed 004's GET /api/system/gpu describes it (memory in MB, power in W)."""

    id: int
    name: str
    driver_version: str | None
    cuda_version: str | None
    utilization: float
    memory_used: float
    memory_total: float
    memory_free: float
    temperature: float | None
    power_usage: float | None
    power_limit: float | None
    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)


class GpuReader(Protocol):
    def read(self) -> list[GpuDevice]:
        """Every GPU now ([] when there is none or no driver). Blocking, but quick."""


class NvmlReader:
    """Reads through ``pynvml`` (or an object with the same functions, for tests)."""

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml
        self._ready = False
        self._failed = False
        self._lock = threading.Lock()
        self._versions: tuple[str | None, str | None] = (None, None)

    @property
    def available(self) -> bool:
        return not self._failed

    def _init(self) -> bool:
        with self._lock:
            if self._ready or self._failed:
                return self._ready
            try:
                if self._nvml is None:
                    import pynvml
                    self._nvml = pynvml
                self._nvml.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - no library, no driver, no device: "no GPU"
                log.info("no NVIDIA GPU figures (%s)", type(exc).__name__)
                self._failed = True
                return False
            self._versions = (_text(_try(self._nvml.nvmlSystemGetDriverVersion)),
                              _cuda(_try(self._nvml.nvmlSystemGetCudaDriverVersion)))
            self._ready = True
            return True

    def read(self) -> list[GpuDevice]:
        if self._failed or not self._init():
            return []
        nv = self._nvml
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception:  # noqa: BLE001 - the driver went away: report no GPU rather than fail
            log.warning("reading the GPU count failed", exc_info=True)
            return []
        devices = []
        for i in range(count):
            try:
                devices.append(self._device(nv, i))
            except Exception:  # noqa: BLE001 - one unreadable GPU does not hide the others
                log.warning("reading GPU %d failed", i, exc_info=True)
        return devices

    def _device(self, nv: Any, index: int) -> GpuDevice:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        util = _try(nv.nvmlDeviceGetUtilizationRates, h)
        temp = _try(nv.nvmlDeviceGetTemperature, h, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
        power = _try(nv.nvmlDeviceGetPowerUsage, h)
        limit = _try(nv.nvmlDeviceGetEnforcedPowerLimit, h)
        procs = _try(nv.nvmlDeviceGetComputeRunningProcesses, h) or []
        return GpuDevice(id=index, name=_text(nv.nvmlDeviceGetName(h)) or f"GPU {index}",
                         driver_version=self._versions[0], cuda_version=self._versions[1],
                         utilization=float(util.gpu) if util is not None else 0.0,
                         memory_used=round(mem.used / MB, 1), memory_total=round(mem.total / MB, 1),
                         memory_free=round(mem.free / MB, 1), temperature=None if temp is None else float(temp),
                         power_usage=None if power is None else round(power / 1000, 1),
                         power_limit=None if limit is None else round(limit / 1000, 1),
                         processes=tuple(_process(p) for p in procs))


def _try(fn, *args):
    """A figure the device does not support (NVMLError_NotSupported, ...) is None, not a failure."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _cuda(v: Any) -> str | None:
    """NVML's CUDA driver version is an int: 12020 -> "12.2"."""
    if not isinstance(v, int) or v <= 0:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def _process(p: Any) -> GpuProcess:
    try:
        name = psutil.Process(p.pid).name()
    except (psutil.Error, OSError):
        name = None
    used = getattr(p, "usedGpuMemory", None)
    return GpuProcess(pid=int(p.pid), name=name, memory_usage=round(used / MB, 1) if isinstance(used, int) else None)
