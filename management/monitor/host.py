"""The machine's figures through psutil: CPU, memory, and the disk that holds the data directory."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from management.events import SystemFigures

MIN_CPU_WINDOW_S = 0.5  # a read sooner than this after the last one repeats its CPU figure


class HostReader:
    """CPU percent is measured between two reads (the sampler's and the status route's alike), from
    the reader's own counters, not psutil's process-global ones."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._last_times = psutil.cpu_times()
        self._last_at = time.monotonic()
        self._cpu = 0.0

    def cpu_percent(self) -> float:
        with self._lock:
            now = time.monotonic()
            if now - self._last_at < MIN_CPU_WINDOW_S:
                return self._cpu
            times = psutil.cpu_times()
            total = sum(times) - sum(self._last_times)
            idle = (times.idle + getattr(times, "iowait", 0.0)) - (self._last_times.idle
                                                                   + getattr(self._last_times, "iowait", 0.0))
            self._cpu = round(max(0.0, min(100.0, 100.0 * (1 - idle / total))) if total > 0 else 0.0, 1)
            self._last_times, self._last_at = times, now
            return self._cpu

    def read(self) -> SystemFigures:
        mem = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self._existing(self.data_dir)))
        return SystemFigures(cpu_percent=self.cpu_percent(), memory_percent=round(mem.percent, 1),
                             disk_percent=round(disk.percent, 1), memory_used_bytes=int(mem.total - mem.available),
                             memory_total_bytes=int(mem.total))

    @staticmethod
    def _existing(path: Path) -> Path:
        path = path.resolve()
        while not path.exists() and path != path.parent:
            path = path.parent
        return path
