"""Reconstruction after pruning: perplexity against time, per method, pattern and setting.

Each configuration prunes a fresh copy of the model with ``dass.prune`` and measures
perplexity on held-out text; a configuration is ``METHOD[@PATTERN][+RECONSTRUCT]`` in the
project's spec syntax, for example ``wanda@2:4``, ``sparsegpt@4:8+steps=500`` or
``dass:alpha=1@2:4+steps=1000,lr=0.003`` (``+`` alone: the default reconstruction). A
``{lr}`` / ``{steps}`` placeholder is filled with the values the ``--grid default`` plan has
chosen so far.

``--grid default`` is the plan that chose dass's defaults (docs/ablation.md):

1. Wanda 2:4 with 500 steps at three learning rates (RMS-relative): the best one is kept;
2. the main methods at 2:4 and 4:8 without and with reconstruction;
3. Wanda 2:4 at 100, 250 and 1000 steps with that rate (the time / perplexity curve);
4. DaSS under reconstruction (alpha 0.5, 1 and auto), dass-obs, and the rest.

Results are written after every configuration (``--out``: JSON, a Markdown table and a
plot of perplexity against pruning time), so a run cut short by ``--budget`` keeps what
it measured.

    # CPU smoke (tiny sizes):
    python benchmarks/reconstruction.py --nsamples 4 --seqlen 128 --eval-tokens 4096 \
        --configs wanda@2:4 "wanda@2:4+steps=20" --out runs/recon-smoke
    # the issue's protocol on a GPU (benchmarks/gpu_reconstruct.sh):
    python benchmarks/reconstruction.py --model MODEL.gguf --tokens tokens.pt --grid default \
        --device cuda --budget 480 --out $OUT/recon
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_PLAN = {  # in the order they run: what matters most first, in case the budget ends the run
    "lr": ["wanda@2:4+steps=500,lr=0.0003", "wanda@2:4+steps=500,lr=0.001", "wanda@2:4+steps=500,lr=0.003"],
    "methods": [
        "dense", "wanda@2:4", "sparsegpt@2:4", "sparsegpt@2:4+steps=500,lr={lr}", "dass@2:4+steps=500,lr={lr}",
        "sparsegpt@4:8", "sparsegpt@4:8+steps=500,lr={lr}", "wanda@4:8+steps=500,lr={lr}",
    ],
    "steps": ["wanda@2:4+steps=100,lr={lr}", "wanda@2:4+steps=250,lr={lr}", "wanda@2:4+steps=1000,lr={lr}"],
    "dass": ["dass:alpha=1@2:4+steps=500,lr={lr}", "dass:alpha=auto@2:4+steps=500,lr={lr}", "dass@2:4",
             "dass-obs@2:4", "dass-obs@2:4+steps=500,lr={lr}", "wanda@4:8"],
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_config(text: str, default_pattern: str) -> tuple[str, str, str | None]:
    """``METHOD[@PATTERN][+RECONSTRUCT]`` -> (method spec, pattern, reconstruct spec or None)."""
    rest, plus, rec = text.partition("+")
    method, _, pattern = rest.partition("@")
    return method.strip(), (pattern.strip() or default_pattern), (rec.strip() if plus else None)


def load(args):
    from dass.io.models import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device="cpu")
    if args.tokens:
        saved = torch.load(args.tokens)
        calib, ev = saved["calibration"], saved["evaluation"]
    else:
        from dass.io.data import evaluation_tokens, sample_calibration

        calib = sample_calibration(tok, "default", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        ev = evaluation_tokens(tok, "default")
    calib = calib[: args.nsamples, : args.seqlen]
    if args.eval_tokens:
        ev = ev[:, : args.eval_tokens]
    return model, tok, calib, ev


def run_one(base, text, args, calib, ev, chosen) -> dict:
    import dass
    from dass.evaluation.evaluate import perplexity

    text = text.format(**chosen)
    method, pattern, rec = parse_config(text, "2:4")
    model = copy.deepcopy(base).to(args.device)
    row: dict = {"config": text, "method": method, "pattern": None if method == "dense" else pattern,
                 "reconstruct": rec}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if method != "dense":
        t = time.perf_counter()
        rep = dass.prune(model, method, pattern, "mlp", calibration=calib, batch_size=args.batch_size,
                         device=args.device, progress=False, reconstruct=None if rec is None else (rec or True))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        row.update(prune_seconds=time.perf_counter() - t, options=rep.options, reconstruct_options=rep.reconstruct,
                   sparsity=rep.sparsity, notes=rep.notes)
        if rep.blocks:
            row["block_loss_before"] = sum(b["loss_before"] for b in rep.blocks) / len(rep.blocks)
            row["block_loss_after"] = sum(b["loss_after"] for b in rep.blocks) / len(rep.blocks)
            row["blocks"] = rep.blocks
        alphas = [m.info.get("alpha") for m in rep.matrices if m.role == "gate" and "alpha" in m.info]
        if alphas:
            row["alphas"] = alphas
    with torch.no_grad():
        row["ppl"] = perplexity(model, ev, seqlen=args.eval_seqlen, batch_size=args.eval_batch, device=args.device,
                                progress=False)["ppl"]
    if args.zeroshot:
        from dass.evaluation.evaluate import headline, zeroshot

        tasks = [t.strip() for t in args.zeroshot.split(",") if t.strip()]
        res = zeroshot(model, args.tokenizer, tasks=tasks, batch_size=64 if args.device.startswith("cuda") else 8,
                       device=args.device)
        row["zeroshot"] = {t: headline(r) for t, r in res.items() if t in tasks}
        row["zeroshot_full"] = res
        row["mean_acc"] = sum(row["zeroshot"].values()) / max(len(row["zeroshot"]), 1)
    if args.device.startswith("cuda"):
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if args.save_best and method != "dense":
        row["_model"] = model
    else:
        del model
    return row


def table(rows) -> str:
    head = "| config | pattern | reconstruct | ppl | prune s | block error before -> after |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        be = (f"{r['block_loss_before']:.4f} -> {r['block_loss_after']:.4f}" if "block_loss_after" in r else "-")
        lines.append(f"| {r['method']} | {r['pattern'] or '-'} | {_cell(r['reconstruct'])} "
                     f"| {r['ppl']:.2f} | {r.get('prune_seconds', 0):.1f} | {be} |")
    return "\n".join(lines)


def _cell(rec: str | None) -> str:
    """The table's reconstruction cell: ``no``, ``default`` (``+`` alone) or the settings given."""
    return "no" if rec is None else (rec or "default")


def _short(rec: str | None) -> str:
    """A point's label: 'no reconstruction' or its settings (``steps=500,lr=0.003`` -> ``500 steps, lr 3e-3``)."""
    if rec is None:
        return "none"
    kv = dict(p.split("=", 1) for p in rec.split(",") if "=" in p)
    parts = [f"{kv['steps']} steps" if "steps" in kv else "default steps"]
    if "lr" in kv:
        parts.append(f"lr {float(kv['lr']):.0e}".replace("e-0", "e-"))
    return ", ".join(parts)


def plot(rows, meta, path: Path) -> None:
    """Perplexity against pruning time: one colour per method and pattern, each point
    labelled with its reconstruction settings."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    colours: dict[str, str] = {}
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for r in rows:
        if r["method"] == "dense":
            ax.axhline(r["ppl"], color="#888", ls="--", lw=1, label=f"dense {r['ppl']:.2f}")
            continue
        key = f"{r['method']} {r['pattern']}"
        new = key not in colours
        colours.setdefault(key, palette[len(colours) % len(palette)])
        x = max(r.get("prune_seconds", 0), 1e-2)
        ax.scatter([x], [r["ppl"]], color=colours[key], marker="o" if r["reconstruct"] is not None else "s",
                   label=key if new else None, zorder=3)
        ax.annotate(_short(r["reconstruct"]), (x, r["ppl"]), textcoords="offset points", xytext=(5, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pruning time, s (log; squares: no reconstruction)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"{meta['model_label']}, MLP scope\n{meta['calibration']} calibration tokens, "
                 f"{meta['eval_tokens']} eval tokens in {meta['eval_seqlen']}-token windows, {meta['device_name']}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--model-label", default="SmolLM2-135M-Instruct (embedded)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", default=None, help="calibration/evaluation ids saved by --save-tokens")
    ap.add_argument("--save-tokens", default=None, help="only tokenize: save the ids to this file")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=0, help="first N evaluation tokens (0 = all)")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--grid", choices=["default"], default=None)
    ap.add_argument("--lr", default="0.001", help="{lr} until the grid chooses one")
    ap.add_argument("--budget", type=float, default=0, help="stop starting configurations after this many seconds")
    ap.add_argument("--save-best", default=None, help="save the best 2:4 model (by perplexity) to this directory")
    ap.add_argument("--zeroshot", default=None, help="also zero-shot accuracy on these tasks (comma-separated)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier run in --out and skip the configurations it measured")
    ap.add_argument("--out", default="runs/reconstruction")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="only render: merge the rows of these JSON files (same model and protocol) into --out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows, seen = [], set()
        for r in (r for p in parts for r in p["rows"] if r.get("ppl") == r.get("ppl")):
            if r["config"] not in seen:  # a configuration measured twice: the first (the seed makes them equal)
                seen.add(r["config"])
                rows.append(r)
        meta = {**parts[0]["meta"], "merged_from": [str(f) for f in args.merge]}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reconstruction.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
        (out / "reconstruction.md").write_text(table(rows) + "\n")
        plot(rows, meta, out / "reconstruction.png")
        print(table(rows))
        return 0
    base, tok, calib, ev = load(args)
    args.tokenizer = tok
    if args.save_tokens:
        torch.save({"calibration": calib, "evaluation": ev}, args.save_tokens)
        log(f"saved {tuple(calib.shape)} calibration and {ev.numel()} evaluation ids to {args.save_tokens}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model, "model_label": args.model_label, "dtype": args.dtype, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
        "calibration": f"{calib.shape[0]} x {calib.shape[1]}", "eval_tokens": int(ev.numel()) // args.eval_seqlen
        * args.eval_seqlen, "eval_seqlen": args.eval_seqlen, "torch": torch.__version__, "argv": sys.argv,
    }
    rows: list[dict] = []
    chosen = {"lr": args.lr}
    best: dict | None = None
    done_before: set[str] = set()
    if args.resume and (out / "reconstruction.json").is_file():
        earlier = json.loads((out / "reconstruction.json").read_text())
        rows = [r for r in earlier["rows"] if r.get("ppl") == r.get("ppl")]  # failed rows run again
        chosen.update(earlier.get("chosen", {}))
        done_before = {r["config"] for r in rows}
        log(f"resumed: {len(rows)} rows from an earlier run, lr {chosen['lr']}")
    if args.save_best and (Path(args.save_best) / "config-used.txt").is_file():
        cfg, _, ppl = (Path(args.save_best) / "config-used.txt").read_text().strip().partition(" ppl ")
        best = {"ppl": float(ppl), "config": cfg, "_model": None}

    def save() -> None:
        clean = [{k: v for k, v in r.items() if k != "_model"} for r in rows]
        meta["seconds"] = time.perf_counter() - t0
        (out / "reconstruction.json").write_text(json.dumps({"meta": meta, "chosen": chosen, "rows": clean}, indent=1,
                                                            default=str) + "\n")
        (out / "reconstruction.md").write_text(table(clean) + "\n")
        plot(clean, meta, out / "reconstruction.png")

    def run(configs) -> list[dict]:
        nonlocal best
        done = []
        for c in configs:
            if c.format(**chosen) in done_before:
                continue
            if args.budget and time.perf_counter() - t0 > args.budget:
                log(f"budget reached: skipped {c}")
                continue
            try:
                row = run_one(base, c, args, calib, ev, chosen)
            except Exception as exc:  # one failing configuration must not stop the others
                log(f"{c}: FAILED: {type(exc).__name__}: {exc}")
                rows.append({"config": c, "method": c, "pattern": None, "reconstruct": None, "ppl": float("nan"),
                             "error": f"{type(exc).__name__}: {exc}"})
                continue
            model = row.pop("_model", None)
            if model is not None and row["pattern"] == "2:4" and (best is None or row["ppl"] < best["ppl"]):
                best = {"ppl": row["ppl"], "config": row["config"], "_model": model}
            rows.append(row)
            done.append(row)
            log(f"{row['config']}: ppl {row['ppl']:.3f}, {row.get('prune_seconds', 0):.1f} s"
                + (f", mean acc {row['mean_acc']:.4f} {row['zeroshot']}" if "mean_acc" in row else "")
                + (f", block error {row['block_loss_before']:.4f} -> {row['block_loss_after']:.4f}"
                   if "block_loss_after" in row else ""))
            save()
        return done

    if args.grid == "default":
        run(DEFAULT_PLAN["lr"])
        ok = [r for r in rows if r["config"] in DEFAULT_PLAN["lr"] and r["ppl"] == r["ppl"]]
        if ok:
            chosen["lr"] = min(ok, key=lambda r: r["ppl"])["reconstruct"].split("lr=")[1]
            log(f"chosen lr {chosen['lr']}")
        for phase in ("methods", "steps", "dass"):
            run(DEFAULT_PLAN[phase])
    run(args.configs or [])
    save()
    if args.save_best and best is not None and best["_model"] is not None:
        best["_model"].save_pretrained(args.save_best)
        tok.save_pretrained(args.save_best)
        (Path(args.save_best) / "config-used.txt").write_text(f"{best['config']} ppl {best['ppl']}\n")
        log(f"saved the best 2:4 model ({best['config']}, ppl {best['ppl']:.3f}) to {args.save_best}")
    print(table([{k: v for k, v in r.items() if k != "_model"} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
