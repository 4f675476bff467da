"""What ``dass --alpha auto`` chose, in words for the run's summary (issue 15).

Pure functions of the ``info`` dicts that :func:`dass.core.alpha.select_alpha` records on
each gate matrix. The manifest keeps every number; the summary a user reads must still
say which alpha each block got, how often the paper's alpha was kept for lack of evidence,
and warn when the choice moved far from what any fixed alpha gives, since that is where a
per-block choice can mislead (docs/ablation.md).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

#: Blocks listed one by one up to this many (an MoE model has one block per expert).
MAX_LISTED = 64
#: Warn when the chosen alphas' summed block error is this much lower than the best
#: single fixed alpha's (a large claimed gain is where a block-level measure can mislead).
FAR_GAIN = 0.15


def _fmt(a: float) -> str:
    return f"{a:g}"


def alpha_summary(infos: Sequence[dict[str, Any]]) -> list[str]:
    """Summary lines for the gate matrices' ``info`` (one per GLU block, in model order);
    empty when no block chose its alpha from data. Lines starting ``warning:`` are warnings."""
    chosen = [i for i in infos if "alpha_errors" in i or "alpha_auto" in i]
    if not chosen:
        return []
    alphas = [float(i["alpha"]) for i in chosen]
    reasons = [i.get("alpha_decision", {}).get("reason", "") for i in chosen]
    kept = {"weak evidence", "guard"}
    marks = ["*" if r in kept else ("!" if "alpha_auto" in i else "") for i, r in zip(chosen, reasons)]
    where = {i.get("alpha_measured_at") for i in chosen if i.get("alpha_measured_at")}
    if len(chosen) <= MAX_LISTED:
        per = " ".join(_fmt(a) + m for a, m in zip(alphas, marks))
    else:
        per = ", ".join(f"{_fmt(a)}: {n} blocks" for a, n in sorted(Counter(alphas).items()))
    lines = [f"alpha auto per block: {per}"]
    notes = []
    n_kept = sum(m == "*" for m in marks)
    if n_kept:
        notes.append(f"* = {n_kept} block(s) kept the paper's 0.5 (weak evidence or guard)")
    if "!" in marks:
        notes.append(f"! = {marks.count('!')} block(s) without kept rows (0.5)")
    if where:
        notes.append("errors measured at the " + " / ".join(sorted(where)))
    if notes:
        lines.append("  " + "; ".join(notes))
    lines += _far_warnings(chosen, alphas)
    return lines


def _far_warnings(chosen: Sequence[dict[str, Any]], alphas: Sequence[float]) -> list[str]:
    """Warnings comparing the per-block choice with every fixed alpha, summed over blocks."""
    errs = [{float(a): e for a, e in i["alpha_errors"].items()} for i in chosen if "alpha_errors" in i]
    if not errs:
        return []
    picked = [float(i["alpha"]) for i in chosen if "alpha_errors" in i]
    common = set.intersection(*(set(e) for e in errs))
    if not common:
        return []
    fixed = {a: sum(e[a] for e in errs) for a in common}
    best = min(fixed, key=lambda a: fixed[a])
    auto = sum(e.get(p, e[best]) for e, p in zip(errs, picked))
    out = []
    gain = 1.0 - auto / fixed[best] if fixed[best] > 0 else 0.0
    if gain > FAR_GAIN:
        out.append(f"warning: alpha auto's summed block error is {gain:.0%} below the best fixed alpha's "
                   f"({_fmt(best)}); a gain this large rests on the block-level measure alone: compare the "
                   f"model's perplexity with --alpha {_fmt(best)}")
    edge = sorted(common)
    at_edge = [k for k, p in enumerate(picked) if p in (edge[0], edge[-1]) and p != 0.5 and len(edge) > 2]
    if at_edge and len(at_edge) * 4 >= len(picked):
        out.append(f"warning: {len(at_edge)} of {len(picked)} blocks chose alpha {_fmt(edge[0])} or "
                   f"{_fmt(edge[-1])}, the ends of the candidate set: the best value may lie outside it")
    if "alpha_guard_errors" in chosen[0]:
        g_auto = sum(i["alpha_guard_errors"][str(float(i["alpha"]))] for i in chosen if "alpha_guard_errors" in i)
        g_def = sum(i["alpha_guard_errors"].get("0.5", 0.0) for i in chosen if "alpha_guard_errors" in i)
        if g_def > 0 and g_auto > g_def * (1 + 1e-6):
            out.append("warning: the chosen alphas' summed guard error exceeds alpha 0.5's")
    return out
