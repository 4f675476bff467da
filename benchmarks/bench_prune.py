"""Pruning cost on LLaMA-2-shaped random models: time, device memory, host memory.

For each shape (LLaMA-2-7B, 13B, a few layers of 70B; ``tiny`` for a CPU smoke test) and
method, at 2:4 in bf16 with N x L random calibration tokens:

- ``memory`` mode: the model resident on the device, pruned by ``dass.prune``; the time of
  two plain forward passes of the calibration batch through the decoder is measured in
  the same run, and the pruning time is split into capture / statistics pass / pruning
  maths / reconstruction / propagation (CUDA events, see ``dass.run.layer.profile_summary``);
- ``stream`` mode: the model written as bf16 safetensors shards and pruned from disk to
  disk by ``dass.run.streaming.prune_checkpoint`` in a child process, which reports its peak
  RSS (sampled in a thread) and peak device memory;
- ``--resume-test``: a streaming run killed half-way (``--die-after`` in a child process),
  restarted, and compared byte for byte with an uninterrupted run.

Prints a table and writes JSON (``--out``). Not a test: nothing here runs in CI.

    python benchmarks/bench_prune.py --shape 7b --mode memory --out bench.json
    python benchmarks/bench_prune.py --shape 70b --layers 2 --mode stream
    python benchmarks/bench_prune.py --shape tiny --mode both --resume-test   # CPU smoke test
"""

from __future__ import annotations

import argparse
import filecmp
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}
GB = 1e9


def log(*a):
    print(*a, flush=True)


def config_for(shape: str, layers: int | None):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(**kw, max_position_embeddings=4096, tie_word_embeddings=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration(cfg, n, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (n, L), generator=g)


def init_weights(model, seed=0):
    """Deterministic random weights (normal 0.02; norms 1), on the model's device."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)


def layer_bytes(cfg, dtype=torch.bfloat16):
    d, D, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    kv = cfg.num_key_value_heads * (d // h)
    return (2 * d * d + 2 * d * kv + 3 * d * D + 2 * d) * dtype.itemsize


# --------------------------------------------------------------------------------------
# In-memory: model resident on the device
# --------------------------------------------------------------------------------------


def bench_memory(shape, cfg, methods, ids, device, batch_size, dtype, reconstruct=None):
    import dass
    from dass.run.layer import profile_summary
    from transformers import LlamaForCausalLM

    rows = []
    t = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    init_weights(model)
    sync(device)
    log(f"[{shape}] built on {device} in {time.perf_counter() - t:.1f} s")
    batches = list(ids.split(batch_size))

    def forward_twice():
        with torch.no_grad():
            for _ in range(2):
                for b in batches:
                    model.model(input_ids=b.to(device), use_cache=False)
        sync(device)

    with torch.no_grad():  # warm-up: kernels, cuBLAS handles
        model.model(input_ids=batches[0][:1].to(device), use_cache=False)
    sync(device)
    t = time.perf_counter()
    forward_twice()
    fwd2 = time.perf_counter() - t
    log(f"[{shape}] two plain forward passes: {fwd2:.2f} s")
    for method in methods:
        init_weights(model)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        profile: list = []
        sync(device)
        t = time.perf_counter()
        rep = dass.prune(model, method, "2:4", "mlp", calibration=ids, batch_size=batch_size, device=device,
                         progress=False, profile=profile, reconstruct=reconstruct)
        sync(device)
        total = time.perf_counter() - t
        phases = profile_summary(profile)
        forward = phases["observe"] + phases["propagate"]
        row = {
            "shape": shape, "mode": "memory", "method": method, "layers": cfg.num_hidden_layers,
            "forward2_s": fwd2, "total_s": total, "capture_s": rep.capture_seconds, **{f"{k}_s": v for k, v in phases.items()},
            "excl_forward_s": total - forward - rep.capture_seconds,
            "ratio_to_forward2": total / fwd2,
            "peak_device_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
            "sparsity": rep.sparsity, "notes": rep.notes, "reconstruct": rep.reconstruct,
            "block_loss_before": sum(b["loss_before"] for b in rep.blocks) / max(len(rep.blocks), 1),
            "block_loss_after": sum(b["loss_after"] for b in rep.blocks) / max(len(rep.blocks), 1),
        }
        rows.append(row)
        log(f"[{shape}] {method}: {total:.2f} s ({total / fwd2:.2f} x fwd2), phases " +
            ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + f", capture {rep.capture_seconds:.2f}")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------
# Streaming: from disk, in a child process
# --------------------------------------------------------------------------------------


def write_checkpoint(cfg, path: Path, device, dtype=torch.bfloat16, seed=0):
    """Random bf16 weights written as one safetensors shard per layer (plus the rest)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from dass.run.streaming import parameters_on_meta

    path.mkdir(parents=True, exist_ok=True)
    with parameters_on_meta():
        skeleton = LlamaForCausalLM(cfg)
    cfg.dtype = dtype
    cfg.save_pretrained(path)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, p in skeleton.named_parameters():
        parts = name.split(".")
        key = f"layer{int(parts[2]):05d}" if name.startswith("model.layers.") else "other"
        groups.setdefault(key, []).append((name, p.shape))
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, key in enumerate(sorted(groups)):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in groups[key]:
            t = torch.empty(shape, device=device, dtype=torch.float32)
            t.normal_(0, 0.02, generator=gen) if len(shape) > 1 else t.fill_(1.0)
            tensors[name] = t.to(dtype).cpu()
            total += tensors[name].numel() * dtype.itemsize
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def child_stream(args):
    """Runs in a child process: one streaming run, JSON on the last line."""
    from dass.run.memory import RSSSampler, peak_rss_bytes, rss_bytes
    from dass.run.streaming import prune_checkpoint
    from transformers import LlamaForCausalLM  # noqa: F401 - imports before the baseline

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context before the baseline
    ids = calibration(argparse.Namespace(vocab_size=args.vocab), args.nsamples, args.seqlen)
    base = rss_bytes()
    t = time.perf_counter()
    # RSS sampled in a thread: ru_maxrss of a child started by vfork+exec includes the
    # parent's peak RSS, so it is only an upper bound here
    with RSSSampler(0.005) as rss:
        def crash(layer):  # the resume test: die after that layer's shard is written
            if layer == args.die_after:
                os._exit(17)

        rep = prune_checkpoint(args.src, args.dst, args.method, "2:4", "mlp", ids, device=device, batch_size=args.batch_size,
                               activations=args.activations, progress=False, checkpoint_seconds=args.checkpoint_seconds,
                               after_layer=crash if args.die_after >= 0 else None)
        sync(device)
    total = time.perf_counter() - t
    print(json.dumps({
        "total_s": total, "capture_s": rep.capture_seconds, "layer_s": rep.layer_seconds,
        "peak_rss_gb": rss.peak / GB, "ru_maxrss_gb": peak_rss_bytes() / GB, "base_rss_gb": base / GB,
        "peak_device_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
        "notes": rep.notes,
    }))


def run_child(src, dst, method, a, die_after=-1, checkpoint_seconds=60.0):
    cmd = [sys.executable, __file__, "--child-stream", "--src", str(src), "--dst", str(dst), "--method", method,
           "--device", a.device, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size),
           "--activations", a.activations, "--vocab", str(a.vocab), "--checkpoint-seconds", str(checkpoint_seconds),
           "--die-after", str(die_after)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    out = None
    for line in reversed(res.stdout.strip().splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            break
    return res.returncode, out, res.stderr[-3000:]


def same_files(a: Path, b: Path) -> tuple[bool, list[str]]:
    names = sorted(p.name for p in a.iterdir() if p.name != "dass.json")
    if names != sorted(p.name for p in b.iterdir() if p.name != "dass.json"):
        return False, ["file lists differ"]
    with ThreadPoolExecutor(8) as ex:
        same = list(ex.map(lambda n: filecmp.cmp(a / n, b / n, shallow=False), names))
    ma, mb = (json.loads((d / "dass.json").read_text())["matrices"] for d in (a, b))
    bad = [n for n, s in zip(names, same) if not s] + ([] if ma == mb else ["dass.json matrices"])
    return not bad, bad


def bench_stream(shape, cfg, methods, a, work: Path, resume_test: bool):
    rows = []
    src = work / f"{shape}-src"
    shutil.rmtree(src, ignore_errors=True)
    t = time.perf_counter()
    size = write_checkpoint(cfg, src, torch.device(a.device))
    log(f"[{shape}] wrote {size / GB:.2f} GB checkpoint ({cfg.num_hidden_layers} layers) in {time.perf_counter() - t:.1f} s")
    lb = layer_bytes(cfg)
    acts = a.nsamples * a.seqlen * cfg.hidden_size * 2
    a.vocab = cfg.vocab_size
    keep = None
    for method in methods:
        dst = work / f"{shape}-{method}"
        shutil.rmtree(dst, ignore_errors=True)
        rc, out, err = run_child(src, dst, method, a)
        if rc != 0 or out is None:
            log(f"[{shape}] stream {method} FAILED rc={rc}\n{err}")
            rows.append({"shape": shape, "mode": "stream", "method": method, "error": err[-500:]})
            continue
        layers = out["layer_s"]
        row = {
            "shape": shape, "mode": "stream", "method": method, "layers": cfg.num_hidden_layers,
            "total_s": out["total_s"], "capture_s": out["capture_s"],
            "per_layer_s": sum(layers) / max(len(layers), 1),
            "peak_device_gb": out["peak_device_gb"], "peak_rss_gb": out["peak_rss_gb"], "base_rss_gb": out["base_rss_gb"],
            "ru_maxrss_gb": out.get("ru_maxrss_gb"),
            "layer_gb": lb / GB, "activations_gb": acts / GB,
            "rss_over_layer_plus_acts": out["peak_rss_gb"] / ((lb + acts) / GB),
            "rss_growth_over_layer_plus_acts": (out["peak_rss_gb"] - out["base_rss_gb"]) / ((lb + acts) / GB),
            "notes": out["notes"],
        }
        rows.append(row)
        log(f"[{shape}] stream {method}: {out['total_s']:.1f} s, {row['per_layer_s']:.2f} s/layer, device peak "
            f"{out['peak_device_gb'] or 0:.1f} GB, RSS peak {out['peak_rss_gb']:.2f} GB (base {out['base_rss_gb']:.2f}); "
            f"layer {lb / GB:.2f} GB + activations {acts / GB:.2f} GB")
        if resume_test and keep is None:
            keep = (method, dst)
        else:
            shutil.rmtree(dst, ignore_errors=True)
    if resume_test and keep is not None:
        method, whole = keep
        dst = work / f"{shape}-{method}-resumed"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(Path(str(dst) + ".partial"), ignore_errors=True)
        k = cfg.num_hidden_layers // 2
        t = time.perf_counter()
        cs = a.checkpoint_seconds
        rc1, _, err1 = run_child(src, dst, method, a, die_after=k, checkpoint_seconds=cs)
        t1 = time.perf_counter() - t
        rc2, out2, err2 = run_child(src, dst, method, a, checkpoint_seconds=cs)
        ok, bad = (False, ["resumed run failed"]) if rc2 != 0 else same_files(whole, dst)
        row = {"shape": shape, "mode": "resume", "method": method, "killed_after_layer": k, "killed_rc": rc1,
               "killed_run_s": t1, "resumed_s": out2["total_s"] if out2 else None,
               "resumed_notes": out2["notes"] if out2 else err2[-500:], "byte_identical": ok, "differences": bad[:5]}
        rows.append(row)
        log(f"[{shape}] kill after layer {k} (rc {rc1}) + resume: byte-identical {ok} {bad[:3]} "
            f"{[n for n in (out2 or {}).get('notes', []) if 'resumed' in n]}")
        if rc1 != 17:
            log(err1)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(whole, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------------------
# SparseGPT solver alone
# --------------------------------------------------------------------------------------


def bench_solver(device, rows=4096, cols=11008, old=True):
    """One down_proj-shaped solve: new solver (CUDA graphs and eager) vs the old one."""
    import dass.core.graphs
    import dass.core.sparsegpt as sg
    from dass.core.patterns import parse_pattern

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(8192, cols, device=device, generator=g)
    h = (2 / x.shape[0]) * x.t() @ x + torch.diag(torch.rand(cols, device=device, generator=g))
    del x
    w = torch.randn(rows, cols, device=device, generator=g)
    p = parse_pattern("2:4")
    out = {}
    results = {}
    for name, graphs in (("graph", True), ("eager", False)):
        dass.core.graphs.USE_CUDA_GRAPHS = graphs
        dass.core.graphs.clear_graphs()
        sg.sparsegpt_prune(w[:, :1024], h[:1024, :1024], p)  # warm-up (and graph capture for that shape)
        sync(device)
        t = time.perf_counter()
        results[name] = sg.sparsegpt_prune(w, h, p)
        sync(device)
        out[f"{name}_s"] = time.perf_counter() - t
    dass.core.graphs.USE_CUDA_GRAPHS = True
    out["graph_equals_eager"] = bool(torch.equal(results["graph"].weight, results["eager"].weight))
    if old:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_speed_paths import old_solver

        sync(device)
        t = time.perf_counter()
        ref_w, ref_m = old_solver(w, h, p)
        sync(device)
        out["old_s"] = time.perf_counter() - t
        out["rel_diff_vs_old"] = float((ref_w - results["eager"].weight).norm() / ref_w.norm())
        out["same_mask_as_old"] = bool(torch.equal(ref_m, results["eager"].mask))
    dass.core.graphs.clear_graphs()
    log(f"solver {rows}x{cols} 2:4: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return {"mode": "solver", "rows": rows, "cols": cols, **out}


# --------------------------------------------------------------------------------------


def table(rows):
    lines = ["| shape | mode | method | total s | x fwd2 | excl. fwd s | observe/prune/reconstruct/propagate s | peak dev GB | peak RSS GB | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("mode") not in ("memory", "stream"):
            continue
        ph = "/".join(f"{r.get(k, 0):.1f}" for k in ("observe_s", "prune_s", "reconstruct_s", "propagate_s")) if "observe_s" in r else ""
        lines.append(
            f"| {r['shape']} ({r.get('layers', '')} L) | {r['mode']} | {r['method']} | {r.get('total_s', float('nan')):.1f} | "
            f"{r.get('ratio_to_forward2', float('nan')):.2f} | {r.get('excl_forward_s', float('nan')):.1f} | {ph} | "
            f"{(r.get('peak_device_gb') or 0):.1f} | {(r.get('peak_rss_gb') or 0):.2f} | "
            f"{'per layer %.2f s' % r['per_layer_s'] if 'per_layer_s' in r else ''} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=list(SHAPES), help="repeatable (default: tiny on CPU, 7b on GPU)")
    ap.add_argument("--layers", type=int, action="append", help="layers per --shape (0 = all)")
    ap.add_argument("--methods", default="dass,wanda,sparsegpt,magnitude")
    ap.add_argument("--stream-methods", action="append", help="per --shape: methods for stream mode (default: --methods)")
    ap.add_argument("--mode", action="append", choices=["memory", "stream", "both"], help="per --shape (default both)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--activations", default="auto")
    ap.add_argument("--checkpoint-seconds", type=float, default=1.0, help="resume test: how often the killed and resumed runs save their state (timed runs: 60)")
    ap.add_argument("--resume-test", action="append", type=int, help="per --shape: 1 = kill-and-resume check")
    ap.add_argument("--solver", action="store_true", help="time the SparseGPT solver alone (new vs old)")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/dass-bench")
    ap.add_argument("--budget", type=float, default=0, help="skip remaining sections after this many seconds")
    ap.add_argument("--out", default=None)
    # child mode
    ap.add_argument("--child-stream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src"), ap.add_argument("--dst"), ap.add_argument("--method")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--die-after", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--reconstruct", default=None, help="in-memory runs: reconstruction settings ('' = defaults)")
    a = ap.parse_args(argv)
    if a.child_stream:
        return child_stream(a)

    t_start = time.perf_counter()
    device = torch.device(a.device)
    shapes = a.shape or (["7b"] if device.type == "cuda" else ["tiny"])
    layers = (a.layers or []) + [0] * len(shapes)
    modes = (a.mode or []) + ["both"] * len(shapes)
    resumes = (a.resume_test or []) + [0] * len(shapes)
    methods = a.methods.split(",")
    stream_methods = [m.split(",") for m in (a.stream_methods or [])] + [methods] * len(shapes)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "nsamples": a.nsamples, "seqlen": a.seqlen, "batch_size": a.batch_size,
            "pattern": "2:4", "dtype": str(dtype), "argv": sys.argv}
    import transformers

    info["transformers"] = transformers.__version__
    log(json.dumps(info))
    rows = []

    def save():
        if a.out:
            Path(a.out).write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str))

    def budget_left():
        return not a.budget or time.perf_counter() - t_start < a.budget

    if a.solver:
        rows.append(bench_solver(device) if device.type == "cuda" else bench_solver(device, 64, 512))
        save()
    for shape, nl, mode, rt, smethods in zip(shapes, layers, modes, resumes, stream_methods):
        cfg = config_for(shape, nl or None)
        ids = calibration(cfg, a.nsamples, a.seqlen)
        if mode in ("memory", "both"):
            if not budget_left():
                log(f"[{shape}] memory: skipped (budget)")
            else:
                try:
                    rows += bench_memory(shape, cfg, methods, ids, device, a.batch_size, dtype,
                                         reconstruct=None if a.reconstruct is None else (a.reconstruct or True))
                except Exception as exc:  # keep going: the other sections still report
                    import traceback

                    traceback.print_exc()
                    rows.append({"shape": shape, "mode": "memory", "error": repr(exc)})
                save()
        if mode in ("stream", "both"):
            if not budget_left():
                log(f"[{shape}] stream: skipped (budget)")
            else:
                try:
                    rows += bench_stream(shape, cfg, smethods, a, work, bool(rt))
                except Exception as exc:
                    import traceback

                    traceback.print_exc()
                    rows.append({"shape": shape, "mode": "stream", "error": repr(exc)})
                save()
    log("\n" + table(rows))
    for r in rows:
        if r.get("mode") == "resume":
            log(f"resume {r['shape']}: killed after layer {r['killed_after_layer']}, byte-identical: {r['byte_identical']}")
    mem = {(r["shape"], r["method"]): r for r in rows if r.get("mode") == "memory" and "total_s" in r}
    for shape in {s for s, _ in mem}:
        d, w, s = mem.get((shape, "dass")), mem.get((shape, "wanda")), mem.get((shape, "sparsegpt"))
        if d:
            log(f"{shape}: DaSS / two forwards = {d['ratio_to_forward2']:.3f}" +
                (f", DaSS / Wanda = {d['total_s'] / w['total_s']:.3f}" if w else "") +
                (f", SparseGPT / DaSS = {s['total_s'] / d['total_s']:.2f}, SparseGPT {s['total_s']:.1f} s" if s else ""))
    log(f"bench wall time {time.perf_counter() - t_start:.0f} s")
    save()


if __name__ == "__main__":
    main()
