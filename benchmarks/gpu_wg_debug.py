"""Which wgmma configurations run, each in a child process (a fault kills only the child):

    python benchmarks/gpu_wg_debug.py [--sanitize]

Prints one line per (configuration, descriptor reading): ok / wrong (relative error) /
crashed, and with --sanitize the memcheck report of the first crash.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def child(spec: str) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_kernels import random_24, rel_err

    from dass.infer import cuda as cu
    from dass.infer.cuda import layout as L

    c = json.loads(spec)
    N, K, T = c.pop("N"), c.pop("K"), c.pop("T")
    W, m = random_24(N, K, "output", torch.bfloat16, "cuda")
    v, me = L.pack(W, "output", m)
    x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
    y = cu.mm(x, v, me, None, N, "output", c)
    torch.cuda.synchronize()
    print("RESULT", rel_err(y, x.float() @ W.float().T), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--sanitize", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return 0
    cases = []
    for (mt, wg, ts, nt, ks) in [(2, 1, 1, 2, 2), (1, 2, 1, 4, 2), (1, 1, 1, 8, 2), (1, 1, 2, 16, 2), (2, 1, 2, 8, 2),
                                 (1, 1, 2, 16, 4)]:
        for swap in (0, 1):
            for splits in ((1, 2) if nt == 8 else (1,)):
                cases.append({"kind": "wg", "mt": mt, "wg": wg, "ts": ts, "ks": ks, "splits": splits, "swap": swap,
                              "N": 1024, "K": 1024, "T": nt * 8})
    first_crash = None
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    for c in cases:
        spec = json.dumps(c)
        r = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env,
                           timeout=120)
        res = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
        if res:
            e = float(res[0].split()[1])
            print(f"{'ok   ' if e < 1e-2 else 'WRONG'} {e:.3e} {spec}", flush=True)
        else:
            print(f"CRASH {spec}: {r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else r.returncode}",
                  flush=True)
            first_crash = first_crash or spec
    if a.sanitize and first_crash:
        r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--show-backtrace", "device", sys.executable,
                            __file__, "--child", first_crash], capture_output=True, text=True, timeout=240)
        print("=== memcheck", first_crash)
        print((r.stdout + r.stderr)[-5000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
