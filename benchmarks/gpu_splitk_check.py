"""Every register-kernel configuration with split-K, one product at a time, synchronised and
logged before and after, so a crash names the call that caused it (run with
``python -X faulthandler``; ``--sanitize`` runs a few under compute-sanitizer's memcheck).

    python -X faulthandler benchmarks/gpu_splitk_check.py [--tokens 1,16,128] [--limit N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,9,16,33,64,128")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many products (0: all)")
    ap.add_argument("--shapes", default="256x1024,4096x1408,1408x4096")
    a = ap.parse_args(argv)
    from gpu_kernels import random_24, rel_err

    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    assert cu.load() is not None, cu.unavailable_reason()
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = bad = 0
    for shp in a.shapes.split(","):
        N, K = map(int, shp.split("x"))
        for orientation in ("input", "output"):
            if orientation == "input" and K % 64 or orientation == "output" and N % 32:
                continue
            W, m = random_24(N, K, orientation, torch.bfloat16, "cuda", gen)
            v, me = L.pack(W, orientation, m)
            bias = torch.randn(N, device="cuda", generator=gen).to(torch.bfloat16)
            for T in map(int, a.tokens.split(",")):
                x = torch.randn(T, K, device="cuda", generator=gen).to(torch.bfloat16)
                ref = torch.nn.functional.linear(x.float(), W.float(), bias.float())
                for c in cu.candidates(orientation, T, N, K, wg=False):
                    if c["kind"] != "reg":
                        continue
                    for b in (None, bias):
                        tag = f"{orientation} {N}x{K} T={T} {c} bias={b is not None}"
                        print("call", tag, flush=True)
                        y = cu.mm(x, v, me, b, N, orientation, c)
                        torch.cuda.synchronize()
                        y2 = cu.mm(x, v, me, b, N, orientation, c)
                        torch.cuda.synchronize()
                        e = rel_err(y, ref if b is not None else ref - bias.float())
                        same = torch.equal(y, y2)
                        n += 1
                        if not (e < 1e-2 and same):
                            bad += 1
                            print(f"BAD {tag}: rel_err {e:.2e} repeat-identical {same}", flush=True)
                        if a.limit and n >= a.limit:
                            print(f"{n} products, {bad} bad (limit reached)")
                            return 1 if bad else 0
    print(f"{n} products, {bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
