"""CUDA-graph capture that keeps cuBLAS's workspaces out of other graphs' memory.

Why: cuBLAS keeps one persistent workspace per (handle, stream), allocated lazily by
PyTorch's caching allocator on the first matmul. A matmul captured into a graph bakes that
workspace's address into the graph. If the workspace was made inside a short-lived graph's
private pool (a timing graph of the dispatcher, deleted a moment later), or is freed while a
graph that uses it still replays, two users end up writing the same bytes. Inductor's CUDA
graph trees (``torch.compile(mode="reduce-overhead")``) clear every cuBLAS workspace before
and after each warm-up and recording for this reason (``clear_cublas_manager`` in
``torch/_inductor/cudagraph_trees.py``); this module does the same around dass' own captures,
so a workspace made during one of them lives in that graph's pool only, and the next eager or
compiled matmul makes a fresh one in its own pool.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["clear_cublas_workspaces", "graph_capture"]


def clear_cublas_workspaces() -> None:
    """Drop cuBLAS's cached workspaces (no-op where this torch has no CUDA)."""
    fn = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if fn is not None and torch.cuda.is_available():
        fn()


@contextlib.contextmanager
def graph_capture(graph: "torch.cuda.CUDAGraph", **kwargs: Any) -> Iterator[None]:
    """``torch.cuda.graph(graph, **kwargs)`` with cuBLAS's workspaces cleared before and after
    the capture (see the module docstring)."""
    clear_cublas_workspaces()
    try:
        with torch.cuda.graph(graph, **kwargs):
            yield
    finally:
        clear_cublas_workspaces()
