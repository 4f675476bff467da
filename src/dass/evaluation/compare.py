"""``dass compare``: dense plus methods x patterns on one model, same calibration and
evaluation for every row, one table (printed, JSON, Markdown, plot)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dass.arch import all_decoder_linears
from dass.core.patterns import parse_pattern
from dass.run.report import cpu_name, versions

if TYPE_CHECKING:
    from dass.run.spec import RunSpec


def decoder_sparsity(model: torch.nn.Module) -> float:
    """Fraction of zeros over every linear weight of the decoder layers."""
    zeros = total = 0
    for _, w in all_decoder_linears(model):
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    head = ["method", "pattern", "alpha", "ppl"] + tasks + (["mean acc"] if tasks else []) + [
        "sparsity (pruned)",
        "sparsity (decoder)",
        "prune s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        zs = r.get("zeroshot") or {}
        cells = [r["method"], r["pattern"] or "-", _fmt(r.get("alpha"), ""), _fmt(r.get("ppl"), ".2f")]
        cells += [_fmt(zs.get(t), ".4f") for t in tasks]
        if tasks:
            cells.append(_fmt(r.get("mean_acc"), ".4f"))
        cells += [_fmt(r.get("sparsity_pruned"), ".4f"), _fmt(r.get("sparsity_decoder"), ".4f"), _fmt(r.get("prune_seconds"), ".1f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _model_label(spec: str) -> str:
    """What a reader knows the model as: the embedded model's name, a directory's name."""
    if spec == "default":
        from dass.io.models import DEFAULT_GGUF_NAME

        return f"{DEFAULT_GGUF_NAME.split('.')[0]} (embedded, dequantized Q4_1)"
    return Path(spec).name or spec


def _source_label(source: Any, held_out: bool = False) -> str:
    if str(source) in ("default", "embedded"):
        return f"{'held-out ' if held_out else ''}embedded Wikipedia text"
    return Path(str(source)).name


def bar_labels(rows: list[dict[str, Any]]) -> list[str]:
    """One x label per row with a perplexity: the method, and the pattern under it."""
    return [r["method"] if not r.get("pattern") else f"{r['method']}\n{r['pattern']}" for r in rows if r.get("ppl")]


def plot_title(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The facts a reader of the plot needs: model, patterns, scope, calibration size and
    source, evaluation size and window."""
    patterns = list(dict.fromkeys(r["pattern"] for r in rows if r.get("pattern")))
    cal, ev = meta.get("calibration", {}), meta.get("evaluation", {})
    tokens = ev.get("tokens")
    size = f"first {tokens:,} tokens" if tokens else "all tokens"
    return (
        f"Perplexity of {_model_label(str(meta.get('model', '?')))}, "
        f"{', '.join(patterns) or 'dense'} (scope {meta.get('scope', '?')})\n"
        f"calibration: {cal.get('nsamples')} x {cal.get('seqlen')} tokens of {_source_label(cal.get('source'))} "
        f"(seed {cal.get('seed')})\n"
        f"evaluation: {size} of {_source_label(ev.get('ppl'), held_out=True)} in {ev.get('seqlen')}-token windows"
    )


def plot(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> str | None:
    """Perplexity per method and pattern (log scale), titled with what was compared
    (:func:`plot_title`). Returns the title, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = bar_labels(rows)
    values = [r["ppl"] for r in rows if r.get("ppl")]
    title = plot_title(rows, meta)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(values)), 4.2))
    ax.bar(range(len(values)), values, color=["#888" if lab == "dense" else "#3b7dd8" for lab in labels])
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=8)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return title


def split_methods(text: str) -> list[str]:
    """``--methods`` items: separated by ';', or by ',' where an item after a method spec
    that is only ``key=value`` continues that spec (``dense,dass:alpha=auto,rescale=down,wanda``)."""
    if ";" in text:
        return [m.strip() for m in text.split(";") if m.strip()]
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part.split("=", 1)[0] and items and ":" in items[-1]:
            items[-1] += "," + part
        else:
            items.append(part)
    return items


RECONSTRUCT_SUFFIX = "+reconstruct"


def _runs(args: argparse.Namespace, methods: list[str]) -> list[tuple[str, RunSpec]]:
    """``(label, RunSpec)`` for every pruned row: each method (not ``dense``) x pattern."""
    from dass.methods.base import get_method_with
    from dass.run.reconstruct import reconstruct_options
    from dass.run.spec import RunSpec

    patterns = [parse_pattern(p.strip()) for p in args.patterns.split(",") if p.strip()]
    extra = {"alpha": args.alpha, "rescale": args.rescale}
    rec_spec = getattr(args, "reconstruct", None)  # the settings of the rows named METHOD+reconstruct
    runs: list[tuple[str, RunSpec]] = []
    for m in methods:
        if m == "dense":
            continue
        base, suffix = (m[: -len(RECONSTRUCT_SUFFIX)], True) if m.endswith(RECONSTRUCT_SUFFIX) else (m, False)
        rec = reconstruct_options(rec_spec or True) if suffix else None
        meth = get_method_with(base, extra, strict=False, label=lambda k: f"--{k}")
        for pat in patterns:
            runs.append((m, RunSpec(meth, pat, args.scope, None, batch_size=args.batch_size, reconstruct=rec)))
    return runs


def _meta(args: argparse.Namespace, model: torch.nn.Module, device: str, tasks: list[str]) -> dict[str, Any]:
    """What was compared, as results.json records it."""
    return {
        "model": args.model,
        "scope": args.scope,
        "calibration": {"source": args.calibration, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "evaluation": {"ppl": args.ppl, "seqlen": args.eval_seqlen, "tokens": args.eval_tokens, "zeroshot": tasks, "limit": args.limit},
        "device": device,
        "dtype": str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "versions": versions(),
    }


class _Rows:
    """The rows evaluated so far: each is evaluated on the model as it is now, appended,
    saved to results.partial.json and printed."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, device: str,
                 tasks: list[str], meta: dict[str, Any], out: Path) -> None:
        self.args, self.model, self.tokenizer, self.device = args, model, tokenizer, device
        self.tasks, self.meta, self.out = tasks, meta, out
        self.rows: list[dict[str, Any]] = []

    def evaluate(self, row: dict[str, Any]) -> None:
        from dass.evaluation.evaluate import evaluate_model, headline

        args = self.args
        res = evaluate_model(self.model, self.tokenizer, self.device, ppl=args.ppl, eval_seqlen=args.eval_seqlen,
                             eval_tokens=args.eval_tokens, zeroshot_tasks=self.tasks, limit=args.limit,
                             zeroshot_batch_size=args.zeroshot_batch_size, progress=not args.quiet)
        row["ppl"] = res.get("perplexity", {}).get("ppl")
        if "zeroshot" in res:
            row["zeroshot"] = {t: headline(r) for t, r in res["zeroshot"].items()}
            row["zeroshot_full"] = res["zeroshot"]
            row["mean_acc"] = sum(row["zeroshot"].values()) / max(len(row["zeroshot"]), 1)
        self.rows.append(row)
        partial = json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=str)
        (self.out / "results.partial.json").write_text(partial)
        print(
            f"  {row['method']:>10} {row['pattern'] or '':>16}: ppl {_fmt(row.get('ppl'), '.2f')}"
            + (f", mean acc {row['mean_acc']:.4f}" if "mean_acc" in row else "")
            + (f", pruned in {row['prune_seconds']:.1f} s" if row.get("prune_seconds") else ""),
            flush=True,
        )


def _write_results(rows: list[dict[str, Any]], tasks: list[str], meta: dict[str, Any], out: Path) -> None:
    """results.json, results.md and the plot; the table and where they went, printed."""
    table = markdown_table(rows, tasks)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    (out / "results.md").write_text(table + "\n")
    (out / "results.partial.json").unlink(missing_ok=True)
    plotted = plot(rows, out / "perplexity.png", meta)
    print()
    print(table)
    print()
    print(
        f"compare: {len(rows)} rows in {meta['total_seconds']:.0f} s; wrote {out / 'results.json'}, "
        f"{out / 'results.md'}" + (f", {out / 'perplexity.png'}" if plotted else "")
    )


def run_compare(args: argparse.Namespace) -> int:
    from dass.io.data import sample_calibration
    from dass.io.models import load_model
    from dass.run.devices import resolve_device
    from dass.run.prune import prune

    methods = split_methods(args.methods)
    runs = _runs(args, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    t_all = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu", gguf_file=getattr(args, "gguf_file", None))
    for _, spec in runs:  # everything that can fail on the model fails before any work
        spec.plan(model)
    ids = sample_calibration(tokenizer, args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tasks = [t.strip() for t in args.zeroshot.split(",")] if args.zeroshot else []
    meta = _meta(args, model, device, tasks)
    rows = _Rows(args, model, tokenizer, device, tasks, meta, out)
    if "dense" in methods:
        rows.evaluate({"method": "dense", "pattern": None, "sparsity_pruned": 0.0, "sparsity_decoder": decoder_sparsity(model)})
    for name, spec in runs:
        model.load_state_dict(original)
        report = prune(model, dataclasses.replace(spec, calibration=ids, device=device), progress=not args.quiet)
        rows.evaluate(
            {
                "method": name,
                "pattern": str(spec.pattern),
                "alpha": spec.method.options().get("alpha"),
                "reconstruct": report.reconstruct,
                "sparsity_pruned": report.sparsity,
                "sparsity_decoder": decoder_sparsity(model),
                "prune_seconds": report.total_seconds,
                "fallbacks": report.fallbacks,
                "report": {k: v for k, v in report.to_dict().items() if k != "matrices"},
            }
        )
    meta["total_seconds"] = time.perf_counter() - t_all
    _write_results(rows.rows, tasks, meta, out)
    return 0
