"""Tune every 2:4 matrix shape of a 7B-shaped model (attention and MLP) at the given token
counts in a process of its own, into the on-disk tuning cache (DASS_TUNING_CACHE), so a later
decode benchmark replays the decisions instead of timing inside its process.

Why: in round 5 the fast decode loop at batch 16 faulted ("unspecified launch failure") in 3
of 4 runs whose tuning ran in the same process, and in none of 4 that read the decisions from
the cache (docs/speed.md, round 5); the cause is not found yet.

  python benchmarks/gpu_pretune.py --tokens 1,4,16,64,256,1024,4096
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    ap.add_argument("--size", default="7b")
    ap.add_argument("--fuse-qkv", action="store_true", help="also the stacked q/k/v shape (AccelerateConfig(fuse_qkv=True))")
    a = ap.parse_args(argv)
    from dass.infer.accelerate import AccelerateConfig, accelerate, tuning_log
    from dass.infer.generate import prune_24, scope_manifest, synthetic_model
    from dass.infer.nm24_linear import NM24Linear

    t0 = time.time()
    model = synthetic_model(a.size, 1, torch.bfloat16, "cuda")
    prune_24(model, "all", "dass")
    accelerate(model, manifest=scope_manifest(model, "all"), config=AccelerateConfig(fuse_qkv=a.fuse_qkv))
    tokens = [int(t) for t in a.tokens.split(",")]
    seen = set()
    for m in model.modules():
        if isinstance(m, NM24Linear) and (m.orientation, m.out_features, m.in_features) not in seen:
            seen.add((m.orientation, m.out_features, m.in_features))
            for T in tokens:
                m.decision(T)
    torch.cuda.synchronize()
    for k, d in tuning_log().items():
        print(f"  {k}: {d['path']} {d['config']} ({d['source']})")
    print(f"pretuned {len(seen)} shapes in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
