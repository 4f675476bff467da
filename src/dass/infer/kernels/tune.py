"""Search the launch configuration of the 2:4 kernels per (shape, token bucket).

Token buckets are powers of two (1, 2, 4, ..., 128; larger counts use the 128 bucket's
tile shape). For each bucket :func:`candidates` lists a few configurations of every kernel
kind that can serve it (GEMV per token with the token-fastest grid for 2-8 tokens, FMA tiles
for 2-8, tensor-core tiles from 2 on, each with and without a split reduction);
:func:`tune_kernel` compiles them (in parallel where triton allows), checks each result
against the first candidate's, times them and returns the fastest. Timing is
:func:`gpu_time`: a CUDA graph of back-to-back calls cycling over enough copies of the
matrix that it cannot sit in L2, median of several replays.

Callers (:mod:`dass.infer.dispatch`) record the winner in the on-disk tuning cache.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Callable

import torch

from dass.infer.kernels.capture import graph_capture

from dass.infer.kernels.launch import (
    Launcher,
    block_t,
    cdiv,
    normalise_config,
    sm_count,
)

__all__ = ["bucket", "candidates", "gpu_time", "tune_kernel", "copies_for"]

L2_DEFEAT_BYTES = 200 * 2**20  # bytes cycled per timed loop, more than any GPU's L2


def bucket(T: int) -> int:
    """The tuning bucket of T tokens: the next power of two."""
    return 1 if T <= 1 else 1 << (T - 1).bit_length()


def _auto_split(orientation: str, N: int, K: int, T: int, cfg: dict, dev: int) -> int:
    kind = cfg["KIND"]
    rows = N // 4 if (orientation == "output" and kind == "gemv") else N
    tok = T if kind == "gemv" else cdiv(T, cfg["BLOCK_T"])
    nprog = cdiv(rows, cfg["BLOCK"]) * tok
    kunits = K if orientation == "output" else K // 4
    bk = cfg["BLOCK_K"] if (orientation == "output" or kind == "gemv") else cfg["BLOCK_K"] // 4
    split = 1
    while nprog * split < 2 * sm_count(dev) and kunits // (split * 2) >= 2 * bk and split < 8:
        split *= 2
    return split


def candidates(orientation: str, T: int, N: int, K: int, dev: int = 0) -> list[dict[str, Any]]:
    """Launch configurations worth timing for a [N, K] matrix at T tokens (its bucket)."""
    b = bucket(T)
    out = orientation == "output"
    cands: list[dict[str, Any]] = []

    def gemv(blk, bk, w, pf=1, fast=0):
        c = dict(KIND="gemv", BLOCK=blk, BLOCK_K=bk, num_warps=w, num_stages=1, T_FAST=fast)
        if out:
            c["PREFETCH"] = pf
        return c

    def tile(bn, bk, bt, w, st, pf, dot):
        return dict(KIND="tile", BLOCK=bn, BLOCK_K=bk, BLOCK_T=bt, num_warps=w, num_stages=st, PREFETCH=pf,
                    USE_DOT=dot)

    if b == 1:
        if out:
            cands += [gemv(2, 512, 4), gemv(2, 256, 1), gemv(2, 256, 2), gemv(4, 256, 4), gemv(2, 128, 1),
                      gemv(2, 1024, 8)]
        else:
            cands += [gemv(8, 256, 4), gemv(8, 128, 4), gemv(16, 128, 4), gemv(4, 256, 2), gemv(8, 256, 2),
                      gemv(16, 64, 4)]
    else:
        bt = block_t(T)
        if b <= 8:
            cands += ([gemv(2, 512, 4, fast=1), gemv(2, 256, 1, fast=1), gemv(4, 256, 2, fast=1)] if out else
                      [gemv(8, 256, 4, fast=1), gemv(4, 256, 2, fast=1), gemv(8, 128, 2, fast=1)])
            cands += [tile(16, 64, bt, 4, 1, 1, 0), tile(32, 64, bt, 4, 1, 1, 0), tile(16, 128, bt, 4, 1, 1, 0)]
        tb = max(16, min(bt, 64))
        cands += [tile(64, 128, tb, 4, 2, 1, 1), tile(64, 256, tb, 4, 2, 1, 1), tile(128, 128, tb, 8, 2, 1, 1),
                  tile(64, 128, tb, 4, 3, 0, 1), tile(32, 256, min(tb, 32), 4, 2, 1, 1)]
        if b >= 64:
            cands += [tile(128, 64, min(bt, 128), 8, 3, 1, 1), tile(64, 128, 16, 4, 2, 1, 1)]
    full: list[dict[str, Any]] = []
    for c in cands:
        c["SPLIT_K"] = 1
        full.append(c)
        s = _auto_split(orientation, N, K, b, c, dev)
        if s > 1:
            full.append(dict(c, SPLIT_K=s))
    return [normalise_config(orientation, b, c) for c in full]


def copies_for(nbytes: int) -> int:
    """How many copies of an operand a timed loop cycles through to defeat the L2 cache."""
    return min(8, max(1, math.ceil(L2_DEFEAT_BYTES / max(nbytes, 1))))


def gpu_time(fn: Callable[[int], Any], ncopies: int = 1, calls: int | None = None, reps: int = 5) -> float:
    """Median ms per call of ``fn(i)`` (i cycles over ``ncopies``), replayed from a CUDA graph
    of back-to-back calls (GPU time without host overhead)."""
    calls = calls or max(ncopies, 4)
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for i in range(max(2, ncopies)):
            fn(i % ncopies)
    cur.wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with graph_capture(g):
        for i in range(calls):
            fn(i % ncopies)
    g.replay()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    del g
    return statistics.median(times)


def _precompile(launchers: list[Launcher], x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> None:
    """Compile every launcher's kernel, several at a time when triton can (AsyncCompileMode)."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton import AsyncCompileMode
    except Exception:
        return
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    try:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for ln in launchers:
                try:
                    ln.warmup(x, values, meta)
                except Exception:
                    pass
    except Exception:  # compiling serially on first launch is the fallback
        pass


def tune_kernel(values: torch.Tensor, meta: torch.Tensor, N: int, K: int, orientation: str, T: int,
                configs: list[dict[str, Any]] | None = None, reps: int = 5) -> dict[str, Any]:
    """Time every candidate configuration at ``bucket(T)`` tokens on this matrix; return
    ``{"best": cfg, "best_ms": ms, "tried": [{"config", "ms"} | {"config", "error"}]}``."""
    b = bucket(T)
    dev = values.device
    x = torch.randn(b, K, device=dev, dtype=values.dtype)
    configs = configs if configs is not None else candidates(orientation, b, N, K, dev.index or 0)
    nbytes = values.numel() * values.element_size() + meta.numel()
    nc = copies_for(nbytes)
    vals = [values] + [values.clone() for _ in range(nc - 1)]
    metas = [meta] + [meta.clone() for _ in range(nc - 1)]
    launchers = []
    for cfg in configs:
        try:
            launchers.append(Launcher(N, K, orientation, cfg, b))
        except Exception:
            continue
    _precompile(launchers, x, values, meta)
    tried: list[dict[str, Any]] = []
    ref = None
    for ln in launchers:
        try:
            y = ln(x, values, meta).double()
            if ref is None:
                ref = x.double() @ _dense(values, meta, N, K, orientation).double().T
            err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if not err < 2e-2:
                tried.append({"config": ln.cfg, "error": f"wrong result (relative error {err:.3g})"})
                continue
            ms = gpu_time(lambda i: ln(x, vals[i], metas[i]), nc, reps=reps)
            tried.append({"config": ln.cfg, "ms": ms})
        except Exception as e:  # a configuration that does not compile or run here is skipped
            tried.append({"config": ln.cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    ok = [t for t in tried if "ms" in t]
    if not ok:
        return {"best": None, "best_ms": None, "tried": tried}
    best = min(ok, key=lambda t: t["ms"])
    return {"best": best["config"], "best_ms": best["ms"], "tried": tried}


def _dense(values, meta, N, K, orientation):
    from dass.infer.kernels import nm24_decompress

    return nm24_decompress(values, meta, N, K, orientation)
