"""``dass bench``: time dense vs 2:4 sparse matrix products, MLP blocks and a 7B-shaped model.

Timing: CUDA events around a loop of calls (median over repetitions), after warm-up.
"eager" numbers are what a caller gets calling the function in ordinary Python (host
overhead included when the GPU waits for it); "graph" numbers replay the same loop from a
CUDA graph (GPU time alone). Each loop cycles over enough copies of the weights that they
cannot stay in the 60 MB L2 cache between calls.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {"7b": (4096, 11008), "13b": (5120, 13824), "70b": (8192, 28672)}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_SET_BYTES = 200 * 2**20  # weights cycled per loop, > L2


# --------------------------------------------------------------------------- timing


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
        with torch.cuda.graph(g):
            for i in range(inner):
                fn(i)
        g.replay()
        self._sync()
        times = [self._loop_ms(g.replay) / inner for _ in range(self.reps)]
        del g
        return statistics.median(times)


def _safe(f: Callable[[], float | None], errors: list, what: str) -> float | None:
    try:
        return f()
    except Exception as e:  # a failing variant must not kill the whole benchmark
        errors.append(f"{what}: {type(e).__name__}: {e}")
        print(f"  !! {what}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
        return None


# --------------------------------------------------------------------------- weights


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


def _ncopies(nbytes: int) -> int:
    return min(8, max(2, math.ceil(MIN_SET_BYTES / max(nbytes, 1))))


# --------------------------------------------------------------------------- per matrix


def bench_matrix(timer: Timer, N: int, K: int, T: int, orientations: list[str], dtype, device,
                 errors: list, triton_max_T: int = 1024) -> dict[str, Any]:
    """One weight shape [N, K] at T tokens: dense vs every sparse path available."""
    from dass.infer.kernels import nm24_decompress, nm24_matmul, to_kernel_layout, triton_available

    row: dict[str, Any] = {"N": N, "K": K, "T": T}
    dense_bytes = N * K * torch.finfo(dtype).bits // 8
    nc = _ncopies(dense_bytes * 9 // 16)
    gen = torch.Generator(device=device).manual_seed(N * 7 + K)
    x = torch.randn(T, K, device=device, dtype=dtype, generator=gen)
    base = torch.randn(N, K, device=device, dtype=dtype, generator=gen) * 0.02
    Wd = [base if i == 0 else base.roll(i, 1) for i in range(_ncopies(dense_bytes))]
    row["dense_eager_ms"] = _safe(lambda: timer.eager(lambda i: F.linear(x, Wd[i % len(Wd)]), len(Wd)), errors, f"dense {N}x{K} T={T}")
    row["dense_graph_ms"] = _safe(lambda: timer.graph(lambda i: F.linear(x, Wd[i % len(Wd)]), len(Wd)), errors, f"dense graph {N}x{K} T={T}")
    del Wd
    tri = triton_available()
    for o in orientations:
        Ws = [prune24(base.roll(i, 1) if i else base, o) for i in range(nc)]
        if tri:
            lay = [to_kernel_layout(w, o) for w in Ws]
            if T <= triton_max_T:
                f = lambda i: nm24_matmul(x, lay[i % nc][0], lay[i % nc][1], N, K, o)  # noqa: E731
                row[f"triton_{o}_eager_ms"] = _safe(lambda: timer.eager(f, nc), errors, f"triton {o} {N}x{K} T={T}")
                row[f"triton_{o}_graph_ms"] = _safe(lambda: timer.graph(f, nc), errors, f"triton {o} graph {N}x{K} T={T}")
            if o == "output" and T >= 16:
                g = lambda i: F.linear(x, nm24_decompress(lay[i % nc][0], lay[i % nc][1], N, K, o))  # noqa: E731
                row[f"decomp_{o}_graph_ms"] = _safe(lambda: timer.graph(g, nc), errors, f"decompress+dense {N}x{K} T={T}")
        if o == "input" and device == "cuda" and T >= 8:  # (cuSPARSELt refuses fewer; NM24Linear pads)
            from dass.infer.accelerate import cslt_search

            packed = [torch._cslt_compress(w) for w in Ws]
            # (bf16 only: torch 2.11's fp16 search breaks the CUDA context, see AccelerateConfig)
            alg = (_safe(lambda: cslt_search(packed[0], x.t()), errors, f"cslt search {N}x{K} T={T}") or 0
                   if dtype == torch.bfloat16 else 0)
            row["cslt_alg_id"] = alg  # what NM24Linear uses (AccelerateConfig.cslt_alg_search)
            c = lambda i: torch._cslt_sparse_mm(packed[i % nc], x.t(), transpose_result=True, alg_id=alg)  # noqa: E731
            row["cslt_eager_ms"] = _safe(lambda: timer.eager(c, nc), errors, f"cslt {N}x{K} T={T}")
            row["cslt_graph_ms"] = _safe(lambda: timer.graph(c, nc), errors, f"cslt graph {N}x{K} T={T}")
            del packed
        if device == "cuda":
            from dass.infer.accelerate import NM24Linear

            mods = _safe(lambda: [NM24Linear(w, None, o) for w in Ws], errors, f"NM24Linear {o} {N}x{K}")
            if mods:
                m = lambda i: mods[i % nc](x)  # noqa: E731
                row[f"module_{o}_eager_ms"] = _safe(lambda: timer.eager(m, nc), errors, f"module {o} {N}x{K} T={T}")
                row[f"module_{o}_path"] = mods[0].path_for(T)
            del mods
        del Ws
    return row


# --------------------------------------------------------------------------- MLP block


class GLUMLP(nn.Module):
    """LLaMA's MLP (transformers' LlamaMLP): down(act_fn(gate(x)) * up(x)), act_fn = SiLU."""

    def __init__(self, d: int, D: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, D, bias=False)
        self.up_proj = nn.Linear(d, D, bias=False)
        self.down_proj = nn.Linear(D, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _make_mlps(d, D, dtype, device, seed=0):
    torch.manual_seed(seed)
    dense = GLUMLP(d, D).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.02)
    out = {"dense": dense}
    for name, go in (("wanda", "input"), ("dass", "output")):
        m = copy.deepcopy(dense)
        with torch.no_grad():
            m.gate_proj.weight.copy_(prune24(m.gate_proj.weight, go))
            m.up_proj.weight.copy_(prune24(m.up_proj.weight, go))
            m.down_proj.weight.copy_(prune24(m.down_proj.weight, "input"))
        out[name] = m
    return out


def bench_mlp(timer: Timer, d: int, D: int, tokens: list[int], dtype, device, errors: list) -> list[dict]:
    mlps = _make_mlps(d, D, dtype, device)
    rows = []
    acc = {}
    if device == "cuda":
        from dass.infer.accelerate import accelerate

        for name in ("wanda", "dass"):
            acc[name] = _safe(lambda: (accelerate(mlps[name]), mlps[name])[1], errors, f"accelerate {name} {d}x{D}")
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, d, device=device, dtype=dtype)
            row = {"d": d, "D": D, "T": T}
            row["dense_eager_ms"] = _safe(lambda: timer.eager(lambda i: mlps["dense"](x)), errors, f"mlp dense {d} T={T}")
            row["dense_graph_ms"] = _safe(lambda: timer.graph(lambda i: mlps["dense"](x)), errors, f"mlp dense graph {d} T={T}")
            for name, m in acc.items():
                if m is None:
                    continue
                ref = mlps["dense"]  # (speed only; correctness is in the tests)
                row[f"{name}_eager_ms"] = _safe(lambda: timer.eager(lambda i: m(x)), errors, f"mlp {name} {d} T={T}")
                del ref
            rows.append(row)
            print(_fmt_mlp_row(row), flush=True)
    return rows


# --------------------------------------------------------------------------- end to end


def bench_e2e(timer: Timer, layers: int, prefill: list[int], decode_ctx: int, decode_batches: list[int],
              dtype, device, errors: list, tiny: bool = False) -> dict[str, Any]:
    """A LLaMA-2-7B-shaped LlamaForCausalLM (``layers`` decoder layers, random weights):
    dense vs DaSS-like (gate/up 2:4 along outputs, down along inputs) vs Wanda-like (all
    2:4 along inputs), the sparse ones accelerated. Attention stays dense (MLP scope)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype).eval()
    models = {"dense": base}
    for name, go in (("dass", "output"), ("wanda", "input")):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for layer in m.model.layers:
                mlp = layer.mlp
                mlp.gate_proj.weight.copy_(prune24(mlp.gate_proj.weight, go))
                mlp.up_proj.weight.copy_(prune24(mlp.up_proj.weight, go))
                mlp.down_proj.weight.copy_(prune24(mlp.down_proj.weight, "input"))
        if device == "cuda":
            from dass.infer.accelerate import accelerate

            rep = _safe(lambda: accelerate(m), errors, f"accelerate e2e {name}")
            if rep is None:
                continue
        models[name] = m
    out: dict[str, Any] = {"layers": layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                           "prefill": {}, "decode_eager": {}, "decode_graph": {}}
    vocab = cfg.vocab_size

    # transformers >= 5.2x calls the KV cache ``cache`` (``past_key_values`` is deprecated there)
    fwd_params = inspect.signature(next(iter(models.values())).forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"

    def kv(output):
        return output.cache if "cache" in getattr(output, "keys", lambda: ())() else output.past_key_values

    def fwd(m, ids, **kw):
        try:
            return m(ids, logits_to_keep=1, **kw)
        except TypeError:
            return m(ids, **kw)

    with torch.inference_mode():
        for P in prefill:
            ids = torch.randint(0, vocab, (1, P), device=device)
            for name, m in models.items():
                ms = _safe(lambda: timer.eager(lambda i: fwd(m, ids, use_cache=False)), errors, f"prefill {name} {P}")
                out["prefill"].setdefault(str(P), {})[name] = ms
            print(f"  prefill {P}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in out["prefill"][str(P)].items() if v), flush=True)
        # eager decode: one new token on a KV cache of decode_ctx tokens
        ctx = torch.randint(0, vocab, (1, max(decode_ctx, 1)), device=device)
        nxt = torch.randint(0, vocab, (1, 1), device=device)
        for name, m in (models.items() if decode_ctx > 0 else ()):
            def run():
                step = lambda cache: fwd(m, nxt, **{cache_kw: cache}, use_cache=True)  # noqa: E731
                step(kv(fwd(m, ctx, use_cache=True)))  # warm-up
                inner = 8
                times = []
                for _ in range(timer.reps):
                    cache = kv(fwd(m, ctx, use_cache=True))  # fresh cache of decode_ctx tokens
                    times.append(timer._loop_ms(lambda: [step(cache) for _ in range(inner)]) / inner)
                return statistics.median(times)
            out["decode_eager"][name] = _safe(run, errors, f"decode eager {name}")
        print("  decode eager (1 token, ctx %d): " % decode_ctx
              + ", ".join(f"{k} {v:.3f} ms" for k, v in out["decode_eager"].items() if v), flush=True)
    # decode-like step as a CUDA graph: B sequences of 1 token, no KV cache (weight streaming)
    if device == "cuda":
        with torch.no_grad():
            for B in decode_batches:
                ids = torch.randint(0, vocab, (B, 1), device=device)
                for name, m in models.items():
                    out["decode_graph"].setdefault(str(B), {})[name] = _safe(
                        lambda: timer.graph(lambda i: fwd(m, ids, use_cache=False)), errors, f"decode graph {name} B={B}")
                print(f"  decode graph B={B}: " + ", ".join(
                    f"{k} {v:.3f} ms" for k, v in out["decode_graph"][str(B)].items() if v), flush=True)
    return out


# --------------------------------------------------------------------------- kernel sweep


def sweep(timer: Timer, dtype, device, errors: list, d: int = 4096, D: int = 11008) -> dict[str, Any]:
    """Try launch configurations of the Triton kernels on one MLP shape; report the best."""
    from dass.infer.kernels import nm24_matmul, to_kernel_layout

    def c(b, k, t=1, w=4, st=1, sp=1):
        return dict(BLOCK=b, BLOCK_K=k, BLOCK_T=t, num_warps=w, num_stages=st, SPLIT_K=sp)

    cases = [
        ("output", D, d, 1, [c(b, k) for b in (2, 4, 8) for k in (256, 512)] + [c(4, 1024), c(4, 512, w=8)]),
        ("input", D, d, 1, [c(b, k) for b in (8, 16) for k in (64, 128)]),
        ("input", d, D, 1, [c(16, k, sp=s) for k in (64, 128) for s in (1, 2)]),
        ("output", D, d, 16, [c(16, 64, 16, st=3, sp=s) for s in (1, 2, 4)]),
        ("input", D, d, 16, [c(b, 32, 16, st=3) for b in (32, 64)]),
        ("output", D, d, 128, [c(16, 64, 64, st=3), c(32, 64, 64, w=8, st=3)]),
        ("input", D, d, 128, [c(64, 32, 64, st=3), c(128, 32, 64, w=8, st=3)]),
    ]
    res = {}
    for o, N, K, T, cfgs in cases:
        W = prune24(torch.randn(N, K, device=device, dtype=dtype) * 0.02, o)
        nc = _ncopies(N * K * 9 // 8)
        lays = [to_kernel_layout(W.roll(i, 1) if o == "output" else W.roll(4 * i, 1), o) for i in range(nc)]
        x = torch.randn(T, K, device=device, dtype=dtype)
        ref = x.double() @ W.double().T
        best = None
        tried = []
        for cfg in cfgs:
            def f(i, cfg=cfg):
                return nm24_matmul(x, lays[i % nc][0], lays[i % nc][1], N, K, o, config=cfg)
            y = _safe(lambda: nm24_matmul(x, lays[0][0], lays[0][1], N, K, o, config=cfg), errors, f"sweep {o} {cfg}")
            if y is None:
                continue
            err = ((y.double() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                errors.append(f"sweep {o} {N}x{K} T={T} {cfg}: wrong result, rel err {err:.3g}")
                continue
            ms = _safe(lambda: timer.graph(f, nc) if timer.cuda else timer.eager(f, nc), errors, f"sweep time {o} {cfg}")
            if ms is None:
                continue
            tried.append({"config": cfg, "ms": ms})
            if best is None or ms < best["ms"]:
                best = {"config": cfg, "ms": ms}
        key = f"{o}_{N}x{K}_T{T}"
        res[key] = {"best": best, "tried": tried}
        if best:  # later measurements in this run use the winner (and docs/speed.md records it)
            from dass.infer.kernels import set_config

            set_config(o, T, best["config"], N, K)
            set_config(o, T, {k: v for k, v in best["config"].items() if k != "SPLIT_K"})
        if best:
            gb = (N * K * 9 // 8 + T * (K + N) * 2) / best["ms"] / 1e6
            print(f"  sweep {key}: best {best['ms'] * 1e3:.1f} us ({gb:.0f} GB/s) {best['config']}", flush=True)
    return res


def _kernel_stats(orientation: str) -> list[dict[str, Any]]:
    """Registers and spills of every compiled variant of a 2:4 kernel (diagnostic; [] when
    this triton keeps its cache differently)."""
    try:
        from dass.infer.kernels import nm24

        kern = nm24._nm24_out_kernel if orientation == "output" else nm24._nm24_in_kernel
        out = []
        for cache in getattr(kern, "device_caches", {}).values():
            for key, ck in (cache[0] if isinstance(cache, tuple) else cache).items():
                md = getattr(ck, "metadata", None)
                out.append({"key": str(key)[-160:], "n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None),
                            "num_warps": getattr(md, "num_warps", None), "shared": getattr(md, "shared", None)})
        return out
    except Exception as e:  # noqa: BLE001
        return [{"error": f"{type(e).__name__}: {e}"}]


def gemv(timer: Timer, shapes, dtype, device, errors: list) -> dict[str, Any]:
    """1-token products: the Triton kernels (a few launch configs) against dense cuBLAS, for
    every MLP matrix shape; installs the fastest config; also checks every kernel path."""
    from dass.infer.kernels import nm24_decompress, nm24_matmul, set_config, to_kernel_layout

    def c(b, k, w=4, sp=1, st=1, pf=0):
        return dict(BLOCK=b, BLOCK_K=k, BLOCK_T=1, num_warps=w, num_stages=st, SPLIT_K=sp, PREFETCH=pf)

    cfgs = {"output": [c(2, 512), c(2, 256, 1), c(2, 256, 2), c(4, 256), c(2, 1024, 8),
                       c(2, 512, pf=1), c(2, 256, 1, pf=1), c(2, 256, 2, pf=1), c(2, 128, 1, pf=1), c(4, 256, pf=1),
                       c(2, 1024, 8, pf=1), c(4, 128, 2, pf=1), c(2, 256, 1, pf=2), c(2, 128, 1, pf=2), c(2, 512, pf=2),
                       c(2, 256, 2, pf=2)],
            "input": [c(8, 128), c(16, 128), c(8, 256), c(16, 64), c(32, 64), c(16, 256, 8),
                      c(4, 256, 2), c(8, 256, 2), c(4, 128, 1), c(8, 128, 2), c(16, 128, sp=2), c(8, 128, sp=2)]}
    out: dict[str, Any] = {"rows": [], "checks": []}
    for name, d, D in shapes:
        for kind, o, N, K in (("gate", "output", D, d), ("gate+up", "output", 2 * D, d), ("gate", "input", D, d),
                              ("gate+up", "input", 2 * D, d), ("down", "input", d, D)):
            nbytes = N * K * 9 // 8
            nc = _ncopies(nbytes)
            Ws = [prune24(torch.randn(N, K, device=device, dtype=dtype) * 0.02, o) for _ in range(nc)]
            lays = [to_kernel_layout(w, o) for w in Ws]
            x = torch.randn(1, K, device=device, dtype=dtype)
            ref = x.double() @ Ws[0].double().T
            dense = timer.graph(lambda i: F.linear(x, Ws[i % nc]), nc)
            row = {"shape": name, "kind": kind, "orientation": o, "N": N, "K": K, "dense_graph_ms": dense, "tried": []}
            for cfg in cfgs[o]:
                if o == "input" and cfg["SPLIT_K"] > 1 and K < 8192:
                    continue
                y = _safe(lambda: nm24_matmul(x, lays[0][0], lays[0][1], N, K, o, config=cfg), errors, f"gemv {o} {cfg}")
                if y is None:
                    continue
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    errors.append(f"gemv {o} {N}x{K} {cfg}: wrong result, rel err {err:.3g}")
                    continue
                ms = _safe(lambda: timer.graph(lambda i: nm24_matmul(x, lays[i % nc][0], lays[i % nc][1], N, K, o, config=cfg), nc),
                           errors, f"gemv time {o} {cfg}")
                if ms is not None:
                    row["tried"].append({"config": cfg, "ms": ms, "rel_err": err})
            if row["tried"]:
                best = min(row["tried"], key=lambda t: t["ms"])
                row["kernel_stats"] = _kernel_stats(o)
                row["best"] = best
                set_config(o, 1, best["config"], N, K)
                if name == shapes[0][0]:
                    set_config(o, 1, {k: v for k, v in best["config"].items() if k != "SPLIT_K"})
                print(f"  gemv {name} {kind} {o:6} {N}x{K}: dense {dense * 1e3:.1f} us, 2:4 {best['ms'] * 1e3:.1f} us "
                      f"({dense / best['ms']:.2f}x, {nbytes / best['ms'] / 1e6:.0f} GB/s) {best['config']}", flush=True)
            out["rows"].append(row)
            # every other kernel path (tensor-core T>1, split-K, decompress) on this shape
            if name == shapes[0][0]:
                for T in (16, 100):
                    xt = torch.randn(T, K, device=device, dtype=dtype)
                    e = rel = None
                    try:
                        rel = ((nm24_matmul(xt, lays[0][0], lays[0][1], N, K, o).double() - xt.double() @ Ws[0].double().T).norm()
                               / (xt.double() @ Ws[0].double().T).norm()).item()
                    except Exception as ex:  # noqa: BLE001
                        e = f"{type(ex).__name__}: {ex}"
                    out["checks"].append({"what": f"matmul {o} {N}x{K} T={T}", "rel_err": rel, "error": e})
                    if e or not rel < 1e-2:
                        errors.append(f"check matmul {o} {N}x{K} T={T}: {e or rel}")
                ok = bool(torch.equal(nm24_decompress(lays[0][0], lays[0][1], N, K, o), Ws[0]))
                out["checks"].append({"what": f"decompress {o} {N}x{K}", "exact": ok})
                if not ok:
                    errors.append(f"check decompress {o} {N}x{K}: not exact")
            del Ws, lays
    return out


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
                        y = _safe(lambda: f(0), errors, f"cslt {form} {an}")
                        if y is None:
                            continue
                        y = y.float() if tr else y.float().t()
                        err = ((y - ref).norm() / ref.norm()).item()
                        ms = _safe(lambda: timer.graph(f), errors, f"cslt time {form} {an}")
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


# --------------------------------------------------------------------------- printing


def _us(v):
    return f"{v * 1e3:9.1f}" if isinstance(v, (int, float)) else f"{'-':>9}"


def _x(a, b):
    return f"{a / b:5.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else "    - "


def _fmt_matrix_row(shape, kind, r):
    de, dg = r.get("dense_eager_ms"), r.get("dense_graph_ms")
    cols = [f"{shape:>4} {kind:<5} {r['N']:>5}x{r['K']:<5} T={r['T']:<5}", _us(de), _us(dg)]
    for key in ("cslt_eager_ms", "cslt_graph_ms", "triton_input_graph_ms", "triton_output_graph_ms",
                "decomp_output_graph_ms", "module_input_eager_ms", "module_output_eager_ms"):
        v = r.get(key)
        ref = de if "eager" in key else dg
        cols.append(f"{_us(v)} {_x(ref, v)}")
    return " ".join(cols)


MATRIX_HEADER = ("shape kind  N x K       T        dense_e   dense_g |  cslt_eager      |  cslt_graph      "
                 "| triton_in_graph  | triton_out_graph | decomp_out_graph | module_in_eager  | module_out_eager  "
                 "(us; ratio = dense/variant, eager vs dense eager, graph vs dense graph)")


def _fmt_mlp_row(r):
    de, dg = r.get("dense_eager_ms"), r.get("dense_graph_ms")
    return (f"  MLP d={r['d']:<5} D={r['D']:<6} T={r['T']:<6} dense eager {_us(de)} graph {_us(dg)} | "
            f"wanda eager {_us(r.get('wanda_eager_ms'))} {_x(de, r.get('wanda_eager_ms'))} | "
            f"dass eager {_us(r.get('dass_eager_ms'))} {_x(de, r.get('dass_eager_ms'))}")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dass bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="7b,13b,70b", help="comma list of 7b,13b,70b or DxD' (e.g. 256x704)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--what", default="matrix,mlp", help="comma list of matrix,mlp,e2e,sweep,gemv,cslt,ceilings")
    p.add_argument("--e2e-layers", type=int, default=8)
    p.add_argument("--e2e-prefill", default="2048")
    p.add_argument("--e2e-decode-ctx", type=int, default=512)
    p.add_argument("--e2e-decode-batches", default="1,16")
    p.add_argument("--target-ms", type=float, default=25.0, help="time per measured loop")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    p.add_argument("--load-sweep", default=None, help="install the best kernel configs of an earlier --what sweep JSON")
    p.add_argument("--dry-run", action="store_true", help="run on CPU with tiny shapes (checks the code path only)")
    return p


def _parse_shapes(s: str):
    out = []
    for tok in s.split(","):
        tok = tok.strip().lower()
        if tok in SHAPES:
            out.append((tok, *SHAPES[tok]))
        elif "x" in tok:
            a, b = tok.split("x")
            out.append((tok, int(a), int(b)))
        elif tok:
            raise SystemExit(f"unknown shape {tok!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        device = "cpu"
    elif not torch.cuda.is_available():
        print("dass bench needs a CUDA GPU (use --dry-run to check the code path on CPU)", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    dtype = DTYPES[args.dtype]
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    shapes = _parse_shapes(args.shapes)
    timer = Timer(device, args.target_ms, args.reps)
    errors: list[str] = []
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "argv": sys.argv if argv is None else argv,
        "timing": "CUDA events; median of %d loops of back-to-back calls; eager = plain calls, graph = CUDA-graph replay" % args.reps,
    }
    try:
        import triton

        res["triton"] = triton.__version__
    except Exception:
        res["triton"] = None
    t0 = time.time()

    def dump():
        res["errors"] = errors
        res["seconds"] = time.time() - t0
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    if args.load_sweep:
        from dass.infer.kernels import set_config

        with open(args.load_sweep) as f:
            for key, v in (json.load(f).get("sweep") or {}).items():
                if v.get("best"):
                    o, nk, t = key.split("_")
                    N, K = map(int, nk.split("x"))
                    set_config(o, int(t[1:]), v["best"]["config"], N, K)
                    set_config(o, int(t[1:]), {k: x for k, x in v["best"]["config"].items() if k != "SPLIT_K"})
    if "ceilings" in what and device == "cuda":
        res["ceilings"] = _safe(lambda: ceilings(timer, device), errors, "ceilings")
        print("ceilings:", res["ceilings"], flush=True)
    if "gemv" in what:
        res["gemv"] = gemv(timer, shapes, dtype, device, errors)
        dump()
    if "cslt" in what and device == "cuda":
        res["cslt"] = cslt_layouts(timer, shapes, [t for t in tokens if t >= 16], dtype, device, errors)
        dump()
    if "sweep" in what:
        res["sweep"] = sweep(timer, dtype, device, errors, shapes[0][1], shapes[0][2])
        dump()
    for name, d, D in shapes:
        if "matrix" in what:
            res.setdefault("matrix", [])
            print(MATRIX_HEADER, flush=True)
            for kind, N, K, ors in (("gate", D, d, ["input", "output"]), ("down", d, D, ["input"])):
                for T in tokens:
                    r = bench_matrix(timer, N, K, T, ors, dtype, device, errors)
                    r.update(shape=name, kind=kind)
                    res["matrix"].append(r)
                    print(_fmt_matrix_row(name, kind, r), flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                dump()
        if "mlp" in what:
            res.setdefault("mlp", [])
            for r in bench_mlp(timer, d, D, tokens, dtype, device, errors):
                r["shape"] = name
                res["mlp"].append(r)
            if device == "cuda":
                from dass.infer.accelerate import clear_graphs

                clear_graphs()
                torch.cuda.empty_cache()
            dump()
    if "e2e" in what:
        res["e2e"] = bench_e2e(timer, args.e2e_layers, [int(p) for p in args.e2e_prefill.split(",") if p],
                               args.e2e_decode_ctx, [int(b) for b in args.e2e_decode_batches.split(",")],
                               dtype, device, errors, tiny=args.dry_run)
    if device == "cuda":
        from dass.infer.accelerate import _PATH_CACHE, tuning_log

        res["autotune"] = tuning_log()
        res["paths"] = {" ".join(map(str, k[:4])): v for k, v in _PATH_CACHE.items()}
    dump()
    if args.out:
        print(f"wrote {args.out}")
    if errors:
        print(f"{len(errors)} variant(s) failed; see 'errors' in the JSON", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
