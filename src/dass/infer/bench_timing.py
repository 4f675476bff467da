"""Timing helpers of ``dass bench``: CUDA-event loops (eager) and CUDA-graph replays.

"eager" numbers are what a caller gets calling a function in ordinary Python (host overhead
included when the GPU waits for it); "graph" numbers replay the same loop from a CUDA graph
(GPU time alone). Each loop cycles over enough copies of the weights that they cannot stay
in the L2 cache between calls.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any, Callable

import torch

from dass.infer.kernels.capture import graph_capture

MIN_SET_BYTES = 200 * 2**20  # weights cycled per loop, > L2

__all__ = ["Timer", "safe", "prune24", "ncopies"]


class Timer:
    def __init__(self, device: str, target_ms: float = 25.0, reps: int = 7, max_inner: int = 64):
        self.cuda = device == "cuda"
        self.target_ms, self.reps, self.max_inner = target_ms, reps, max_inner

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _loop_ms(self, body: Callable[[], None]) -> float:
        if not self.cuda:
            t = time.perf_counter()
            body()
            return (time.perf_counter() - t) * 1e3
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._sync()
        s.record()
        body()
        e.record()
        e.synchronize()
        return s.elapsed_time(e)

    def eager(self, fn: Callable[[int], Any], ncopies: int = 1) -> float:
        """Median ms per call of fn(i) called back to back (i cycles over the copies)."""
        for i in range(max(2, ncopies)):
            fn(i)
        self._sync()
        probe = self._loop_ms(lambda: [fn(i) for i in range(ncopies)]) / ncopies
        inner = int(min(self.max_inner, max(ncopies, math.ceil(self.target_ms / max(probe, 1e-3)))))
        times = [self._loop_ms(lambda: [fn(i) for i in range(inner)]) / inner for _ in range(self.reps)]
        return statistics.median(times)

    def graph(self, fn: Callable[[int], Any], ncopies: int = 1) -> float | None:
        """Median ms per call, replaying a CUDA graph of the loop (None without CUDA)."""
        if not self.cuda:
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(max(2, ncopies)):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        self._sync()
        probe = self._loop_ms(lambda: [fn(i) for i in range(ncopies)]) / ncopies
        inner = int(min(self.max_inner, max(ncopies, math.ceil(self.target_ms / max(probe, 1e-3)))))
        g = torch.cuda.CUDAGraph()
        with graph_capture(g):
            for i in range(inner):
                fn(i)
        g.replay()
        self._sync()
        times = [self._loop_ms(g.replay) / inner for _ in range(self.reps)]
        del g
        return statistics.median(times)


def safe(f: Callable[[], float | None], errors: list, what: str) -> float | None:
    try:
        return f()
    except Exception as e:  # a failing variant must not kill the whole benchmark
        errors.append(f"{what}: {type(e).__name__}: {e}")
        print(f"  !! {what}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
        return None


def prune24(W: torch.Tensor, orientation: str) -> torch.Tensor:
    """Magnitude 2:4 (the 2 largest |w| of each group of 4 along ``orientation``)."""
    N, K = W.shape
    if orientation == "input":
        g = W.reshape(N, K // 4, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
    else:
        g = W.reshape(N // 4, 4, K)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.abs().topk(2, dim=1).indices, True)
    return W * keep.view(N, K)


def ncopies(nbytes: int) -> int:
    return min(8, max(2, math.ceil(MIN_SET_BYTES / max(nbytes, 1))))
