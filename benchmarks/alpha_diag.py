"""Why ``--alpha auto`` chose what it chose: each candidate alpha per layer of a *dense* model,
by every block-level measure, against a model-level truth (issue 15).

For each layer: DaSS's masks for every candidate alpha (down pruned as DaSS prunes it)
from statistics of ``--nsamples`` calibration windows; the block errors of the candidates
on the kept calibration rows (what auto sees) and on held-out windows, at the MLP output
(``tok``/``tot``: per-token mean / summed, the first auto's measures) and at the next layer's
input ``r + post(y)`` (``next_tok``/``next_tot``, the measures of the safe auto); with
``--truth``, the model-level effect: only this layer's MLP pruned with that alpha, the KL
divergence of the model's next-token distribution from the dense model's on the held-out
windows (one full forward per layer and candidate: slow on a CPU for a large vocabulary).

    python benchmarks/alpha_diag.py --model PATH --pattern 2:4 --out diag.json
    python benchmarks/alpha_diag.py --model PATH --layers 0,3,4,5,6 --truth --out truth.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MEASURES = ("tok_kept", "tot_kept", "tok_held", "next_tok", "next_tot")


def main(argv=None) -> None:
    from dass.arch import plan_model
    from dass.core.alpha import DEFAULT_CANDIDATES, dass_glu_masks, relative_error
    from dass.core.patterns import parse_pattern
    from dass.core.stats import FeatureStats
    from dass.io.data import sample_calibration
    from dass.io.models import load_model
    from dass.methods.wanda import wanda_mask
    from dass.run.propagate import mlp_residual

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--held", type=int, default=8, help="held-out windows (seed + 1)")
    ap.add_argument("--layers", default="", help="comma-separated (default: all)")
    ap.add_argument("--truth", action="store_true", help="also the single-layer KL of every candidate")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu")
    plans = {p.index: p for p in plan_model(model, "mlp")}
    layers = [int(v) for v in args.layers.split(",")] if args.layers else sorted(plans)
    calib = sample_calibration(tok, "default", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    held = sample_calibration(tok, "default", nsamples=args.held, seqlen=args.seqlen, seed=1)
    cap: dict[int, dict[str, list]] = {i: {"x": [], "r": []} for i in layers}
    hooks = []
    for i in layers:
        branch = mlp_residual(plans[i])
        hooks.append(plans[i].glu[0].gate.module.register_forward_pre_hook(
            lambda m, a, i=i: cap[i]["x"].append(a[0].detach())))
        hooks.append(branch.entry.register_forward_pre_hook(lambda m, a, i=i: cap[i]["r"].append(a[0].detach())))
    with torch.no_grad():
        for b in torch.cat([calib, held]).split(8):
            model.model(input_ids=b, use_cache=False)
        dense_lp = torch.log_softmax(model(held[:4], use_cache=False).logits.float(), -1) if args.truth else None
    for h in hooks:
        h.remove()
    ncal, pat, out = calib.numel(), parse_pattern(args.pattern), []
    for i in layers:
        branch, blk = mlp_residual(plans[i]), plans[i].glu[0]
        act, post = blk.act, (mlp_residual(plans[i]).post or (lambda t: t))
        refs = (blk.gate, blk.up, blk.down)
        g, u, dn = (r.get().detach().float().clone() for r in refs)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in cap[i]["x"]]).float()
        r = torch.cat([t.reshape(-1, t.shape[-1]) for t in cap[i]["r"]]).float()[ncal:]
        sx, sh = FeatureStats(x.shape[1], max_samples=1024), FeatureStats(g.shape[0])
        for ch in x[:ncal].split(4096):
            sx.add(ch)
            sh.add(act(ch @ g.t()) * (ch @ u.t()))
        kept, xh = sx.sample(), x[ncal:]
        dm = wanda_mask(dn, sh, pat).mask

        def fwd(gg, uu, dd, rows):
            return (act(rows @ gg.t()) * (rows @ uu.t())) @ dd.t()

        with torch.no_grad():
            yk, yh = fwd(g, u, dn, kept), fwd(g, u, dn, xh)
            z = r + post(yh)
            rec = {"layer": i, "kept_rows": int(kept.shape[0]),
                   "kept_first_positions": int((torch.cat(sx.sample_index) % args.seqlen == 0).sum()),
                   "token_norm_max_over_median": float(z.norm(dim=1).max() / z.norm(dim=1).median()),
                   "mlp_over_residual_median": float((post(yh).norm(dim=1) / z.norm(dim=1)).median()),
                   "candidates": {}}
            for alpha in DEFAULT_CANDIDATES:
                mg, mu = dass_glu_masks(g, u, sh.norm, pat, alpha)
                w = (g * mg, u * mu, dn * dm)
                ykp, yhp = fwd(*w, kept), fwd(*w, xh)
                dz = (post(yhp) - post(yh)).pow(2).sum(1)
                c = {"tok_kept": relative_error(ykp, yk, "token"), "tot_kept": relative_error(ykp, yk, "total"),
                     "tok_held": relative_error(yhp, yh, "token"),
                     "next_tok": float((dz / z.pow(2).sum(1)).mean()), "next_tot": float(dz.sum() / z.pow(2).sum())}
                if args.truth:
                    for ref, wt in zip(refs, w):
                        ref.get().copy_(wt)
                    lp = torch.log_softmax(model(held[:4], use_cache=False).logits.float(), -1)
                    c["kl_single_layer"] = float((dense_lp.exp() * (dense_lp - lp)).sum(-1).mean())
                    for ref, wt in zip(refs, (g, u, dn)):
                        ref.get().copy_(wt)
                rec["candidates"][str(alpha)] = c
        cands = rec["candidates"]
        keys = MEASURES + (("kl_single_layer",) if args.truth else ())
        rec["best"] = {k: min(cands, key=lambda a: cands[a][k]) for k in keys}
        print(json.dumps({k: v for k, v in rec.items() if k != "candidates"}), flush=True)
        out.append(rec)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
