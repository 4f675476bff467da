"""Where calibration activations live, and how much memory a run used.

Activations are kept on the compute device when they fit and in pinned host memory
otherwise (``activations="auto" | "device" | "cpu"``); pinned buffers are reused in place
so that moving a batch back and forth costs two asynchronous copies and no allocation.
The RSS helpers are for benchmarks and tests (peak host memory of a run).
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch

ACTIVATION_PLACES = ("auto", "device", "cpu")


def choose_store(device: torch.device, activations: str, nbytes: int, reserve: int = 0) -> torch.device:
    """The device that holds calibration activations between layers.

    ``auto`` keeps them on a CUDA device when ``nbytes`` (all of them) plus ``reserve``
    (the working memory a layer step needs) fit in half of the free memory, else in host
    memory; on a CPU device everything is host memory anyway.
    """
    if activations not in ACTIVATION_PLACES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_PLACES)}, got {activations!r}")
    if activations == "device" or device.type != "cuda":
        return device
    if activations == "cpu":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes + reserve < free * 0.5 else torch.device("cpu")


def to_store(t: torch.Tensor, store: torch.device, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` moved to ``store``. A host store uses pinned memory when ``t`` is on a GPU,
    reusing ``buffer`` (same shape and dtype) when given; the copy is asynchronous."""
    if t.device == store:
        return t
    if store.type == "cpu" and t.device.type == "cuda":
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or buffer.device.type != "cpu" or not buffer.is_pinned():
            buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t, non_blocking=True)
        return buffer
    return t.to(store)


_LIBC = None


def release_host_memory() -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``).

    Without it, glibc keeps the freed chunks of each layer's tensors (its mmap threshold
    rises to 32 MB after the first large free, so later tensors come from the heap) and
    the RSS of a streaming run creeps up by about a layer every few layers."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RSSSampler:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen within
    the ``with`` block (unlike ru_maxrss, which never goes down, so it can measure one
    phase of a long-lived process)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "RSSSampler":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
