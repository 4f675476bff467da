"""The DaSS ablation on the embedded model: methods x patterns x alpha, plus dass-obs.

Reproduces the table of issue 7 for this implementation: every configuration prunes a
fresh copy of the embedded SmolLM2-135M (MLP scope) with the same calibration windows and
is scored by perplexity on the held-out text, with its pruning time from the same run.
Writes JSON (``--out``), a plot (``--plot``, matplotlib) and prints a Markdown table.

    # the issue's protocol (128 x 2048 calibration tokens, all held-out text); GPU-sized
    python benchmarks/ablation.py --device cuda --out runs/ablation.json --plot runs/ablation.png
    # what fits a 2-core CPU: 32 x 512 calibration tokens, 64 evaluation windows of 2048 tokens
    python benchmarks/ablation.py --nsamples 32 --seqlen 512 --eval-tokens 131072 --out runs/ablation-cpu.json
    # only some rows / patterns, and re-rendering saved results
    python benchmarks/ablation.py --configs wanda dass:alpha=auto --patterns 2:4
    python benchmarks/ablation.py --render runs/a.json runs/b.json --plot runs/ablation.png
    # why: single dense MLP blocks, reconstruction error per variant
    python benchmarks/ablation.py --block-errors 1,10,20,29 --nsamples 32 --seqlen 512 --patterns 2:4

A configuration is ``method`` or ``method:key=value,key=value`` (options go to the
method's constructor, e.g. ``dass:alpha=auto``, ``dass-obs:masks=fixed,alpha=1``);
``dense`` is the unpruned model. Not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: The rows of the issue's table, then the weight-updating DaSS variants.
DEFAULT_CONFIGS = [
    "dense",
    "magnitude",
    "wanda",
    "dass:alpha=0.5",
    "dass:alpha=1",
    "dass:alpha=2",
    "dass:alpha=auto,rescale=none",
    "dass:alpha=auto,rescale=down",
    "dass:alpha=auto,alpha_criterion=total,rescale=none",
    "sparsegpt",
    "dass-obs:masks=fixed,alpha=1",
    "dass-obs:alpha=1,order=natural",
    "dass-obs:alpha=1",
]
DEFAULT_PATTERNS = ["2:4", "4:8", "0.5"]

LABELS = {
    "dense": "dense",
    "magnitude": "magnitude",
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT",
    # rows kept from runs before the kept calibration rows were spread over all windows
    "dass:alpha=auto,rows=first-batch": "DaSS alpha auto (old rows: first batch, 512)",
    "dass:alpha=auto,alpha_criterion=total,rows=first-batch": "DaSS alpha auto (total error; old rows)",
    # issue 15: rows run with the code before it (commit 3be9760), kept under these names
    "dass:alpha=auto@3be9760": "DaSS alpha auto before issue 15 (rescale down)",
    "dass:alpha=auto,rescale=none@3be9760": "DaSS alpha auto before issue 15, rescale none",
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_config(spec: str) -> tuple[str, dict]:
    """``method:key=value,...`` -> (method, options); numbers are converted."""
    method, _, rest = spec.partition(":")
    opts: dict = {}
    for kv in filter(None, rest.split(",")):
        key, _, value = kv.partition("=")
        try:
            opts[key] = int(value)
        except ValueError:
            try:
                opts[key] = float(value)
            except ValueError:
                opts[key] = value
    return method, opts


def label(spec: str) -> str:
    base, plus, rec = spec.partition("+")
    if plus:  # METHOD+RECONSTRUCT: the method, then its blocks refitted (issue 11)
        return f"{label(base)} + reconstruction ({rec or 'defaults'})"
    method, opts = parse_config(spec)
    if spec in LABELS:
        return LABELS[spec]
    if method == "dass":
        crit = f" ({opts['alpha_criterion']} error)" if "alpha_criterion" in opts else ""
        if opts.get("alpha_select") == "min" and opts.get("alpha_measure") == "mlp" and opts.get("max_neurons") == 512:
            crit += " [before issue 15: lowest MLP-output error, 512 neurons]"
        else:
            if opts.get("alpha_select") == "min":
                crit += " [lowest error, no safety rule]"
            if opts.get("alpha_measure") == "mlp":
                crit += " [MLP-output error]"
            if "max_neurons" in opts:
                crit += f" [{opts['max_neurons']} neurons]"
            if "alpha_guard" in opts:
                crit += f" [guard {opts['alpha_guard']}]"
        rescale = opts.get("rescale", "down" if opts.get("alpha") == "auto" else "none")  # auto's default
        if rescale != "none":
            crit += f" + rescale {rescale}"
            if opts.get("rescale_target", "block") != "block":
                crit += f" ({opts['rescale_target']} target)"
            from dass.methods.options import as_bool

            if as_bool(opts.get("alpha_rescaled", False)):
                crit += ", alpha judged rescaled"
        return f"DaSS alpha {opts.get('alpha', 0.5)}{crit}"
    if method == "wanda" and opts.get("rescale", "none") != "none":
        return f"Wanda + rescale {opts['rescale']} (not part of Wanda; the same correction as auto's)"
    if method == "dass-obs":
        masks = opts.get("masks", "sweep")
        if masks == "fixed":
            return f"DaSS {opts.get('alpha', 1.0)} masks + OBS update (fixed)"
        w = opts.get("weights", "dass")
        extra = ", natural order" if opts.get("order") == "natural" else ""
        if w == "taylor":
            return "dass-obs sweep, taylor weights" + extra
        return f"dass-obs sweep, alpha {opts.get('alpha', 1.0)}" + extra
    return spec


def pattern_label(p: str) -> str:
    return "50%" if p in ("0.5", "50%", "unstructured:0.5") else p


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------


def run(args) -> dict:
    from dass import prune
    from dass.evaluation.evaluate import perplexity

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    from alpha_models import kl_to_dense, load_subject, log_probs

    model, calib, ev, kind = load_subject(args.model, args.calibration, args.nsamples, args.seqlen, args.seed,
                                          args.eval_source, args.tokens, str(device))
    if args.save_tokens:  # for a machine without the text packages (benchmarks/gpu_alpha.sh)
        torch.save({"calibration": calib, "evaluation": ev}, args.save_tokens)
        log(f"tokens saved to {args.save_tokens}")
        return {"meta": {}, "rows": []}
    calib = calib[: args.nsamples, : args.seqlen]
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.eval_tokens:
        ev = ev[:, : args.eval_tokens]
    log(f"model loaded ({kind}); calibration {tuple(calib.shape)}; evaluation {ev.numel()} tokens; device {device}")
    use_kl = args.kl if args.kl is not None else kind == "built"
    dense_lp = list(log_probs(model, ev, args.eval_seqlen, args.eval_batch)) if use_kl else None

    meta = {
        "model": args.model,
        "kind": kind,
        "scope": args.scope,
        "calibration": {"source": args.calibration, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "evaluation": {"source": args.eval_source, "seqlen": args.eval_seqlen,
                       "tokens": int(ev.numel()) // args.eval_seqlen * args.eval_seqlen},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else os.uname().machine,
        "torch_threads": torch.get_num_threads(),
        "prune_threads": args.prune_threads or torch.get_num_threads(),
        "repeat": args.repeat,
        "torch": torch.__version__,
    }
    rows: list[dict] = []
    if args.warmup and device.type == "cuda":  # first CUDA calls (kernels, graphs) out of the timings
        prune(model, "wanda", args.patterns[0], args.scope, calibration=calib, progress=False, device=device)
        model.load_state_dict(dense_state)

    def evaluate() -> float:
        return perplexity(model, ev, seqlen=args.eval_seqlen, batch_size=args.eval_batch, progress=False)["ppl"]

    def kl() -> float:  # KL(dense || pruned) per token: the measure for built models (their ppl means nothing)
        return kl_to_dense(model, dense_lp, ev, args.eval_seqlen, args.eval_batch) if dense_lp is not None else float("nan")

    # pattern-major, dense first: an interrupted run still leaves whole columns of the table
    jobs = [(s, None) for s in args.configs if s == "dense"]
    jobs += [(s, p) for p in args.patterns for s in args.configs if s != "dense"]
    for spec, pat in jobs:
        base, plus, rec_spec = spec.partition("+")
        method, opts = parse_config(base)
        if plus:  # METHOD+RECONSTRUCT (issue 11): blocks refitted after the masks
            opts = {**opts, "reconstruct": rec_spec or True}
        model.load_state_dict(dense_state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec: dict = {"config": spec, "label": label(spec), "method": method, "options": opts, "pattern": pat}
        if method == "dense" and args.no_eval:
            continue
        if method != "dense":
            walls, cpus = [], []
            try:
                for rep in range(args.repeat):
                    if rep:
                        model.load_state_dict(dense_state)
                    threads = torch.get_num_threads()
                    if args.prune_threads:
                        torch.set_num_threads(args.prune_threads)
                    c0 = time.process_time()
                    try:
                        report = prune(model, method, pat, args.scope, calibration=calib, batch_size=args.batch_size,
                                       progress=False, device=device, **opts)
                    finally:
                        torch.set_num_threads(threads)
                    walls.append(report.total_seconds)
                    cpus.append(time.process_time() - c0)
            except Exception as exc:  # one broken configuration must not lose the others
                import traceback

                traceback.print_exc()
                log(f"{spec} {pat}: FAILED: {exc}")
                continue
            rec["prune_seconds"] = min(walls)
            rec["prune_cpu_seconds"] = min(cpus)  # CPU time of all threads (min over repeats)
            if args.repeat > 1:
                rec["prune_seconds_all"], rec["prune_cpu_seconds_all"] = walls, cpus
            rec["sparsity"] = report.sparsity
            rec["method_options"] = report.options
            alphas = [m.info.get("alpha") for m in report.matrices if m.role == "gate"]
            if any(a is not None for a in alphas) and opts.get("alpha") == "auto":
                rec["alpha_per_layer"] = alphas
                rec["alpha_info"] = [{k: v for k, v in m.info.items() if k != "rescale"}
                                     for m in report.matrices if m.role == "gate"]
                rec["summary"] = report.summary()
        ts = time.perf_counter()
        rec["ppl"] = float("nan") if args.no_eval else evaluate()
        if dense_lp is not None and not args.no_eval:
            rec["kl"] = 0.0 if method == "dense" else kl()
        rec["eval_seconds"] = time.perf_counter() - ts
        rows.append(rec)
        log(f"{rec['label']:<45} {pattern_label(pat) if pat else '-':>5}  ppl {rec['ppl']:9.2f}"
            + (f"  KL {rec['kl']:.4f}" if "kl" in rec else "")
            + (f"  prune {rec['prune_seconds']:7.1f} s ({rec['prune_cpu_seconds']:.1f} CPU s)" if "prune_seconds" in rec else ""))
        if args.out:  # partial results survive an interrupted run
            _write(args.out, {"meta": meta, "rows": rows})
    meta["total_seconds"] = time.perf_counter() - t0
    return {"meta": meta, "rows": rows}


def _write(path: str, data: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, p)


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------


def _merge(datas: list[dict]) -> dict:
    """Rows of several result files by (configuration, pattern); a later file's fields win,
    except a missing perplexity (a ``--no-eval`` timing run), which keeps the earlier one."""
    merged: dict[tuple, dict] = {}
    for run, d in enumerate(datas):
        for r in d["rows"]:
            key = (r["config"], r["pattern"])
            old = merged.get(key, {})
            new = {**old, **r}
            if len(datas) > 1 and "prune_seconds" in r:
                new["timing_run"] = run  # times compare only within one run
            if r.get("ppl") != r.get("ppl") and "ppl" in old:  # NaN: timings only
                new["ppl"] = old["ppl"]
                new["timing_source"] = "separate timing run"
            merged[key] = new
    meta = dict(datas[0]["meta"]) if datas else {}
    if len(datas) > 1:
        meta["merged_from"] = [d.get("meta", {}) for d in datas]
    return {"meta": meta, "rows": list(merged.values())}


def markdown(data: dict) -> str:
    rows = data["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    patterns = list(dict.fromkeys(r["pattern"] for r in rows if r["pattern"] is not None))
    cell = {(r["config"], r["pattern"]): r for r in rows}
    cpu = data.get("meta", {}).get("device", "cpu") == "cpu"
    tkey = "prune_cpu_seconds" if cpu else "prune_seconds"  # CPU time on a shared CPU, wall time on a GPU
    tname = "CPU s" if cpu else "prune s"
    has_kl = any("kl" in r for r in rows)
    built = data.get("meta", {}).get("kind") == "built"  # random weights: perplexity means nothing, KL does
    what = ("KL", tname) if built else (("ppl", "KL", tname) if has_kl else ("ppl", tname))
    key = "kl" if built else "ppl"
    head = ["configuration"] + [f"{pattern_label(p)} {w}" for p in patterns for w in what]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def metric_cells(r: dict) -> list[str]:
        kl = [f"{r['kl']:.4f}" if "kl" in r else ""] if has_kl else []
        return kl if built else [f"{r['ppl']:.2f}"] + kl

    for c in configs:
        cells = [label(c)]
        if (c, None) in cell:  # dense
            d = cell[(c, None)]
            cells += metric_cells(d) + ["-"] + [""] * len(what) * (len(patterns) - 1)
        else:
            for p in patterns:
                r = cell.get((c, p))
                cells += (metric_cells(r) + [f"{r[tkey]:.1f}"] if r else [""] * len(what))
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    # the targets, where the rows exist
    notes = []

    def time_ratio(r: dict, ref: dict) -> str:
        if r.get("timing_run") != ref.get("timing_run"):
            return "time: not from one run"
        return f"time x{r[tkey] / ref[tkey]:.2f}"

    runs = {r.get("timing_run") for r in rows if "timing_run" in r}
    if len(runs) > 1:
        notes.append(f"- times come from {len(runs)} runs (row field timing_run); ratios only within one run")
    for p in patterns:
        w = cell.get(("wanda", p))
        for c in configs:
            a = cell.get((c, p))
            if not (w and a and c.startswith("dass:alpha=auto")):
                continue
            notes.append(f"- {pattern_label(p)}: {label(c)} / Wanda: {key} x{a[key] / w[key]:.3f}, "
                         f"{time_ratio(a, w)}"
                         + (f"; alpha per layer {_alpha_summary(a.get('alpha_per_layer'))}" if a.get("alpha_per_layer") else ""))
        s = cell.get(("sparsegpt", p))
        for c in configs:
            if c.startswith("dass-obs") and s and (c, p) in cell:
                r = cell[(c, p)]
                notes.append(f"- {pattern_label(p)}: {label(c)} / SparseGPT: ppl x{r['ppl'] / s['ppl']:.3f}, "
                             f"{time_ratio(r, s)}")
    return out + ("\n\n" + "\n".join(notes) if notes else "")


def _alpha_summary(alphas) -> str:
    from collections import Counter

    cnt = Counter(a for a in alphas if a is not None)
    return ", ".join(f"{k:g}: {v}" for k, v in sorted(cnt.items()))


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    configs = [c for c in dict.fromkeys(r["config"] for r in rows) if c != "dense"]
    patterns = list(dict.fromkeys(r["pattern"] for r in rows if r["pattern"] is not None))
    cell = {(r["config"], r["pattern"]): r for r in rows}
    autos = [cell[("dass:alpha=auto", p)] for p in patterns if ("dass:alpha=auto", p) in cell]
    cpu = data.get("meta", {}).get("device", "cpu") == "cpu"
    tkey = "prune_cpu_seconds" if cpu else "prune_seconds"
    ncols = 3 if autos else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 5.5))
    width = 0.8 / max(len(configs), 1)
    cmap = plt.get_cmap("tab20")
    for k, c in enumerate(configs):
        xs = [i + (k - len(configs) / 2 + 0.5) * width for i in range(len(patterns))]
        ppl = [cell[(c, p)]["ppl"] if (c, p) in cell else float("nan") for p in patterns]
        sec = [cell[(c, p)][tkey] if (c, p) in cell else float("nan") for p in patterns]
        axes[0].bar(xs, ppl, width, label=label(c), color=cmap(k))
        axes[1].bar(xs, sec, width, color=cmap(k))
    dense = cell.get(("dense", None))
    if dense:
        axes[0].axhline(dense["ppl"], color="k", ls="--", lw=1, label=f"dense {dense['ppl']:.1f}")
    ttitle = "pruning CPU time, s" if cpu else "pruning time, s"
    if len({r.get("timing_run") for r in rows if "timing_run" in r}) > 1:
        ttitle += " (merged runs: compare within one run)"
    for ax, title in ((axes[0], "perplexity (log)"), (axes[1], ttitle)):
        ax.set_xticks(range(len(patterns)), [pattern_label(p) for p in patterns])
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, loc="upper right")
    if autos:
        for r in autos:
            axes[2].plot(r["alpha_per_layer"], marker="o", label=pattern_label(r["pattern"]))
        axes[2].set_xlabel("layer")
        axes[2].set_ylabel("chosen alpha")
        axes[2].set_title("dass --alpha auto: alpha per layer")
        axes[2].legend()
    m = data.get("meta", {})
    cal = m.get("calibration", {})
    fig.suptitle(f"{m.get('model', '')} MLP scope, calibration {cal.get('nsamples')}x{cal.get('seqlen')}, "
                 f"eval {m.get('evaluation', {}).get('tokens')} tokens, {m.get('device_name', m.get('device', ''))}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# block-level diagnostic: why the variants differ
# --------------------------------------------------------------------------------------

#: The block diagnostic's rows: the ablation's, less the weakest, plus Taylor neuron weights.
BLOCK_VARIANTS = [c for c in DEFAULT_CONFIGS if c not in ("dense", "magnitude", "dass:alpha=0.5", "dass:alpha=2")] + [
    "dass-obs:weights=taylor"
]


@torch.no_grad()
def block_errors(args) -> dict:
    """Relative reconstruction error ``||y' - y||^2 / ||y||^2`` of single MLP blocks of the
    *dense* model: statistics from ``--nsamples`` calibration windows, error measured on
    other windows (seed + 1), one row per layer and variant. No sequential propagation:
    this isolates what each method does to one block."""
    import torch.nn.functional as F

    from dass.core.alpha import glu_forward, relative_error
    from dass.arch import plan_model
    from dass.io.data import sample_calibration
    from dass.methods import get_method
    from dass.io.models import load_model
    from dass.core.patterns import parse_pattern
    from dass.core.stats import FeatureStats

    model, tok = load_model(args.model, device="cpu")
    layers = [int(v) for v in args.block_errors.split(",")]
    plans = {p.index: p for p in plan_model(model, "mlp")}
    calib = sample_calibration(tok, args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    held = sample_calibration(tok, args.calibration, nsamples=max(2, args.nsamples // 4), seqlen=args.seqlen,
                              seed=args.seed + 1)
    xs: dict[int, list] = {i: [] for i in layers}
    hooks = [plans[i].glu[0].gate.module.register_forward_hook(lambda m, inp, out, i=i: xs[i].append(inp[0]))
             for i in layers]
    for batch in torch.cat([calib, held]).split(args.batch_size):
        model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    ncal = calib.numel()
    out: dict = {"layers": layers, "rows": []}
    for i in layers:
        block = plans[i].glu[0]
        act = block.act or F.silu
        gate, up, down = (r.get().detach().float() for r in (block.gate, block.up, block.down))
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[i]]).float()
        xc, xh = x[:ncal], x[ncal:]
        y = glu_forward(gate, up, down, xh, act)
        for pat in args.patterns:
            p = parse_pattern(pat)
            for spec in args.configs:
                method, opts = parse_config(spec)
                m = get_method(method, **opts)
                sx = FeatureStats(x.shape[1], with_hessian=m.needs_hessian, max_samples=m.sample_tokens)
                sh = FeatureStats(gate.shape[0], with_hessian=m.needs_hessian)
                for chunk in xc.split(4096):
                    sx.add(chunk)
                    sh.add(act(chunk @ gate.t()) * (chunk @ up.t()))
                res = m.prune_glu(gate, up, down, sx, sh, p, act=act)
                w = [r.weight.float() if r.weight is not None else W * r.mask for r, W in zip(res, (gate, up, down))]
                err = relative_error(glu_forward(*w, xh, act), y, "total")
                out["rows"].append({"layer": i, "pattern": pat, "config": spec, "error": err})
                log(f"layer {i:2d} {pattern_label(pat):>4} {label(spec):<45} {err:.4f}")
    return out


def block_markdown(data: dict) -> str:
    rows = data["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cols = list(dict.fromkeys((r["layer"], r["pattern"]) for r in rows))
    cell = {(r["config"], r["layer"], r["pattern"]): r["error"] for r in rows}
    head = ["block error"] + [f"L{l} {pattern_label(p)}" for l, p in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        lines.append("| " + " | ".join([label(c)] + [f"{cell[(c, l, p)]:.4f}" for l, p in cols]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default",
                    help="default, a checkpoint path, or built:qwen2 / built:gemma / built:llama (benchmarks/alpha_models.py)")
    ap.add_argument("--tokens", default=None, help="calibration/evaluation ids saved by --save-tokens (no text needed)")
    ap.add_argument("--save-tokens", default=None, help="only tokenize: save calibration/evaluation ids to this file")
    ap.add_argument("--kl", dest="kl", action="store_true", default=None,
                    help="also measure KL(dense || pruned) per token (default for built models)")
    ap.add_argument("--no-kl", dest="kl", action="store_false")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--patterns", nargs="+", default=DEFAULT_PATTERNS)
    ap.add_argument("--scope", default="mlp")
    ap.add_argument("--calibration", default="default", help="calibration text source")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-source", default="default")
    ap.add_argument("--eval-tokens", type=int, default=0, help="use the first N evaluation tokens (0 = all)")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-batch", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--prune-threads", type=int, default=0,
                    help="torch threads while pruning (1 gives CPU times that other jobs on a shared CPU barely disturb)")
    ap.add_argument("--repeat", type=int, default=1, help="prune each configuration this many times; times are the minimum")
    ap.add_argument("--no-eval", action="store_true", help="timings only: skip the perplexity evaluations")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--plot", default=None, help="PNG plot")
    ap.add_argument("--render", nargs="+", default=None, help="only render these saved JSON files (merged)")
    ap.add_argument("--block-errors", default=None, metavar="LAYERS",
                    help="diagnostic instead of the ablation: reconstruction error of these layers' MLP blocks "
                         "(comma-separated indices) of the dense model, per variant (--configs default: a short list)")
    args = ap.parse_args(argv)
    if args.block_errors:
        if args.configs == DEFAULT_CONFIGS:
            args.configs = BLOCK_VARIANTS
        data = block_errors(args)
        if args.out:
            _write(args.out, data)
        print(block_markdown(data))
        return
    if args.render:
        data = _merge([json.loads(Path(p).read_text()) for p in args.render])
        if args.out:
            _write(args.out, data)
    else:
        data = run(args)
        if args.out:
            _write(args.out, data)
    if args.plot:
        plot(data, args.plot)
    print(markdown(data))


if __name__ == "__main__":
    main()
