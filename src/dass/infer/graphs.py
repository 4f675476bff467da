"""CUDA graphs for the accelerated modules: per-token-bucket capture and replay.

Why: a cuSPARSELt call costs about half a millisecond of host work and a Triton launch tens
of microseconds, while a 2:4 product at a few tokens takes tens of microseconds on the GPU;
replaying a captured graph removes the host work. All graphs of a device share one memory
pool and, per (rows, cols), one static input and one static output buffer: safe because
every call copies its input in, replays, and copies the output out before returning, on
the current stream.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from dass.infer.kernels.capture import graph_capture

__all__ = ["GraphCache", "graph_bucket", "capturing", "clear_graphs", "raw_mode"]

_LOCK = threading.Lock()
_POOLS: dict[int, Any] = {}
_STATIC: dict[tuple, torch.Tensor] = {}
_ALL_CACHES: "weakref.WeakSet[GraphCache]" = weakref.WeakSet()
_CLEAR_HOOKS: list[Callable[[], None]] = []
_TLS = threading.local()


def graph_bucket(T: int) -> int:
    """Token-count bucket a graph is captured for: exact up to 16, then 4 per octave."""
    if T <= 16:
        return T
    step = 1 << (T.bit_length() - 3)  # T in (2^k, 2^(k+1)] -> steps of 2^(k-2)
    return -(-T // step) * step


def _static(device: torch.device, dtype: torch.dtype, rows: int, cols: int, tag: str) -> torch.Tensor:
    key = (device.index, dtype, rows, cols, tag)
    t = _STATIC.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.zeros(rows, cols, dtype=dtype, device=device)
        _STATIC[key] = t
    return t


def _pool(device: torch.device):
    idx = device.index
    if idx not in _POOLS:
        _POOLS[idx] = torch.cuda.graph_pool_handle()
    return _POOLS[idx]


def on_clear(hook: Callable[[], None]) -> None:
    """Call ``hook`` from :func:`clear_graphs` (caches of other modules that hold GPU memory)."""
    _CLEAR_HOOKS.append(hook)


def clear_graphs() -> None:
    """Drop every captured graph and the shared static buffers (frees their memory)."""
    with _LOCK:
        for c in list(_ALL_CACHES):
            c.clear()
        _STATIC.clear()
        _POOLS.clear()
        for hook in _CLEAR_HOOKS:
            hook()


class raw_mode:
    """Context in which modules run their plain paths (while a graph warms up or captures)."""

    def __enter__(self):
        _TLS.raw = getattr(_TLS, "raw", 0) + 1

    def __exit__(self, *exc):
        _TLS.raw -= 1


def capturing() -> bool:
    """True while a graph is being captured, or while a whole-MLP graph warms up (then the
    modules inside must run their plain paths, not replay graphs of their own)."""
    if getattr(_TLS, "raw", 0):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class GraphCache:
    """Replays ``fn(x2d)`` from CUDA graphs captured per (token bucket, dtype, device)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], in_features: int, out_features: int,
                 max_graphs: int = 16):
        self.fn = fn
        self.in_features = in_features
        self.out_features = out_features
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        # per exact (T, dtype, device): (graph, static in, static out) -- one dict lookup per call
        self._fast: dict[tuple, tuple] = {}
        _ALL_CACHES.add(self)

    def clear(self) -> None:
        self.graphs.clear()
        self._fast.clear()

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the static buffers must not join an autograd graph
            with torch.no_grad():
                return self(x2)
        T = x2.shape[0]
        hit = self._fast.get((T, x2.dtype, x2.device))
        if hit is None:
            hit = self._prepare(x2)
        g, sin, sout = hit
        sin[:T].copy_(x2)
        g.replay()
        return sout[:T].clone()

    def _prepare(self, x2: torch.Tensor) -> tuple:
        T = x2.shape[0]
        b = graph_bucket(T)
        key = (b, x2.dtype, x2.device.index)
        sin = _static(x2.device, x2.dtype, b, self.in_features, "in")
        sout = _static(x2.device, x2.dtype, b, self.out_features, "out")
        g = self.graphs.get(key)
        if g is None:
            with raw_mode():
                g = self._capture(sin, sout, x2.device)
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
                self._fast.clear()
        hit = (g, sin, sout)
        if len(self._fast) > 4 * self.max_graphs:
            self._fast.clear()
        self._fast[(T, x2.dtype, x2.device)] = hit
        return hit

    def _capture(self, sin, sout, device) -> torch.cuda.CUDAGraph:
        with torch.inference_mode(False), torch.no_grad():
            cur = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                for _ in range(2):  # compile kernels, create handles, fill caches, tune
                    self.fn(sin)
            cur.wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with graph_capture(g, pool=_pool(device)):
                sout.copy_(self.fn(sin))
        return g
