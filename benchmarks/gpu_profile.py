"""Launch each 2:4 kernel case once inside an NVTX range, for Nsight Compute (ncu).

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section ... \
        python benchmarks/gpu_profile.py [--cases 7b-gate+up-output-128-reg-mt1-ks2-s1,...]

Why: timing variants says *that* the 64-128-token kernels are slow; the hardware counters
(stall reasons, pipe and memory utilisation) say *why*. Each case is one NVTX range named
after it, inside a range ``prof``, around a single launch (dense cuBLAS cases are ``dense``), after an untimed
warm-up outside any range, so ncu's report lists exactly one kernel (plus a split-K finish
kernel) per case. ``--list`` prints the default cases and exits (no GPU needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"7b-gate+up": (22016, 4096), "7b-down": (4096, 11008)}
# (shape, orientation, T, config); config None = dense cuBLAS on the decompressed matrix
DEFAULT_CASES: tuple[tuple[str, str, int, dict | None], ...] = (
    # round 7: where 64-128 tokens lose (the best configurations of round 6 and split variants
    # that the in-kernel split-K finish makes cheap), each beside dense cuBLAS
    ("7b-gate+up", "input", 128, None),
    ("7b-gate+up", "input", 128, {"kind": "reg", "mt": 4, "ks": 2, "splits": 1, "wr": 2, "wt": 2}),
    ("7b-gate+up", "input", 128, {"kind": "reg", "mt": 2, "ks": 2, "splits": 1}),
    ("7b-gate+up", "input", 128, {"kind": "reg", "mt": 2, "ks": 2, "splits": 3}),
    ("7b-gate+up", "input", 128, {"kind": "wgs", "mt": 2, "wg": 2, "ks": 2, "ws": 0, "splits": 1}),
    ("7b-gate+up", "input", 64, {"kind": "reg", "mt": 2, "ks": 4, "splits": 1}),
    ("7b-gate+up", "input", 16, {"kind": "reg", "mt": 1, "ks": 4, "splits": 1}),
    ("7b-gate+up", "output", 128, {"kind": "reg", "mt": 1, "ks": 2, "splits": 1}),
    ("7b-down", "input", 128, None),
    ("7b-down", "input", 128, {"kind": "reg", "mt": 2, "ks": 2, "splits": 16}),
)


def case_name(shape: str, orientation: str, T: int, cfg: dict | None) -> str:
    from gpu_kernels import config_name

    return f"{shape}-{orientation}-{T}-" + ("dense" if cfg is None else config_name(cfg))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    cases = [(case_name(*c), c) for c in DEFAULT_CASES]
    if a.cases:
        want = set(a.cases.split(","))
        cases = [c for c in cases if c[0] in want]
    if a.list:
        print("\n".join(n for n, _ in cases))
        return 0
    from gpu_kernels import random_24, rel_err

    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    if cu.load() is None:
        print(f"kernels unavailable: {cu.unavailable_reason()}")
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed: dict = {}
    for name, (shape, orientation, T, cfg) in cases:
        N, K = SHAPES[shape]
        if (shape, orientation) not in packed:
            W, m = random_24(N, K, orientation, torch.bfloat16, "cuda", gen)
            packed[(shape, orientation)] = (W, *L.pack(W, orientation, m))
        W, v, me = packed[(shape, orientation)]
        x = torch.randn(T, K, device="cuda", generator=gen).to(torch.bfloat16)
        if cfg is None:
            fn = lambda: torch.nn.functional.linear(x, W)  # noqa: E731
        else:
            run = cu.runner(v, me, None, N, orientation, cfg)
            fn = lambda: run(x)  # noqa: E731
        y = fn()  # warm-up (outside the range)
        err = rel_err(y, x.float() @ W.float().T)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("prof")
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"{name}: rel_err {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
