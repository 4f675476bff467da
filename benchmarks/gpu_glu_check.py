"""The register kernel's GLU epilogue and programmatic dependent launch (PDL) on the GPU:
correctness of every GLU configuration, then what each saves on a 7B GLU MLP.

    python3 benchmarks/gpu_glu_check.py --out glu_check.json [--tokens 1,2,9,16,33,64,128]

Correctness (every ``dass.infer.cuda.glu_candidates`` configuration, both orientations, with
and without bias, bf16 and fp16): ``act(g) * u`` from one launch against cuBLAS on the dense
stacked [gate; up] matrix, g and u rounded to 16 bits before the activation (what the
unfused path computes); each call repeated must give the same bits, and the same call
launched with PDL must give the same bits as without.

Timing (7B shapes, CUDA-graph replays cycling over copies of the weights so they cannot sit
in L2, all in this process): per token count, (a) the best plain register product of the
stacked gate+up plus the Triton activation kernel against the best GLU-epilogue launch, and
(b) the MLP block (GLU product then down) with PDL off and on, against cuBLAS on the dense
matrices with the same activation kernel.
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


def glu_ref(x: torch.Tensor, W: torch.Tensor, bias, act: str) -> torch.Tensor:
    """act(g) * u with g, u rounded to x's dtype first (fp32 out)."""
    gu = torch.nn.functional.linear(x.float(), W.float(), None if bias is None else bias.float()).to(x.dtype).float()
    D = W.shape[0] // 2
    g, u = gu[:, :D], gu[:, D:]
    a = g * torch.sigmoid(g) if act == "silu" else g * torch.sigmoid(1.5957691216057308 * (g + 0.044715 * g ** 3))
    return a * u


def check(shapes, tokens, dtypes, log) -> dict:
    from gpu_kernels import random_24, rel_err

    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    ext = cu.load()
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = bad = 0
    worst = 0.0
    failures = []
    for dtype in dtypes:
        for N, K in shapes:
            for orientation in ("input", "output"):
                W, m = random_24(N, K, orientation, dtype, "cuda", gen)
                v, me = L.pack(W, orientation, m)
                bias = (torch.randn(N, device="cuda", generator=gen) * 0.5).to(dtype)
                ori = 0 if orientation == "input" else 1
                for T in tokens:
                    x = (torch.randn(T, K, device="cuda", generator=gen) / K ** 0.5 * 2).to(dtype)
                    for act in ("silu", "gelu_tanh"):
                        for b in (None, bias):
                            ref = glu_ref(x, W, b, act)
                            for c in cu.glu_candidates(orientation, T, N, K):
                                if act == "gelu_tanh" and (b is not None or c["splits"] > 1):
                                    continue  # the activation alone: one unsplit call each
                                tag = f"{str(dtype)[6:]} {orientation} {N}x{K} T={T} {act} {c} bias={b is not None}"
                                args = (x, v, me, b, N, ori, c["mt"], c["ks"], c["splits"], c.get("wr", 4),
                                        c.get("wt", 1), 0, cu.GLU_ACTS[act])
                                y = ext.mm(*args, 0)
                                y2 = ext.mm(*args, 0)
                                y3 = ext.mm(*args, 1)
                                torch.cuda.synchronize()
                                e = rel_err(y, ref)
                                worst = max(worst, e)
                                same, pdl_same = torch.equal(y, y2), torch.equal(y, y3)
                                n += 1
                                if not (e < 1e-2 and same and pdl_same and y.shape == (T, N // 2)):
                                    bad += 1
                                    failures.append(f"{tag}: rel_err {e:.2e} repeat {same} pdl {pdl_same}")
                                    log(f"BAD {failures[-1]}")
    # the plain product with PDL: same bits as without
    for N, K in shapes[:1]:
        for orientation in ("input", "output"):
            W, m = random_24(N, K, orientation, torch.bfloat16, "cuda", gen)
            v, me = L.pack(W, orientation, m)
            for T in tokens:
                x = torch.randn(T, K, device="cuda", generator=gen).to(torch.bfloat16)
                for c in cu.candidates(orientation, T, N, K, wg=False):
                    if c["kind"] != "reg":
                        continue
                    args = (x, v, me, None, N, 0 if orientation == "input" else 1, c["mt"], c["ks"], c["splits"],
                            c.get("wr", 4), c.get("wt", 1), 0, -1)
                    y0, y1 = ext.mm(*args, 0), ext.mm(*args, 1)
                    torch.cuda.synchronize()
                    n += 1
                    if not torch.equal(y0, y1):
                        bad += 1
                        failures.append(f"plain {orientation} {N}x{K} T={T} {c}: PDL changed the bits")
                        log(f"BAD {failures[-1]}")
    return {"checks": n, "failed": bad, "worst_rel_err": worst, "failures": failures[:20]}


def _best(fns: dict, nc: int) -> tuple[str, float]:
    from dass.infer.kernels.tune import gpu_time

    times = {k: gpu_time(f, nc) * 1e3 for k, f in fns.items()}
    k = min(times, key=times.get)
    return k, times[k]


def timing(tokens, budget_s: float, log) -> list[dict]:
    from gpu_kernels import config_name, random_24

    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L
    from dass.infer.kernels import glu_act_mul
    from dass.infer.kernels.tune import copies_for, gpu_time

    ext = cu.load()
    gen = torch.Generator(device="cuda").manual_seed(1)
    d, D = 4096, 11008
    t0 = time.time()
    rows = []
    for orientation in ("output", "input"):  # DaSS prunes gate/up along the outputs, Wanda along the inputs
        Wgu, mgu = random_24(2 * D, d, orientation, torch.bfloat16, "cuda", gen)
        Wd, md = random_24(d, D, "input", torch.bfloat16, "cuda", gen)
        nc = copies_for(2 * D * d * 2 * 9 // 16)
        gus = [L.pack(Wgu, orientation, mgu) for _ in range(nc)]
        downs = [L.pack(Wd, "input", md) for _ in range(nc)]
        dense_gu = [Wgu.clone() for _ in range(min(nc, 4))]
        dense_d = [Wd.clone() for _ in range(min(nc, 4))]
        ori = 0 if orientation == "input" else 1
        for T in tokens:
            if time.time() - t0 > budget_s:
                log(f"timing budget reached before T={T} {orientation}")
                break
            x = torch.randn(T, d, device="cuda", generator=gen).to(torch.bfloat16)
            hx = torch.randn(T, D, device="cuda", generator=gen).to(torch.bfloat16)

            def plain(c, pdl=0):
                return lambda i: ext.mm(x, gus[i][0], gus[i][1], None, 2 * D, ori, c["mt"], c["ks"], c["splits"],
                                        c.get("wr", 4), c.get("wt", 1), 0, -1, pdl)

            def fused(c, pdl=0):
                return lambda i: ext.mm(x, gus[i][0], gus[i][1], None, 2 * D, ori, c["mt"], c["ks"], c["splits"],
                                        c.get("wr", 4), c.get("wt", 1), 0, 0, pdl)

            def down(c, h, pdl=0):
                return lambda i: ext.mm(h, downs[i][0], downs[i][1], None, d, 0, c["mt"], c["ks"], c["splits"],
                                        c.get("wr", 4), c.get("wt", 1), 0, -1, pdl)

            reg = [c for c in cu.candidates(orientation, T, 2 * D, d, wg=False) if c["kind"] == "reg"]
            pk, pt = _best({config_name(c): plain(c) for c in reg}, nc)
            gk_cands = cu.glu_candidates(orientation, T, 2 * D, d)
            if not gk_cands:
                log(f"{orientation} T={T}: no GLU configuration compiled for this bucket")
                continue
            gk, gt = _best({config_name(c): fused(c) for c in gk_cands}, nc)
            gu_out = torch.empty(T, 2 * D, device="cuda", dtype=torch.bfloat16)
            at = gpu_time(lambda i: glu_act_mul(gu_out, D, "silu"), 1) * 1e3
            dreg = [c for c in cu.candidates("input", T, d, D, wg=False) if c["kind"] == "reg"]
            dk, dt = _best({config_name(c): down(c, hx) for c in dreg}, nc)
            gc = next(c for c in gk_cands if config_name(c) == gk)
            dc = next(c for c in dreg if config_name(c) == dk)
            pc = next(c for c in reg if config_name(c) == pk)

            def block(pdl, fuse=True):
                def f(i):
                    if fuse:
                        h = fused(gc, pdl)(i)
                    else:
                        h = glu_act_mul(plain(pc, pdl)(i), D, "silu")
                    return down(dc, h, pdl)(i)
                return f

            blk = {name: gpu_time(fn, nc) * 1e3 for name, fn in
                   (("unfused", block(0, False)), ("fused", block(0)), ("fused_pdl", block(1)))}
            nd = len(dense_gu)

            def dense_block(i):
                gu = torch.nn.functional.linear(x, dense_gu[i])
                return torch.nn.functional.linear(glu_act_mul(gu, D, "silu"), dense_d[i])

            dense_us = gpu_time(dense_block, nd) * 1e3
            row = {"orientation": orientation, "T": T, "plain_gate_up_us": pt, "plain_config": pk, "act_us": at,
                   "glu_us": gt, "glu_config": gk, "down_us": dt, "down_config": dk, "block_unfused_us": blk["unfused"],
                   "block_fused_us": blk["fused"], "block_fused_pdl_us": blk["fused_pdl"], "block_dense_us": dense_us}
            rows.append(row)
            log(f"{orientation:6} T={T:3} | gate+up {pt:6.1f} + act {at:4.1f} vs GLU {gt:6.1f} ({gk}) | block "
                f"unfused {blk['unfused']:6.1f} fused {blk['fused']:6.1f} fused+PDL {blk['fused_pdl']:6.1f} "
                f"dense {dense_us:6.1f} -> {dense_us / blk['fused_pdl']:.2f}x")
        del gus, downs, dense_gu, dense_d
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="glu_check.json")
    ap.add_argument("--tokens", default="1,2,9,16,33,64,128")
    ap.add_argument("--time-tokens", default="1,4,16,64")
    ap.add_argument("--shapes", default="512x256,22016x4096")
    ap.add_argument("--budget-s", type=float, default=90)
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    from dass.infer import cuda as cu

    t = time.time()
    assert cu.load() is not None, cu.unavailable_reason()
    log(f"build/load {time.time() - t:.1f} s")
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    tokens = [int(v) for v in a.tokens.split(",")]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.time()
    res["check"] = check(shapes, tokens, (torch.bfloat16,), log)
    res["check_f16"] = check(shapes[:1], tokens[:3], (torch.float16,), log)
    log(f"checks: {res['check']['checks'] + res['check_f16']['checks']} products, "
        f"{res['check']['failed'] + res['check_f16']['failed']} bad, worst rel err "
        f"{max(res['check']['worst_rel_err'], res['check_f16']['worst_rel_err']):.2e} ({time.time() - t:.1f} s)")
    Path(a.out).write_text(json.dumps(res, indent=1))
    res["timing"] = timing([int(v) for v in a.time_tokens.split(",")], a.budget_s, log)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 1 if (res["check"]["failed"] or res["check_f16"]["failed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
