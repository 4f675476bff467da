"""Scaling of pruning across GPUs with torch.distributed (issue: several GPUs).

    python benchmarks/bench_distributed.py --shape 7b --layers 8 --nprocs 1,2,4 --out dist.json

For each K in --nprocs that the machine has GPUs for, launches
``torchrun --nproc-per-node K`` on this script's worker, which builds the same random
LLaMA-shaped model on every rank (bf16, on the GPU), shares 128 x 2048 random calibration
tokens, prunes with each method at 2:4 and reports the time on rank 0 and a digest of the
pruned weights. A plain single process (no torchrun) runs first as the reference: every
K must give the same digest (identical masks and weights). Prints a table, writes JSON.
On CPU it runs with gloo and the tiny shape (a smoke test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if "layers" in name and p.dim() == 2:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def worker(a: argparse.Namespace) -> None:
    import dass
    from bench_prune import calibration, config_for, init_weights
    from dass.run import distributed
    from transformers import LlamaForCausalLM

    ctx, device = distributed.init_from_env("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device or "cpu")
    cfg = config_for(a.shape, a.layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    init_weights(model, seed=0)
    ids = calibration(cfg, a.nsamples, a.seqlen)
    out = {}
    for method in a.methods.split(","):
        state = {k: v.clone() for k, v in model.state_dict().items()} if method != a.methods.split(",")[-1] else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if ctx.enabled:
            torch.distributed.barrier()
        t = time.perf_counter()
        rep = dass.prune(model, method, "2:4", calibration=ids, batch_size=a.batch_size, device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t
        out[method] = {"seconds": elapsed, "digest": digest(model), "sparsity": rep.sparsity}
        if state is not None:
            model.load_state_dict(state)
    if ctx.is_main:
        print("RESULT " + json.dumps({"world": ctx.world, "results": out}), flush=True)
    if ctx.enabled:
        torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a: argparse.Namespace, k: int | None) -> dict:
    base = [sys.executable]
    if k is not None:
        base += ["-m", "torch.distributed.run", "--nproc-per-node", str(k), "--master-port", str(_port())]
    cmd = base + [__file__, "--worker", "--shape", a.shape, "--layers", str(a.layers), "--methods", a.methods,
                  "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"K={k}: failed\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="7b" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--methods", default="dass,wanda,sparsegpt")
    ap.add_argument("--nprocs", default="1,2,4,8")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    gpus = torch.cuda.device_count()
    ks = [int(k) for k in a.nprocs.split(",")]
    runnable = [k for k in ks if (k <= gpus if gpus else k <= 2)]
    rows = [{"K": "single process", **launch(a, None)}]
    for k in runnable:
        rows.append({"K": k, **launch(a, k)})
    ref = rows[0]["results"]
    print(f"\n{a.shape} x {a.layers} layers, {a.nsamples} x {a.seqlen} tokens, 2:4; GPUs here: {gpus}; not run: {[k for k in ks if k not in runnable]}")
    print("| K | " + " | ".join(f"{m} s" for m in ref) + " | identical to single process |")
    print("|---|" + "---|" * (len(ref) + 1))
    for r in rows:
        same = all(r["results"][m]["digest"] == ref[m]["digest"] for m in ref)
        r["identical"] = same
        print(f"| {r['K']} | " + " | ".join(f"{r['results'][m]['seconds']:.2f}" for m in ref) + f" | {same} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"shape": a.shape, "layers": a.layers, "gpus": gpus, "rows": rows,
                                           "not_run": [k for k in ks if k not in runnable]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
