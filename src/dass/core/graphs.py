"""CUDA-graph replay of the solvers' per-block loops (shared by SparseGPT and dass-obs).

A solver block is a few hundred tiny kernels (per input column: a mask choice, the
column's error, a rank-1 update of the block's later columns) whose launch cost exceeds
their run time on a GPU. :func:`run_block` captures such a loop once per block shape and
replays it: the loop's tensors are copied into static buffers, the graph is replayed, and
every buffer is copied back, so the loop sees exactly what an eager call would. Loops must
be free of host synchronisation (no ``.item()``, no boolean indexing) to be capturable;
a loop whose capture fails runs eagerly from then on.

``DASS_SPARSEGPT_GRAPHS=0`` (or ``USE_CUDA_GRAPHS = False``) turns replay off.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, Sequence

import torch

#: Captured graphs by (loop, block shape and constants, device); None = capture failed.
GRAPHS: dict[tuple, "GraphedLoop | None"] = {}
USE_CUDA_GRAPHS = os.environ.get("DASS_SPARSEGPT_GRAPHS", "1") != "0"
#: Blocks with fewer columns are not worth a capture.
MIN_COLUMNS = 16


class GraphedLoop:
    """``loop(*buffers)`` captured as one CUDA graph on static copies of its tensors."""

    def __init__(self, loop: Callable[..., None], tensors: Sequence[torch.Tensor]) -> None:
        device = tensors[0].device
        self.buffers = [t.detach().clone() for t in tensors]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
            loop(*self.buffers)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loop(*self.buffers)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> None:
        for buf, t in zip(self.buffers, tensors):
            buf.copy_(t)
        self.graph.replay()
        for buf, t in zip(self.buffers, tensors):
            t.copy_(buf)


def run_block(loop: Callable[..., None], key: Hashable, tensors: Sequence[torch.Tensor], graph: bool) -> None:
    """``loop(*tensors)``, which updates ``tensors`` in place: replayed from a captured CUDA
    graph when ``graph`` (the caller's judgement that the block shape recurs) and the
    tensors are on a GPU, eagerly otherwise. ``key`` must identify the loop and everything
    besides the tensors' shapes that its kernels depend on (its constants): ``loop`` itself
    is often a fresh ``functools.partial`` per call and cannot be the key."""
    first = tensors[0]
    if graph and USE_CUDA_GRAPHS and first.is_cuda and first.shape[0] >= MIN_COLUMNS:
        full_key = (key, first.device, tuple(tuple(t.shape) for t in tensors))
        if full_key not in GRAPHS:
            try:
                GRAPHS[full_key] = GraphedLoop(loop, tensors)
            except Exception:  # capture not possible here: run eagerly
                GRAPHS[full_key] = None
        graphed = GRAPHS[full_key]
        if graphed is not None:
            graphed(tensors)
            return
    loop(*tensors)


def clear_graphs() -> None:
    """Free the captured graphs (and their buffers)."""
    GRAPHS.clear()
