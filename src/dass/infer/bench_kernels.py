"""``dass bench`` per-matrix measurements: dense cuBLAS against every 2:4 path (Triton,
cuSPARSELt in four call forms, decompress + cuBLAS, the NM24Linear module), and the
machine's ceilings."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dass.infer.bench_timing import Timer, ncopies, prune24, safe

__all__ = ["bench_matrix", "cslt_layouts", "ceilings"]


def bench_matrix(timer: Timer, N: int, K: int, T: int, orientations: list[str], dtype, device,
                 errors: list, triton_max_T: int = 1024) -> dict[str, Any]:
    """One weight shape [N, K] at T tokens: dense vs every sparse path available."""
    from dass.infer.kernels import (
        nm24_decompress,
        nm24_matmul,
        to_kernel_layout,
        triton_available,
    )

    row: dict[str, Any] = {"N": N, "K": K, "T": T}
    dense_bytes = N * K * torch.finfo(dtype).bits // 8
    nc = ncopies(dense_bytes * 9 // 16)
    gen = torch.Generator(device=device).manual_seed(N * 7 + K)
    x = torch.randn(T, K, device=device, dtype=dtype, generator=gen)
    base = torch.randn(N, K, device=device, dtype=dtype, generator=gen) * 0.02
    Wd = [base if i == 0 else base.roll(i, 1) for i in range(ncopies(dense_bytes))]
    row["dense_eager_ms"] = safe(lambda: timer.eager(lambda i: F.linear(x, Wd[i % len(Wd)]), len(Wd)), errors, f"dense {N}x{K} T={T}")
    row["dense_graph_ms"] = safe(lambda: timer.graph(lambda i: F.linear(x, Wd[i % len(Wd)]), len(Wd)), errors, f"dense graph {N}x{K} T={T}")
    del Wd
    tri = triton_available()
    for o in orientations:
        Ws = [prune24(base.roll(i, 1) if i else base, o) for i in range(nc)]
        if tri:
            lay = [to_kernel_layout(w, o) for w in Ws]
            if T <= triton_max_T:
                f = lambda i: nm24_matmul(x, lay[i % nc][0], lay[i % nc][1], N, K, o)  # noqa: E731
                row[f"triton_{o}_eager_ms"] = safe(lambda: timer.eager(f, nc), errors, f"triton {o} {N}x{K} T={T}")
                row[f"triton_{o}_graph_ms"] = safe(lambda: timer.graph(f, nc), errors, f"triton {o} graph {N}x{K} T={T}")
            if o == "output" and T >= 16:
                g = lambda i: F.linear(x, nm24_decompress(lay[i % nc][0], lay[i % nc][1], N, K, o))  # noqa: E731
                row[f"decomp_{o}_graph_ms"] = safe(lambda: timer.graph(g, nc), errors, f"decompress+dense {N}x{K} T={T}")
        if o == "input" and device == "cuda" and T >= 8:  # (cuSPARSELt refuses fewer; NM24Linear pads)
            from dass.infer.accelerate import cslt_search

            packed = [torch._cslt_compress(w) for w in Ws]
            # (bf16 only: torch 2.11's fp16 search breaks the CUDA context, see AccelerateConfig)
            alg = (safe(lambda: cslt_search(packed[0], x.t()), errors, f"cslt search {N}x{K} T={T}") or 0
                   if dtype == torch.bfloat16 else 0)
            row["cslt_alg_id"] = alg  # what NM24Linear uses (AccelerateConfig.cslt_alg_search)
            c = lambda i: torch._cslt_sparse_mm(packed[i % nc], x.t(), transpose_result=True, alg_id=alg)  # noqa: E731
            row["cslt_eager_ms"] = safe(lambda: timer.eager(c, nc), errors, f"cslt {N}x{K} T={T}")
            row["cslt_graph_ms"] = safe(lambda: timer.graph(c, nc), errors, f"cslt graph {N}x{K} T={T}")
            del packed
        if device == "cuda":
            from dass.infer.accelerate import NM24Linear

            mods = safe(lambda: [NM24Linear(w, None, o) for w in Ws], errors, f"NM24Linear {o} {N}x{K}")
            if mods:
                m = lambda i: mods[i % nc](x)  # noqa: E731
                row[f"module_{o}_eager_ms"] = safe(lambda: timer.eager(m, nc), errors, f"module {o} {N}x{K} T={T}")
                row[f"module_{o}_path"] = mods[0].path_for(T)
            del mods
        del Ws
    return row


def cslt_layouts(timer: Timer, shapes, tokens, dtype, device, errors: list) -> list[dict[str, Any]]:
    """cuSPARSELt called four ways (the dense operand as ``x.t()`` or as a contiguous
    ``[K, T]``, result transposed or not), each with the default algorithm and with
    ``_cslt_sparse_mm_search``'s, against dense ``F.linear``; CUDA-graph replays (GPU time)."""
    from dass.infer.accelerate import cslt_search

    rows: list[dict[str, Any]] = []
    for name, d, D in shapes:
        for kind, N, K in (("gate", D, d), ("down", d, D)):
            W = prune24(torch.randn(N, K, device=device, dtype=dtype) * 0.02, "input")
            Wc = torch._cslt_compress(W)
            for T in tokens:
                if T < 16:
                    continue
                x = torch.randn(T, K, device=device, dtype=dtype)
                xtc = x.t().contiguous()
                ref = F.linear(x, W).float()
                row: dict[str, Any] = {"shape": name, "kind": kind, "N": N, "K": K, "T": T,
                                       "dense_graph_ms": timer.graph(lambda i: F.linear(x, W)), "variants": {}}
                forms = {"xt_T": (lambda: x.t(), True), "xt": (lambda: x.t(), False),
                         "xtc_T": (lambda: xtc, True), "xtc": (lambda: xtc, False)}
                for form, (B, tr) in forms.items():
                    algs = {"alg0": 0}
                    try:
                        if dtype != torch.bfloat16:
                            raise RuntimeError("search skipped: only bf16 is safe (AccelerateConfig.cslt_search_min_tokens)")
                        algs["search"] = cslt_search(Wc, B(), transpose_result=tr)
                    except Exception as e:  # noqa: BLE001
                        errors.append(f"cslt search {form} {N}x{K} T={T}: {type(e).__name__}: {e}")
                    for an, alg in algs.items():
                        def f(i, B=B, tr=tr, alg=alg):
                            return torch._cslt_sparse_mm(Wc, B(), transpose_result=tr, alg_id=alg)
                        y = safe(lambda: f(0), errors, f"cslt {form} {an}")
                        if y is None:
                            continue
                        y = y.float() if tr else y.float().t()
                        err = ((y - ref).norm() / ref.norm()).item()
                        ms = safe(lambda: timer.graph(f), errors, f"cslt time {form} {an}")
                        row["variants"][f"{form}/{an}"] = {"ms": ms, "alg_id": alg, "rel_err": err}
                best = min((v["ms"], k) for k, v in row["variants"].items() if v["ms"] and v["rel_err"] < 1e-2)
                row["best"] = best[1]
                dense = row["dense_graph_ms"]
                print(f"  cslt {name} {kind} {N}x{K} T={T}: dense {dense * 1e3:.1f} us; "
                      + ", ".join(f"{k} {v['ms'] * 1e3:.1f} ({dense / v['ms']:.2f}x)" for k, v in row["variants"].items() if v["ms"]),
                      flush=True)
                rows.append(row)
            del W, Wc
            torch.cuda.empty_cache()
    return rows


def ceilings(timer: Timer, device) -> dict[str, float]:
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = timer.graph(lambda i: b.copy_(a), 1)
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = timer.graph(lambda i: x @ x, 1)
    return {"copy_GBps": 2 * 2**30 / ms / 1e6, "bf16_mm_TFLOPs": 2 * 8192**3 / mm / 1e9}
