"""The CPU's threads, shared among the models generating at the same time.

Each engine runs its decode steps on its own thread with torch's CPU kernels, which use as
many threads as the CPU has (or the model's `threads` setting). Two engines decoding at once
then ask for twice the CPU: libgomp stops spinning between parallel regions once the process
has more of its threads than CPUs (core/omp.py), so every region of both engines waits on the
kernel to wake its workers. On 2 cores, two copies of SmolLM2-135M decoding together made
71-79 tokens/s between them at one row each with 2 threads each, 89-90 with 1 each
(docs/BENCHMARKS.md, "Two models decoding at once").

An engine with work holds its usual thread count here and drops it when it goes idle; before
each step it takes its part: all it asks for while it is alone or the busy engines' requests
fit the CPU, otherwise a share in proportion to what it asks for (at least one thread). An
embedding model's forward (a model runner's job, llm/embedding.py) holds its threads the same
way while it runs, and runs on its part. So does a model runner's job for an OCR engine, with
the threads its call keeps busy (ONNX Runtime's, in RapidOCR's worker processes or here;
Tesseract's one; models/runner.py): it cannot be told to use fewer, but the engines beside it
then use fewer.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator


_torch_default: int | None = None
_default_lock = threading.Lock()


def torch_threads_default() -> int:
    """The intra-op thread count torch gives this process's threads before any is set
    (OMP_NUM_THREADS, else torch's own choice), as it was before this process set one.

    ``torch.set_num_threads`` on one thread also becomes the count every thread started later
    begins with, so ``torch.get_num_threads()`` on a new engine's thread returns whatever another
    model last set for itself: a model loaded after two others had shared the CPU (or after a
    toy model's engine) would run on one thread for good. Every setter here goes through
    ``set_torch_threads``, which reads the default first. Imports torch: call it from torch code."""
    global _torch_default
    with _default_lock:
        if _torch_default is None:
            import torch

            _torch_default = torch.get_num_threads()
        return _torch_default


def set_torch_threads(threads: int) -> None:
    """The calling thread's torch kernels run on ``threads`` threads from now on."""
    torch_threads_default()  # read before the first set changes it
    import torch

    torch.set_num_threads(threads)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class CoreShare:
    def __init__(self, cpus: int | None = None) -> None:
        self.cpus = cpus or cpu_count()
        self.enabled = True  # the server setting `share_cpu_threads`
        self._lock = threading.Lock()
        self._asks: dict[int, int] = {}  # id(worker) -> the threads it runs on alone

    def hold(self, worker: object, threads: int) -> None:
        """``worker`` has work and runs on ``threads`` threads when alone."""
        with self._lock:
            self._asks[id(worker)] = max(1, threads)

    def drop(self, worker: object) -> None:
        """``worker`` has no work any more (or stopped): its threads go back to the others."""
        with self._lock:
            self._asks.pop(id(worker), None)

    def threads(self, worker: object, threads: int) -> int:
        """How many of its ``threads`` ``worker`` should use now."""
        with self._lock:
            asked = sum(self._asks.values())
            mine = self._asks.get(id(worker))
            alone = len(self._asks) <= 1
        if not self.enabled or mine is None or alone or asked <= self.cpus:
            return threads  # alone, a model runs on what it is set to, even more threads than CPUs
        return max(1, min(threads, mine * self.cpus // asked))

    @contextmanager
    def holding(self, threads: int) -> Iterator[int]:
        """Hold ``threads`` while one job runs (a holder of its own: jobs of one model may run
        at once); yields how many of them it should use now."""
        holder = object()
        self.hold(holder, threads)
        try:
            yield self.threads(holder, threads)
        finally:
            self.drop(holder)

    @property
    def busy(self) -> int:
        """Workers holding threads now."""
        with self._lock:
            return len(self._asks)


SHARE = CoreShare()
