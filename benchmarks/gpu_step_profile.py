"""Where a decoding step's time goes: GPU time per step of the fast loop by kernel kind,
dense against 2:4, next to the step's wall time.

    python3 benchmarks/gpu_step_profile.py --out step_profile.json [--batch 1] [--scopes dense,mlp,all]

Why: in round 5 the 2:4 products ran at 2.2-2.8 TB/s, yet the 7B step spent about 1.6 ms above
its bytes at the copy rate, dense and 2:4 alike (docs/speed.md). This script says which kernels
make up that time (the products, their split-K zero-fill and finish kernels, Inductor's fused
kernels, attention, cuBLAS, copies) and how much is no kernel at all (gaps between launches).

How: torch.profiler traces two calls of the loop, one with ``--steps`` more new tokens than the
other; their difference divided by ``--steps`` is one decoding step (the prefill and the first
token cancel). Kernels inside the step's CUDA graph are traced too. ``--dry-run`` checks the
code paths on the CPU with a tiny model (CPU operator times instead of kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# (category, pattern on the kernel or operator name), first match wins
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("2:4 products", r"nm24_kernel|nm24_smem|nm24_wg|dass::nm24_linear|nm24_mm"),
    ("split-K finish", r"finish_kernel"),
    ("zero-fill / memset", r"[Mm]emset|FillFunctor|aten::zero_|aten::fill_"),
    ("2:4 unpack", r"unpack_(in|out)"),
    ("attention", r"flash|fmha|sdpa|attention|aten::_scaled_dot"),
    ("dense GEMM", r"gemm|cutlass|xmma|nvjet|cublas|aten::mm|aten::addmm|aten::linear|aten::bmm|aten::matmul"),
    ("Inductor / Triton", r"^triton_|triton"),
    ("copies", r"[Mm]emcpy|copy|aten::copy_|aten::index"),
)


def category(name: str) -> str:
    """The kind of a kernel (or, on the CPU, an operator) by its name."""
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


def _events(prof, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, µs, count) of one trace: the kernels' device time on a GPU (not the operators
    that launched them, whose device time would count the same kernels twice), the
    operators' self CPU time on the CPU."""
    out = []
    for e in prof.key_averages():
        if cuda:
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0.0)
        else:
            if not e.key.startswith(("aten::", "dass::")):
                continue
            t = e.self_cpu_time_total
        if t:
            out.append((e.key, float(t), int(e.count)))
    return out


def _by_category(prof, cuda: bool) -> tuple[dict[str, float], dict[str, int]]:
    """µs and calls (launches on a GPU, operator calls on the CPU) per category in one trace."""
    us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for name, t, n in _events(prof, cuda):
        c = category(name)
        us[c] = us.get(c, 0.0) + t
        calls[c] = calls.get(c, 0) + n
    return us, calls


def _kernels(prof, cuda: bool, top: int = 12) -> list[dict[str, Any]]:
    rows = [{"name": name[:160], "category": category(name), "us": t, "count": n} for name, t, n in _events(prof, cuda)]
    return sorted(rows, key=lambda r: -r["us"])[:top]


def profile_phase(model, ids: torch.Tensor, steps: int, reps: int, cuda: bool, state: dict) -> dict[str, Any]:
    """One model phase (dense or accelerated): per-step µs by category, step wall ms."""
    from torch.profiler import ProfilerActivity, profile

    from dass.infer.generate import _fast

    fg = _fast(model, state)
    short, long = 2, 2 + steps
    for n in (short, long, short, long):  # compile, tune, record the step's graph
        fg.generate(ids, n)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()

    def wall(n: int) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fg.generate(ids, n)
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    step_ms = (wall(long) - wall(short)) / steps * 1e3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    traces = {}
    for n in (short, long):
        with profile(activities=acts) as prof:
            fg.generate(ids, n)
            sync()
        traces[n] = prof
    (a, ca), (b, cb) = _by_category(traces[short], cuda), _by_category(traces[long], cuda)
    per_step = {c: max(0.0, (b.get(c, 0.0) - a.get(c, 0.0)) / steps) for c in sorted(set(a) | set(b))}
    busy = sum(per_step.values())
    calls = {c: (cb.get(c, 0) - ca.get(c, 0)) / steps for c in sorted(set(ca) | set(cb))}
    return {"step_ms": step_ms, "per_step_us": per_step, "per_step_calls": calls, "busy_us": busy,
            "gap_us": max(0.0, step_ms * 1e3 - busy), "top_kernels_long_call": _kernels(traces[long], cuda)}


def run(args) -> dict[str, Any]:
    from dass.infer.accelerate import accelerate
    from dass.infer.generate import prune_24, release_state, reset_compiled, scope_manifest, synthetic_model
    from dass.infer.nm24_linear import NM24Linear

    cuda = args.device == "cuda"
    model = synthetic_model(args.size, args.layers, torch.bfloat16, args.device)
    prune_24(model, "all", "dass" if cuda else "wanda")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (1, args.prompt_len), generator=gen)
    ids = ids.expand(args.batch, -1).contiguous().to(args.device)
    res: dict[str, Any] = {"args": vars(args), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if cuda else "cpu", "phases": {}}
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    done: list[str] = []
    for scope in scopes:
        if scope != "dense":
            want = "mlp" if scope == "mlp" else ("attn" if "mlp" in done else "all")
            from dass.infer.accelerate import AccelerateConfig

            accelerate(model, manifest=scope_manifest(model, want), config=AccelerateConfig(fuse_qkv=args.fuse_qkv))
        state: dict[str, Any] = {"max_len": args.prompt_len + args.steps + 8, "backend": args.backend}
        r = profile_phase(model, ids, args.steps, args.reps, cuda, state)
        r["accelerated_modules"] = sum(isinstance(m, NM24Linear) for m in model.modules())
        res["phases"][scope] = r
        done.append(scope)
        print(f"{scope:>6}: step {r['step_ms']:.3f} ms, kernels {r['busy_us']:.0f} us, no kernel {r['gap_us']:.0f} us",
              flush=True)
        release_state(state)
        reset_compiled(model)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    return res


def table(res: dict[str, Any]) -> str:
    ph = res["phases"]
    order = [c for c, _ in CATEGORIES] + ["other"]
    cats = sorted({c for r in ph.values() for c in r["per_step_us"]}, key=order.index)
    out = ["| per step (µs) | " + " | ".join(ph) + " |", "|---|" + "---|" * len(ph)]
    for c in cats:
        out.append(f"| {c} | " + " | ".join(f"{r['per_step_us'].get(c, 0.0):.0f}" for r in ph.values()) + " |")
    out.append("| all kernels | " + " | ".join(f"{r['busy_us']:.0f}" for r in ph.values()) + " |")
    out.append("| no kernel (gaps) | " + " | ".join(f"{r['gap_us']:.0f}" for r in ph.values()) + " |")
    out.append("| step wall | " + " | ".join(f"{r['step_ms'] * 1e3:.0f}" for r in ph.values()) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (written after each phase)")
    ap.add_argument("--size", default="7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--scopes", default="dense,all", help="in order: dense, then mlp and/or all (accelerated in place)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16, help="the difference in new tokens between the two traced calls")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per length for the wall time (median)")
    ap.add_argument("--backend", default=None, help="torch.compile backend of the step (default: inductor on a GPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fuse-qkv", action="store_true", help="AccelerateConfig(fuse_qkv=True): attention q/k/v as one product")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks the code paths only")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.scopes.split(",")[0].strip() != "dense":
        ap.error("--scopes must start with dense (the model is accelerated in place)")
    if a.dry_run:
        from gpu_generate import _cpu_reference_path  # the 2:4 modules' CPU reference path

        a.device, a.size, a.layers = "cpu", "tiny", min(a.layers, 2)
        a.prompt_len, a.steps, a.reps = min(a.prompt_len, 8), min(a.steps, 3), 1
        a.backend = a.backend or "aot_eager"
        _cpu_reference_path()
    elif not torch.cuda.is_available():
        print("gpu_step_profile.py needs a CUDA GPU (use --dry-run to check the code paths on the CPU)", file=sys.stderr)
        return 2
    run(a)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
