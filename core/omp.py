"""OpenMP thread pools: a thread lets its pool go when it has no more torch work for now.

torch's CPU kernels run on libgomp, and every thread that runs a parallel region keeps a pool of
worker threads until it exits. libgomp lets a pool's idle workers spin between parallel regions
(so that the next one starts at once) only while the process has no more of its threads than
CPUs; past that, a worker sleeps in the kernel after ~100 spins and each parallel region must
wake it again. A decode step is a few hundred parallel regions, so one pool left behind by a
model load on an executor thread made every later step of the engine's thread ~25% slower
(SmolLM2-135M at one row on 2 cores: 26,000 context switches per 96 tokens instead of none;
docs/BENCHMARKS.md). Threads that are done with torch work for the moment (a load, a model
runner's last queued job, an engine or vision worker going idle) release their pool here; the
next parallel region on that thread starts a new one (~0.1 ms).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the calling thread's pool, keep the runtime


def _pauses() -> tuple[Callable[[int], int], ...]:
    """omp_pause_resource_all of each libgomp in the process once torch is loaded, none before.

    A process that has not loaded torch (an OCR-only server, the CLI reading images) has no
    torch kernel pool to free, and importing torch here would cost it seconds (~3 s on the first
    OCR request's model load)."""
    if "torch._C" not in sys.modules:  # torch's extension, and with it its libgomp, not loaded yet
        return ()
    return _loaded_pauses()


@functools.lru_cache(maxsize=1)
def _loaded_pauses() -> tuple[Callable[[int], int], ...]:
    """omp_pause_resource_all of each libgomp mapped into the process (torch's, and any other
    copy a library brought), or none without libgomp (another OpenMP runtime, or no /proc)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return ()
    paths = sorted({line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]})
    found = []
    for path in paths:
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all  # the library already loaded, not a new copy
        except (OSError, AttributeError):  # a libgomp older than OpenMP 5.0's pause
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        found.append(fn)
    return tuple(found)


def release_threads() -> None:
    """Free the calling thread's OpenMP pool, if it has one (no other thread's is touched)."""
    for fn in _pauses():
        if fn(OMP_PAUSE_SOFT) != 0:  # inside a parallel region: nothing to do
            log.debug("omp_pause_resource_all refused on this thread")


def released(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` that releases its thread's pool when it returns (for work sent to an executor)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_threads()
    return run
