"""One GPU session for the CUDA 2:4 kernels: build, check, sweep, JSON.

    python benchmarks/gpu_kernels.py --out $OUT/h200_kernels.json [--shapes 7b,13b,70b] [--budget-s 300]

1. builds the extension (dass.infer.cuda.load) and reports the build time;
2. probes the fragment layouts (dass.infer.cuda.layout.VALUE_LAYOUTS x META_LAYOUTS) on
   a small matrix and says which one the tensor cores read as intended (the default must);
3. checks every compiled configuration at every token bucket (T = 1..128, odd counts too),
   both orientations, bf16 and fp16, against cuBLAS on the dense matrix (relative error of
   the whole output < 1e-2; NaN fails), on fresh random data each time;
4. times, per matrix of the LLaMA shapes, dense cuBLAS and the fastest CUDA configuration
   (CUDA-graph replays cycling over copies of the weights so they cannot sit in L2), with
   the bytes each streams per call in TB/s, and writes the rows
   ``{"matrix", "orientation", "T", "dense_us", "sparse_us", "path", ...}`` to ``--out``.

The script prints a table last. ``--dry-run`` runs the argument handling and the table on
the CPU (no kernels), for the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {
    "7b": {"gate+up": (2 * 11008, 4096), "down": (4096, 11008)},
    "13b": {"gate+up": (2 * 13824, 5120), "down": (5120, 13824)},
    "70b": {"gate+up": (2 * 28672, 8192), "down": (8192, 28672)},
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
CHECK_TOKENS = (1, 2, 3, 4, 7, 8, 9, 16, 17, 32, 33, 64, 100, 128, 129, 300)  # past 128: slices


def random_24(N: int, K: int, orientation: str, dtype, device, gen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random 2:4 matrix (+0.0 at pruned places) and its keep-mask."""
    W = torch.randn(N, K, device=device, generator=gen).to(dtype)
    if orientation == "input":
        s = torch.rand(N, K // 4, 4, device=device, generator=gen).argsort(-1)[..., :2]
        m = torch.zeros(N, K // 4, 4, dtype=torch.bool, device=device).scatter_(-1, s, True).reshape(N, K)
    else:
        s = torch.rand(N // 4, K, 4, device=device, generator=gen).argsort(-1)[..., :2]
        m = torch.zeros(N // 4, K, 4, dtype=torch.bool, device=device).scatter_(-1, s, True)
        m = m.permute(0, 2, 1).reshape(N, K)
    return W.masked_fill(~m, 0), m


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def config_name(c: dict) -> str:
    """A short name of a launch configuration, e.g. ``smem-mt2-wn2-ks4-s3``."""
    if c.get("kind") == "wgs":
        return f"wgs-mt{c['mt']}-wg{c['wg']}-ks{c['ks']}{'-ws' if c.get('ws') else ''}-s{c['splits']}"
    wn = f"-wn{c['wn']}" if "wn" in c else (f"-wg{c['wg']}x{c.get('ts', 1)}" if "wg" in c else
                                           (f"-w{c['wr']}x{c['wt']}" if "wt" in c else ""))
    return f"{c.get('kind', 'reg')}{'-deep' if c.get('deep') else ''}-mt{c['mt']}{wn}-ks{c['ks']}-s{c['splits']}"


def probe_wg(swaps=(0, 1)) -> dict:
    """The wgmma kernel with the descriptor as documented (swap 0) and with its two byte
    offsets swapped (swap 1), on a small output-orientation matrix, every token width, with
    and without split-K. Run in a child process (``--probe-wg``): a kernel that faults
    poisons its CUDA context, and the rest of the run must survive that."""
    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    N, K = 1024, 1024
    W, m = random_24(N, K, "output", torch.bfloat16, "cuda")
    v, me = L.pack(W, "output", m)
    bias = torch.randn(N, device="cuda").to(torch.bfloat16)
    res: dict = {}
    for swap in swaps:
        errs = {}
        for T in (16, 32, 64, 128, 100):
            x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
            ref = torch.nn.functional.linear(x.float(), W.float(), bias.float())
            for c in cu.candidates("output", T, N, K, wg=True):
                if c["kind"] != "wg":
                    continue
                y = cu.mm(x, v, me, bias, N, "output", {**c, "swap": swap})
                torch.cuda.synchronize()
                errs[f"T{T}-{config_name(c)}"] = rel_err(y, ref)
        res[f"swap{swap}"] = {"max_err": max(errs.values()), "n": len(errs),
                              "worst": sorted(errs.items(), key=lambda kv: -kv[1])[:3]}
    return res


def run_wg_probe(log) -> dict:
    """probe_wg in a child process; sets cu.WG_SWAP, or turns the wgmma kernel off for this
    run (DASS_CUDA_WG=0) when neither descriptor reading gives the right product."""
    import os
    import subprocess

    from dass.infer import cuda as cu

    if not cu.wg_supported():
        return {"skipped": "no compute capability 9.0 GPU"}
    res: dict = {}
    for swap in (0, 1):  # the wrong reading may read out of range: each in its own child, 1 only if 0 fails
        try:
            r = subprocess.run([sys.executable, __file__, "--probe-wg", str(swap), "--out", "/dev/null"],
                               capture_output=True, text=True, timeout=300)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("WGPROBE ")]
            res.update(json.loads(line[-1][8:]) if line else {f"swap{swap}": {"error": f"rc={r.returncode}: "
                                                                                     f"{r.stderr[-600:]}"}})
        except subprocess.TimeoutExpired:
            res[f"swap{swap}"] = {"error": "timed out (a hang in the wgmma kernel)"}
        if res[f"swap{swap}"].get("max_err", 1.0) < 1e-2:
            break
    ok = [s for s in (0, 1) if res.get(f"swap{s}", {}).get("max_err", 1.0) < 1e-2]
    if 0 in ok:
        cu.WG_SWAP = 0
    elif ok:
        cu.WG_SWAP = 1
        log("WARNING: the wgmma descriptor reads its byte offsets swapped here; using swap=1 for the run")
    else:
        os.environ["DASS_CUDA_WG"] = "0"
        log("WARNING: the wgmma kernel is wrong or crashed in both descriptor readings; it is off for this run")
    res["used_swap"] = cu.WG_SWAP if ok else None
    log(f"wgmma probe: {res}")
    return res


def probe_wgs() -> dict:
    """The sparse-wgmma kernel (input orientation) on a small matrix, every token width, with
    and without split-K and bias, with the descriptor reading the wgmma probe settled on. Run
    in a child process (``--probe-wgs``) like probe_wg."""
    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    errs = {}
    for N, K in ((1024, 1024), (1040, 512)):  # 1040 rows: a last block with absent tiles
        W, m = random_24(N, K, "input", torch.bfloat16, "cuda")
        v, me = L.pack(W, "input", m)
        bias = torch.randn(N, device="cuda").to(torch.bfloat16)
        for T in (9, 16, 32, 64, 100, 128):
            x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
            ref = torch.nn.functional.linear(x.float(), W.float(), bias.float())
            for c in cu.candidates("input", T, N, K, wg=True):
                if c["kind"] != "wgs":
                    continue
                y = cu.mm(x, v, me, bias, N, "input", c)
                torch.cuda.synchronize()
                errs[f"{N}x{K}-T{T}-{config_name(c)}"] = rel_err(y, ref)
    return {"max_err": max(errs.values()) if errs else None, "n": len(errs),
            "worst": sorted(errs.items(), key=lambda kv: -kv[1])[:3]}


def run_wgs_probe(log) -> dict:
    """probe_wgs in a child process; turns the sparse-wgmma kernel off for this run
    (DASS_CUDA_WGS=0) when it is wrong or crashes."""
    import os
    import subprocess

    from dass.infer import cuda as cu

    if not cu.wgs_supported():
        return {"skipped": "no compute capability 9.0 GPU (or DASS_CUDA_WGS=0)"}
    try:
        r = subprocess.run([sys.executable, __file__, "--probe-wgs", "--out", "/dev/null"], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "DASS_WG_SWAP": str(cu.WG_SWAP)})
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("WGSPROBE ")]
        res = json.loads(line[-1][9:]) if line else {"error": f"rc={r.returncode}: {r.stderr[-600:]}"}
    except subprocess.TimeoutExpired:
        res = {"error": "timed out (a hang in the sparse-wgmma kernel)"}
    if not (res.get("max_err") is not None and res["max_err"] < 1e-2):
        os.environ["DASS_CUDA_WGS"] = "0"
        log("WARNING: the sparse-wgmma kernel is wrong or crashed; it is off for this run")
    log(f"sparse-wgmma probe: {res}")
    return res


def probe_layouts(log) -> dict:
    """Which (value layout, meta layout) gives the right product for the input orientation."""
    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    res = {}
    N, K = 64, 256
    W, m = random_24(N, K, "input", torch.bfloat16, "cuda")
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ W.float().T
    cfg = {"kind": "reg", "mt": 1, "ks": 2, "splits": 1}
    for vl in L.VALUE_LAYOUTS:
        for ml in L.META_LAYOUTS:
            v, me = L.pack(W, "input", m, vl, ml)
            y = cu.mm(x, v, me, None, N, "input", cfg)
            torch.cuda.synchronize()
            res[f"{vl}{ml}"] = rel_err(y, ref)
    # output orientation has one layout; check it too
    W, m = random_24(N, K, "output", torch.bfloat16, "cuda")
    ref = x.float() @ W.float().T
    v, me = L.pack(W, "output", m)
    res["output"] = rel_err(cu.mm(x, v, me, None, N, "output", cfg), ref)
    log(f"layout probe (relative error; < 1e-2 is right): {res}")
    return res


def check_all(dtypes, log) -> list[dict]:
    """Every compiled configuration at every token count, both orientations: error vs cuBLAS."""
    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"input": [(256, 1024), (4096, 1408)], "output": [(256, 1024), (1408, 4096)]}
    for orientation, shp in shapes.items():
        for dtype in dtypes:
            for N, K in shp:
                W, m = random_24(N, K, orientation, dtype, "cuda", gen)
                v, me = L.pack(W, orientation, m)
                same = torch.equal(cu.unpack(v, me, N, K, orientation, dtype).view(torch.int16), W.view(torch.int16))
                rows.append({"orientation": orientation, "dtype": str(dtype).split(".")[-1], "N": N, "K": K, "T": 0,
                             "config": "unpack", "bias": False, "rel_err": 0.0 if same else float("inf"),
                             "repeatable": True, "ok": same})
                bias = torch.randn(N, device="cuda", generator=gen).to(dtype)
                for T in CHECK_TOKENS:
                    x = torch.randn(T, K, device="cuda", generator=gen).to(dtype)
                    ref = torch.nn.functional.linear(x.float(), W.float(), bias.float())
                    for c in cu.candidates(orientation, T, N, K):
                        for b in (None, bias):
                            y = cu.mm(x, v, me, b, N, orientation, c)
                            r = ref if b is not None else ref - bias.float()
                            e = rel_err(y, r)
                            # split-K of the register, shared-memory and wgmma kernels adds in a
                            # fixed order: a second call must be bit-identical (which also shows the
                            # arrival counters were reset); the sparse-wgmma kernel adds with atomics
                            y2 = cu.mm(x, v, me, b, N, orientation, c)
                            same = bool(torch.equal(y, y2)) if c["kind"] != "wgs" else rel_err(y2, r) < 1e-2
                            rows.append({"orientation": orientation, "dtype": str(dtype).split(".")[-1], "N": N,
                                         "K": K, "T": T, "config": c, "bias": b is not None, "rel_err": e,
                                         "repeatable": same, "ok": e < 1e-2 and same})
    bad = [r for r in rows if not r["ok"]]
    log(f"correctness: {len(rows) - len(bad)}/{len(rows)} products within 1e-2 of cuBLAS"
        + ("" if not bad else f"; first failures: {bad[:5]}"))
    worst = max(r["rel_err"] for r in rows)
    log(f"correctness: worst relative error {worst:.2e}")
    return rows


def sweep(shapes, tokens, budget_s, t0, log) -> list[dict]:
    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L
    from dass.infer.kernels.tune import copies_for, gpu_time

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(1)
    for sname in shapes:
        for mname, (N, K) in SHAPES[sname].items():
            for orientation in ("input", "output"):
                if time.time() - t0 > budget_s:
                    log(f"budget reached: skipping {sname} {mname} {orientation} and later")
                    return rows
                W, m = random_24(N, K, orientation, torch.bfloat16, "cuda", gen)
                v, me = L.pack(W, orientation, m)
                del m
                dn = copies_for(N * K * 2)
                ws = [W] + [W.clone() for _ in range(dn - 1)]
                sn = copies_for(v.numel() * 4 + me.numel() * 4)
                ops = [(v, me)] + [(v.clone(), me.clone()) for _ in range(sn - 1)]
                unpack_us = gpu_time(lambda i: cu.unpack(ops[i][0], ops[i][1], N, K, orientation, torch.bfloat16),
                                     sn, reps=5) * 1e3
                log(f"  {sname:>3} {mname:>7} {orientation:>6} unpack to dense: {unpack_us:.1f} us "
                    f"({(L.packed_bytes(N, K) + 2 * N * K) / unpack_us / 1e6:.2f} TB/s read + write)")
                for T in tokens:
                    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, generator=gen)
                    ref = (x.float() @ W.float().T)
                    dense_ms = gpu_time(lambda i: torch.nn.functional.linear(x, ws[i]), dn, reps=7)
                    best, best_ms, times = None, float("inf"), {}
                    for c in cu.candidates(orientation, T, N, K, sms):
                        e = rel_err(cu.mm(x, v, me, None, N, orientation, c), ref)
                        if not e < 1e-2:
                            log(f"  WRONG {sname} {mname} {orientation} T={T} {c}: {e:.2e}")
                            continue
                        t = gpu_time(lambda i, c=c: cu.mm(x, ops[i][0], ops[i][1], None, N, orientation, c), sn, reps=7)
                        times[config_name(c)] = t * 1e3
                        if t < best_ms:
                            best, best_ms = c, t
                    io = (T * K + T * N) * 2
                    dense_b, sparse_b = N * K * 2 + io, L.packed_bytes(N, K) + io
                    row = {"shape": sname, "matrix": mname, "orientation": orientation, "N": N, "K": K, "T": T,
                           "dense_us": dense_ms * 1e3, "sparse_us": best_ms * 1e3,
                           "path": "cuda " + config_name(best) if best else "none",
                           "speedup": dense_ms / best_ms if best else 0.0,
                           "dense_tb_s": dense_b / dense_ms / 1e9, "sparse_tb_s": sparse_b / best_ms / 1e9 if best else 0.0,
                           "configs_us": times, "unpack_us": unpack_us,
                           "best_reg_us": min((t for k, t in times.items() if k.startswith("reg")), default=None),
                           "best_smem_us": min((t for k, t in times.items() if k.startswith("smem")), default=None),
                           "best_wg_us": min((t for k, t in times.items() if k.startswith("wg-")), default=None),
                           "best_wgs_us": min((t for k, t in times.items() if k.startswith("wgs-")), default=None)}
                    rows.append(row)
                    log(f"  {sname:>3} {mname:>7} {orientation:>6} T={T:<3} dense {row['dense_us']:7.1f} us "
                        f"({row['dense_tb_s']:.2f} TB/s)  cuda {row['sparse_us']:7.1f} us ({row['sparse_tb_s']:.2f} TB/s)"
                        f"  {row['speedup']:.2f}x  {row['path']}  (best reg {row['best_reg_us'] or 0:.1f}, smem "
                        f"{row['best_smem_us'] or 0:.1f}, wg {row['best_wg_us'] or 0:.1f}, wgs "
                        f"{row['best_wgs_us'] or 0:.1f} us)")
                del ws, ops, W, v, me
                torch.cuda.empty_cache()
    return rows


def copy_bandwidth() -> float:
    """Device-to-device copy rate (TB/s, bytes read + written) of a 2 GiB buffer."""
    a = torch.empty(2**30, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    return 10 * 2 * a.numel() * 2 / (s.elapsed_time(e) / 1e3) / 1e12


def table(rows: list[dict]) -> str:
    out = ["| shape | matrix | orientation | " + " | ".join(f"T={t}" for t in TOKENS) + " |",
           "|---|---|---|" + "---|" * len(TOKENS)]
    keys = sorted({(r["shape"], r["matrix"], r["orientation"]) for r in rows},
                  key=lambda k: (list(SHAPES).index(k[0]), k[1], k[2]))
    for k in keys:
        cells = []
        for t in TOKENS:
            r = next((r for r in rows if (r["shape"], r["matrix"], r["orientation"], r["T"]) == (*k, t)), None)
            cells.append(f"{r['speedup']:.2f}x" if r else "-")
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="7b,13b,70b")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--fp16", action="store_true", help="check fp16 too (bf16 always)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--probe-wg", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-wgs", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    tokens = [int(t) for t in a.tokens.split(",")]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    if a.dry_run:
        rows = [{"shape": "7b", "matrix": "down", "orientation": "input", "T": t, "dense_us": 1.0, "sparse_us": 1.0,
                 "speedup": 1.0, "path": "dry-run"} for t in tokens]
        out.write_text(json.dumps({"rows": rows, "dry_run": True}, indent=1))
        print(table(rows))
        return 0
    from dass.infer import cuda as cu

    if a.probe_wg is not None:
        cu.load()
        print("WGPROBE " + json.dumps(probe_wg((a.probe_wg,))), flush=True)
        return 0
    if a.probe_wgs:
        cu.load()
        print("WGSPROBE " + json.dumps(probe_wgs()), flush=True)
        return 0
    log(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    tb = time.time()
    ext = cu.load()
    log(f"build/load: {time.time() - tb:.1f} s; {'ok' if ext else 'FAILED: ' + str(cu.unavailable_reason())}")
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if ext is None:
        out.write_text(json.dumps({**result, "error": cu.unavailable_reason()}, indent=1))
        return 1
    result["copy_tb_s"] = copy_bandwidth()
    log(f"device copy: {result['copy_tb_s']:.2f} TB/s (read + write)")
    result["probe"] = probe_layouts(log)
    right = [k for k, e in result["probe"].items() if k != "output" and e < 1e-2]
    if "aa" not in right and right:
        from dass.infer.cuda import layout as L

        L.pack.__defaults__ = (None, right[0][0], right[0][1])  # the rest of this run uses the layout that works
        log(f"WARNING: the default layout 'aa' is wrong here; using {right[0]!r} for the rest of the run")
    result["layout_used"] = "aa" if "aa" in right else (right[0] if right else None)
    result["wg_probe"] = run_wg_probe(log)
    result["wgs_probe"] = run_wgs_probe(log)
    if not a.skip_check:
        checks = check_all([torch.bfloat16] + ([torch.float16] if a.fp16 else []), log)
        result["checks_passed"] = sum(r["ok"] for r in checks)
        result["checks_total"] = len(checks)
        result["checks_failed"] = [r for r in checks if not r["ok"]][:50]
        result["worst_rel_err"] = max(r["rel_err"] for r in checks)
    rows = sweep(shapes, tokens, a.budget_s, t0, log)
    result["rows"] = rows
    out.write_text(json.dumps(result, indent=1))
    log(table(rows))
    log(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
