"""``dass bench`` block- and model-level measurements: the dispatcher's choices over token
counts with the whole GLU MLP block (dense against 2:4 in DaSS's and Wanda's orientation),
the kernel-configuration search, and a LLaMA-shaped model end to end.

Models come from transformers (``LlamaMLP`` / ``LlamaForCausalLM`` built from a
``LlamaConfig``) and are pruned through :mod:`dass.arch`'s adapter, so no module name is
spelled here.
"""

from __future__ import annotations

import copy
import inspect
import statistics
from typing import Any

import torch

from dass.infer.bench_timing import Timer, safe
from dass.infer.generate import _magnitude24, prune_24

__all__ = ["make_mlps", "bench_mlp", "bench_dispatch", "bench_kernels", "bench_e2e", "bench_host"]

VARIANTS = (("wanda", "input"), ("dass", "output"))  # name -> orientation of gate/up


def make_mlps(d: int, D: int, dtype, device, seed: int = 0) -> dict[str, torch.nn.Module]:
    """transformers' LlamaMLP (SiLU GLU) with random weights: dense, and 2:4 copies with
    gate/up pruned along the inputs (``wanda``) or outputs (``dass``), down along the inputs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from dass.arch import glu_children

    torch.manual_seed(seed)
    dense = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=D)).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.02)
    out = {"dense": dense}
    for name, go in VARIANTS:
        m = copy.deepcopy(dense)
        kids = glu_children(m)
        with torch.no_grad():
            for child, o in ((kids.gate, go), (kids.up, go), (kids.down, "input")):
                _magnitude24(getattr(m, child).weight, o)
        out[name] = m
    return out


def bench_mlp(timer: Timer, d: int, D: int, tokens: list[int], dtype, device, errors: list, log=print) -> list[dict]:
    """The MLP block called eagerly (what a user's Python gets), dense against accelerated."""
    mlps = make_mlps(d, D, dtype, device)
    acc = {}
    if device == "cuda":
        from dass.infer.accelerate import accelerate

        for name, _ in VARIANTS:
            acc[name] = safe(lambda: (accelerate(mlps[name]), mlps[name])[1], errors, f"accelerate {name} {d}x{D}")
    rows = []
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, d, device=device, dtype=dtype)
            row: dict[str, Any] = {"d": d, "D": D, "T": T}
            row["dense_eager_ms"] = safe(lambda: timer.eager(lambda i: mlps["dense"](x)), errors, f"mlp dense {d} T={T}")
            row["dense_graph_ms"] = safe(lambda: timer.graph(lambda i: mlps["dense"](x)), errors, f"mlp dense graph {d} T={T}")
            for name, m in acc.items():
                if m is not None:
                    row[f"{name}_eager_ms"] = safe(lambda: timer.eager(lambda i: m(x)), errors, f"mlp {name} {d} T={T}")
            rows.append(row)
            log(_fmt_mlp(row))
    return rows


def _fmt_mlp(r: dict) -> str:
    def us(v):
        return f"{v * 1e3:9.1f}" if isinstance(v, (int, float)) else f"{'-':>9}"

    def x(a, b):
        return f"{a / b:5.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else "    - "

    de = r.get("dense_eager_ms")
    return (f"  MLP d={r['d']:<5} D={r['D']:<6} T={r['T']:<6} dense eager {us(de)} graph {us(r.get('dense_graph_ms'))} | "
            + " | ".join(f"{n} eager {us(r.get(f'{n}_eager_ms'))} {x(de, r.get(f'{n}_eager_ms'))}" for n, _ in VARIANTS))


def _mlp_modules(mlp) -> dict[str, Any]:
    from dass.infer.nm24_linear import NM24Linear

    return {n: m for n, m in mlp.named_modules() if isinstance(m, NM24Linear)}


def bench_dispatch(timer: Timer, d: int, D: int, tokens: list[int], dtype, device, errors: list,
                   log=print, on_row=None, keep_dense: bool = False) -> list[dict[str, Any]]:
    """For each token count: what the dispatcher chose for every accelerated matrix of the MLP
    (all paths' GPU times against dense cuBLAS), and the whole block's GPU time (CUDA-graph
    replay) dense against accelerated in both orientations. ``keep_dense``: accelerate with
    ``AccelerateConfig(keep_dense=True)``, so cuBLAS on a dense copy is one of the paths."""
    from dass.infer.accelerate import accelerate
    from dass.infer.config import AccelerateConfig

    mlps = make_mlps(d, D, dtype, device)
    cfg = AccelerateConfig(keep_dense=keep_dense)
    acc = {name: safe(lambda: (accelerate(mlps[name], config=cfg), mlps[name])[1], errors, f"accelerate {name}")
           for name, _ in VARIANTS}
    rows = []
    log(f"{'T':>6} | {'dense MLP us':>12} | " + " | ".join(f"{n} MLP us (x)".rjust(20) for n, _ in VARIANTS)
        + " | per matrix: path, its time / dense time (us)")
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, d, device=device, dtype=dtype)
            row: dict[str, Any] = {"T": T, "d": d, "D": D, "matrices": {}}
            row["dense_graph_ms"] = safe(lambda: timer.graph(lambda i: mlps["dense"](x)), errors, f"dense mlp T={T}")
            for name, m in acc.items():
                if m is None:
                    continue
                for mname, mod in _mlp_modules(m).items():
                    dec = safe(lambda: mod.decision(T).as_dict(), errors, f"decide {name} {mname} T={T}")
                    if dec:
                        row["matrices"][f"{name}.{mname} {mod.orientation} {mod.out_features}x{mod.in_features}"] = dec
                row[f"{name}_graph_ms"] = safe(lambda: timer.graph(lambda i: m(x)), errors, f"{name} mlp T={T}")
            rows.append(row)
            log(_fmt_dispatch(row))
            if on_row is not None:  # the caller saves as it goes (a time box may stop the run)
                on_row(row)
    return rows


def _fmt_dispatch(r: dict) -> str:
    dg = r.get("dense_graph_ms")
    parts = [f"{r['T']:>6}", f"{dg * 1e3:12.1f}" if dg else f"{'-':>12}"]
    for n, _ in VARIANTS:
        v = r.get(f"{n}_graph_ms")
        parts.append(f"{v * 1e3:10.1f} ({dg / v:5.2f}x)".rjust(20) if v and dg else f"{'-':>20}")
    mats = []
    for k, dec in r["matrices"].items():
        t, dm = dec["times_ms"].get(dec["path"]), dec.get("dense_ms")
        mats.append(f"{k.split(' ')[0]}:{dec['path']} {t * 1e3:.1f}/{dm * 1e3:.1f}" if t and dm else f"{k}:{dec['path']}")
    return " | ".join(parts) + " | " + "; ".join(mats)


def bench_kernels(timer: Timer, d: int, D: int, tokens: list[int], dtype, device, errors: list, log=print) -> list[dict]:
    """The launch-configuration search of the Triton kernels (every candidate's time) for the
    MLP's matrices (gate, stacked gate+up, down; both orientations where they apply)."""
    from dass.infer.kernels import to_kernel_layout
    from dass.infer.kernels.tune import tune_kernel

    rows = []
    for kind, o, N, K in (("gate+up", "output", 2 * D, d), ("gate+up", "input", 2 * D, d), ("down", "input", d, D)):
        W = torch.randn(N, K, device=device, dtype=dtype) * 0.02
        _magnitude24(W, o)
        values, meta = to_kernel_layout(W, o)
        dense = torch.nn.functional.linear
        for T in tokens:
            x = torch.randn(T, K, device=device, dtype=dtype)
            dms = safe(lambda: timer.graph(lambda i: dense(x, W)), errors, f"dense {kind} T={T}")
            res = safe(lambda: tune_kernel(values, meta, N, K, o, T), errors, f"tune {kind} {o} T={T}")
            if not res:
                continue
            row = {"kind": kind, "orientation": o, "N": N, "K": K, "T": T, "dense_graph_ms": dms, **res}
            rows.append(row)
            if res["best_ms"] and dms:
                log(f"  kernels {kind:7} {o:6} {N}x{K} T={T:<5} dense {dms * 1e3:8.1f} us, best 2:4 {res['best_ms'] * 1e3:8.1f} us "
                    f"({dms / res['best_ms']:.2f}x) {res['best']}")
        del W, values, meta
    return rows


def _host_us(fn, calls: int = 400) -> float:
    """Host microseconds per call of ``fn`` (GPU work small enough that the queue never fills)."""
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return host


def bench_host(tokens: list[int], dtype, device, errors: list, log=print) -> list[dict[str, Any]]:
    """Host time per call (what bounds eager ``generate()``): a dense ``nn.Linear`` against an
    ``NM24Linear`` on each path, and a dense ``LlamaMLP`` against accelerated ones (whole-MLP
    graph replay), on a 256x704 MLP whose GPU work is a few microseconds."""
    from dass.infer.accelerate import AccelerateConfig, accelerate
    from dass.infer.nm24_linear import NM24Linear

    mlps = make_mlps(256, 704, dtype, device)
    dense_lin = torch.nn.Linear(256, 704, bias=False, device=device, dtype=dtype)
    rows = []
    from dass.arch import glu_children

    gate = getattr(mlps["dass"], glu_children(mlps["dass"]).gate).weight.detach()  # 2:4 along the outputs
    for name, _ in VARIANTS:
        safe(lambda: accelerate(mlps[name], config=AccelerateConfig(tuning_cache=False)), errors, f"host accelerate {name}")
    for T in tokens:
        x = torch.randn(T, 256, device=device, dtype=dtype)
        row: dict[str, Any] = {"T": T, "dense_linear_us": _host_us(lambda: dense_lin(x))}
        for path in ("triton", "decompress", "dense"):
            cfg = AccelerateConfig(autotune=False, keep_dense=path == "dense", tuning_cache=False,
                                   triton_max_tokens={"input": 10**9 if path == "triton" else 0,
                                                      "output": 10**9 if path == "triton" else 0})
            mod = safe(lambda: NM24Linear(gate, None, "output", cfg), errors, f"host module {path}")
            if mod is not None:
                row[f"nm24_{path}_us"] = safe(lambda: _host_us(lambda: mod(x)), errors, f"host {path} T={T}")
        with torch.inference_mode():
            row["dense_mlp_us"] = _host_us(lambda: mlps["dense"](x))
            for name, _ in VARIANTS:
                row[f"{name}_mlp_us"] = safe(lambda: _host_us(lambda: mlps[name](x)), errors, f"host mlp {name} T={T}")
        rows.append(row)
        log("  host us/call T=%-4d " % T + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in row.items() if k != "T" and v))
    return rows


def bench_e2e(timer: Timer, layers: int, prefill: list[int], decode_ctx: int, decode_batches: list[int],
              dtype, device, errors: list, tiny: bool = False, log=print, scope: str = "mlp") -> dict[str, Any]:
    """A LLaMA-2-7B-shaped LlamaForCausalLM (``layers`` decoder layers, random weights):
    dense vs DaSS-like (gate/up 2:4 along outputs, down along inputs) vs Wanda-like (all
    2:4 along inputs), the sparse ones accelerated. ``scope="all"``: the attention
    projections are 2:4 (along their inputs) and accelerated too."""
    from dass.infer.generate import synthetic_model

    base = synthetic_model("tiny" if tiny else "7b", layers, dtype, device)
    models = {"dense": base}
    for name, _ in VARIANTS[::-1]:
        m = copy.deepcopy(base)
        prune_24(m, scope, name)
        if device == "cuda":
            from dass.infer.accelerate import accelerate

            if safe(lambda: accelerate(m), errors, f"accelerate e2e {name}") is None:
                continue
        models[name] = m
    cfg = base.config
    out: dict[str, Any] = {"layers": layers, "scope": scope, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                           "prefill": {}, "decode_eager": {}, "decode_graph": {}}
    fwd_params = inspect.signature(base.forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"

    def kv(output):
        return output.cache if "cache" in getattr(output, "keys", lambda: ())() else output.past_key_values

    def fwd(m, ids, **kw):
        try:
            return m(ids, logits_to_keep=1, **kw)
        except TypeError:
            return m(ids, **kw)

    vocab = cfg.vocab_size
    with torch.inference_mode():
        for P in prefill:
            ids = torch.randint(0, vocab, (1, P), device=device)
            for name, m in models.items():
                out["prefill"].setdefault(str(P), {})[name] = safe(
                    lambda: timer.eager(lambda i: fwd(m, ids, use_cache=False)), errors, f"prefill {name} {P}")
            log(f"  prefill {P}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in out["prefill"][str(P)].items() if v))
        ctx = torch.randint(0, vocab, (1, max(decode_ctx, 1)), device=device)
        nxt = torch.randint(0, vocab, (1, 1), device=device)
        for name, m in (models.items() if decode_ctx > 0 else ()):
            def run():
                step = lambda cache: fwd(m, nxt, **{cache_kw: cache}, use_cache=True)  # noqa: E731
                step(kv(fwd(m, ctx, use_cache=True)))  # warm-up
                times = []
                for _ in range(timer.reps):
                    cache = kv(fwd(m, ctx, use_cache=True))  # fresh cache of decode_ctx tokens
                    times.append(timer._loop_ms(lambda: [step(cache) for _ in range(8)]) / 8)
                return statistics.median(times)
            out["decode_eager"][name] = safe(run, errors, f"decode eager {name}")
        log(f"  decode eager (1 token, ctx {decode_ctx}): "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in out["decode_eager"].items() if v))
    if device == "cuda":
        with torch.no_grad():
            for B in decode_batches:
                ids = torch.randint(0, vocab, (B, 1), device=device)
                for name, m in models.items():
                    out["decode_graph"].setdefault(str(B), {})[name] = safe(
                        lambda: timer.graph(lambda i: fwd(m, ids, use_cache=False)), errors, f"decode graph {name} B={B}")
                log(f"  decode graph B={B}: " + ", ".join(
                    f"{k} {v:.3f} ms" for k, v in out["decode_graph"][str(B)].items() if v))
    return out
