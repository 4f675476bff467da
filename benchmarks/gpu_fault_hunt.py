"""Find the launch that faults ("unspecified launch failure") in the 2:4 CUDA paths.

Round 5's decode run failed at batch 16 with every matrix 2:4 (attention too): the first
error surfaced in an unpack, which only reports an earlier kernel's fault. This script runs
each suspect launch alone, synchronising after each one, and names the first that fails:

  python benchmarks/gpu_fault_hunt.py sweep --out DIR   every candidate configuration of the
      attention shapes at 1-128 tokens (both orientations), the unpack, the module path
      (tuner, CUDA graph) at 16 and 1024 tokens, then a 2-layer 7B model at batch 16
  python benchmarks/gpu_fault_hunt.py one --case JSON   one launch (for compute-sanitizer)

On the first failure it writes DIR/fail.json (the case) and exits 3.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import random_24, rel_err  # noqa: E402

SHAPES = [("input", 4096, 4096), ("output", 4096, 4096), ("input", 4096, 11008), ("output", 22016, 4096)]
TOKENS = (1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 24, 32, 33, 48, 64, 100, 128)


def log(*a) -> None:
    print(*a, flush=True)


def _launch(case: dict, W: torch.Tensor, v: torch.Tensor, me: torch.Tensor, gen) -> float:
    """Run one case on the packed ``W`` and wait for it: its relative error against the dense
    product (the unpack: 0 when bit for bit, else inf)."""
    from dass.infer import cuda as cu

    o, N, K = case["orientation"], case["N"], case["K"]
    if case["config"] == "unpack":
        y = cu.unpack(v, me, N, K, o, torch.bfloat16)
        torch.cuda.synchronize()
        return 0.0 if torch.equal(y.view(torch.int16), W.view(torch.int16)) else float("inf")
    x = torch.randn(case["T"], K, device="cuda", generator=gen).to(torch.bfloat16)
    y = cu.mm(x, v, me, None, N, o, case["config"])
    torch.cuda.synchronize()
    return rel_err(y, x.float() @ W.float().T)


def run_case(case: dict) -> float:
    from dass.infer.cuda import layout as L

    gen = torch.Generator(device="cuda").manual_seed(0)
    W, m = random_24(case["N"], case["K"], case["orientation"], torch.bfloat16, "cuda", gen)
    v, me = L.pack(W, case["orientation"], m)
    return _launch(case, W, v, me, gen)


def _model(layers: int, scope: str, batch: int):
    """A ``layers``-layer 7B-shaped model pruned 2:4 everywhere, ``scope`` accelerated, and a
    64-token prompt at ``batch``."""
    from dass.infer.accelerate import accelerate
    from dass.infer.generate import prune_24, scope_manifest, synthetic_model

    model = synthetic_model("7b", layers, torch.bfloat16, "cuda")
    prune_24(model, "all", "dass")
    accelerate(model, manifest=scope_manifest(model, scope))
    ids = torch.randint(1, model.config.vocab_size, (1, 64)).expand(batch, -1).contiguous().cuda()
    return model, ids


def sweep(out: Path) -> int:
    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = bad = 0
    t0 = time.time()
    for o, N, K in SHAPES:
        W, m = random_24(N, K, o, torch.bfloat16, "cuda", gen)
        v, me = L.pack(W, o, m)
        cases = [{"orientation": o, "N": N, "K": K, "T": 0, "config": "unpack"}]
        cases += [{"orientation": o, "N": N, "K": K, "T": T, "config": c}
                  for T in TOKENS for c in cu.candidates(o, T, N, K, sms)]
        for case in cases:
            (out / "current.json").write_text(json.dumps(case))
            try:
                e = _launch(case, W, v, me, gen)
            except Exception as ex:  # noqa: BLE001
                log(f"FAULT {case}: {type(ex).__name__}: {str(ex)[:200]}")
                (out / "fail.json").write_text(json.dumps(case))
                return 3
            n += 1
            if not e < 1e-2:
                bad += 1
                log(f"WRONG {case}: {e:.2e}")
        log(f"{o} {N}x{K}: {len(cases)} launches done ({time.time() - t0:.0f} s)")
        del W, m, v, me
    log(f"kernel launches: {n}, wrong {bad}")

    # the module path: the tuner, the sliced / decompress paths, a CUDA graph replay
    from dass.infer.nm24_linear import NM24Linear

    for o, N, K in SHAPES[:2]:
        W, m = random_24(N, K, o, torch.bfloat16, "cuda", gen)
        mod = NM24Linear(W, None, o)
        for T in (1, 16, 64, 128, 129, 300, 1024):
            case = {"module": True, "orientation": o, "N": N, "K": K, "T": T}
            (out / "current.json").write_text(json.dumps(case))
            try:
                x = torch.randn(T, K, device="cuda", generator=gen).to(torch.bfloat16)
                y = mod(x)
                torch.cuda.synchronize()
                e = rel_err(y, x.float() @ W.float().T)
                if T <= 128:
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        mod(x)
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        yg = mod(x)
                    for _ in range(3):
                        g.replay()
                    torch.cuda.synchronize()
                    e = max(e, rel_err(yg, x.float() @ W.float().T))
            except Exception as ex:  # noqa: BLE001
                log(f"FAULT {case}: {type(ex).__name__}: {str(ex)[:200]}")
                (out / "fail.json").write_text(json.dumps(case))
                return 3
            log(f"module {o} {N}x{K} T={T}: rel err {e:.2e} ({time.time() - t0:.0f} s)")
        del mod, W, m
    return 0


def model_repro(out: Path, layers: int, batch: int, scope: str, backend: str | None) -> int:
    """A small 7B-shaped model, ``scope``'s matrices 2:4, eager then the fast loop at ``batch``."""
    from dass.infer.accelerate import tuning_log
    from dass.infer.generate import measure

    model, ids = _model(layers, scope, batch)
    t0 = time.time()
    step = "eager"
    try:
        with torch.no_grad():
            o = model(ids, use_cache=True)
            torch.cuda.synchronize()
            pkv = o.past_key_values
            nxt = o.logits[:, -1:].argmax(-1)
            for i in range(4):
                o = model(nxt, past_key_values=pkv, use_cache=True)
                nxt = o.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
        log(f"model eager B={batch}: ok ({time.time() - t0:.0f} s)")
        step = "fast"
        r = measure(model, ids, 16, "fast", 1, {"bandwidth": 3e12, "backend": backend})
        torch.cuda.synchronize()
        log(f"model fast B={batch} scope {scope} backend {backend}: ok, {r['tokens_per_s']:.0f} tok/s "
            f"({time.time() - t0:.0f} s)")
        rc = 0
    except Exception as ex:  # noqa: BLE001
        log(f"FAULT model {step} B={batch} scope {scope} backend {backend}: {type(ex).__name__}: {str(ex)[:300]}")
        (out / "fail.json").write_text(json.dumps({"model": step, "batch": batch, "layers": layers}))
        rc = 3
    for k, d in tuning_log().items():
        log(f"  tuned {k}: {d.get('path')} {d.get('config')}")
    return rc


def model_configs(out: Path, layers: int, batch: int, reps: int, force: dict | None = None,
                  max_configs: int = 0, backend: str | None = None) -> int:
    """Every candidate configuration of the attention matrices at ``batch`` tokens forced in
    turn (the other matrices keep their tuned ones), each a fresh compile of the fast loop
    (its graphs hold the launch parameters), ``reps`` loops each; stops at the first fault."""
    from dass.infer import cuda as cu
    from dass.infer import dispatch as dp
    from dass.infer.generate import measure, release_state, reset_compiled
    from dass.infer.nm24_linear import NM24Linear

    model, ids = _model(layers, "all", batch)
    mods = [m for m in model.modules() if isinstance(m, NM24Linear)]
    att = [m for m in mods if (m.out_features, m.in_features) == (4096, 4096)]
    for m in mods:
        m.decision(batch)
        m.decision(batch * 64)
    keys = [k for k in dp._DECISIONS if k[1:3] == (4096, 4096) and k[5] == dp.bucket(batch)]
    tuned = dict(dp._DECISIONS[keys[0]].config)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    first = force or tuned
    configs = [first] + [c for c in cu.candidates("input", batch, 4096, 4096, sms) if c != first]
    configs = configs[:max_configs] if max_configs else configs
    log(f"{len(att)} attention modules, {len(configs)} configurations (tuned first: {tuned})")
    t0 = time.time()
    for i, c in enumerate(configs):
        for k in keys:
            dp._DECISIONS[k].config = dict(c)
        for m in att:
            m._runners.clear()
        state = {"bandwidth": 3e12, "backend": backend}
        try:
            for _ in range(reps):
                r = measure(model, ids, 16, "fast", 1, state)
            torch.cuda.synchronize()
            log(f"  [{i}] {c}: ok {r['tokens_per_s']:.0f} tok/s ({time.time() - t0:.0f} s)")
        except Exception as ex:  # noqa: BLE001
            log(f"FAULT [{i}] {c}: {type(ex).__name__}: {str(ex)[:200]}")
            (out / "fail.json").write_text(json.dumps({"config": c, "batch": batch}))
            return 3
        release_state(state)
        reset_compiled(model)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["sweep", "one", "model", "configs"])
    ap.add_argument("--out", default="/tmp/fault_hunt")
    ap.add_argument("--case", default=None, help="one: the case JSON (a fail.json)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--force", default=None, help="configs: JSON of the configuration to run first")
    ap.add_argument("--max-configs", type=int, default=0)
    ap.add_argument("--no-cg-asserts", action="store_true")
    ap.add_argument("--reps", type=int, default=2, help="configs: fast loops per configuration")
    ap.add_argument("--scope", default="all", choices=["mlp", "attn", "all"])
    ap.add_argument("--backend", default=None, help="model: the fast loop's torch.compile backend")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.mode == "one":
        log(f"case {a.case}: rel err {run_case(json.loads(a.case)):.2e}")
        return 0
    if a.mode == "configs":
        if a.no_cg_asserts:  # compute-sanitizer: its allocations trip the pool check first
            import torch._inductor.config as ic

            ic.triton.slow_path_cudagraph_asserts = False
        return model_configs(out, a.layers, a.batch, a.reps, json.loads(a.force) if a.force else None,
                             a.max_configs, a.backend)
    if a.mode == "model":
        return model_repro(out, a.layers, a.batch, a.scope, a.backend)
    return sweep(out)


if __name__ == "__main__":
    raise SystemExit(main())
