"""Choosing DaSS's exponent alpha from calibration data (``dass --alpha auto``).

Pure tensor code. DaSS scores a gate/up weight by ``|W[i, j]| * a_i ** alpha``; the paper
fixes alpha = 0.5, but the best value depends on the model, the layer and the pattern.
For one GLU block and a few kept calibration input rows ``X`` (``FeatureStats.sample()``),
every candidate alpha gives gate/up masks (down is pruned as DaSS prunes it, which does not
depend on alpha); the block with those masks runs on ``X`` and each row's error is measured
where the rest of the model reads it (:func:`candidate_row_errors`):

- with a :class:`BlockView` (the residual stream entering the MLP branch at the kept rows,
  and the branch's output transform, e.g. Gemma-2/3's post-feedforward RMSNorm): the error
  of the *next layer's input* ``z_t = r_t + post(y_t)``, relative to ``||z_t||``. The next
  layer reads ``z_t`` through an RMS normalisation, so what matters is the change of ``z_t``
  relative to its own norm; an MLP whose output is small next to the residual matters
  little, and a post-norm undoes any per-token scale of the MLP output;
- without one (a layer whose form the pipeline does not know): the MLP output's error
  relative to ``||y_t||``, as before.

Two reductions over rows: ``"token"`` (mean of per-row relative errors: the loss averages
over tokens) and ``"total"`` (summed error over summed norm: dominated by the tokens with
massive activations). :func:`decide_alpha` turns the row errors into a choice that can only
move away from the paper's alpha on evidence (docs/ablation.md, "Why auto failed"):

1. the kept rows are split into two disjoint halves (alternate rows, each spread over all
   calibration windows);
2. a candidate is *eligible* only if on both halves it is no worse than the default alpha
   by the guard reduction (``"total"``: the massive tokens) nor by the primary one;
3. the eligible candidate with the lowest primary error (``"token"``) wins if it beats the
   default on both halves by more than the halves disagree (and by at least
   :data:`MIN_GAIN`); otherwise the default is kept.

Masks depend only on the weights and the neuron norms, so a reconstruction or rescale
applied after the masks does not change what is compared here.

The cost is three ``[k, d] x [d, D']``-sized products per candidate on ``k`` rows and a
subset of ``D'`` neurons, plus one dense block forward with a view: independent of the
calibration size, and small next to the layer forwards every method pays for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dass.core.glu import dass_glu_masks, glu_forward, glu_hidden  # noqa: F401  (re-exported)
from dass.core.patterns import Pattern

Activation = Callable[[torch.Tensor], torch.Tensor]

#: Default candidate exponents for ``alpha="auto"`` (0 = magnitude within DaSS's groups).
DEFAULT_CANDIDATES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
#: How candidates' per-row errors are reduced (see the module docstring).
CRITERIA = ("token", "total")
#: How a block's alpha is selected: "safe" (:func:`decide_alpha`) or "min" (the lowest
#: primary error, the first ``auto``; kept for ablations).
SELECTIONS = ("safe", "min")
#: The reduction a "safe" winner must not be worse than the default by ("none": no guard).
GUARDS = ("total", "token", "none")
#: Where errors are measured: the next layer's input where the pipeline gives a
#: :class:`BlockView`, else (and with "mlp" always) the MLP output.
MEASURES = ("next", "mlp")
#: The paper's alpha: what ``auto`` keeps unless the evidence says otherwise.
DEFAULT_ALPHA = 0.5
#: Smallest relative gain over the default alpha (on each half of the rows) that counts.
MIN_GAIN = 0.01
#: Default cap on the kept calibration input rows the candidates are compared on (the rows
#: are spread over all calibration tokens, between half the cap and the cap of them:
#: :meth:`dass.core.stats.FeatureStats._keep_sample`).
DEFAULT_SAMPLE_TOKENS = 1024
#: Default cap on the intermediate neurons (whole N:M groups, evenly spaced) the candidates
#: are compared on (None: all; the final masks always cover every neuron). A subset's error
#: misses the cross terms between the subset's and the other neurons' errors, which add up
#: coherently (all pruned neurons shrink the output along the same directions), so it is a
#: biased estimate: on Gemma-3-270M it preferred alpha 1-2 where every neuron, and the model,
#: preferred 0.5 (docs/ablation.md). Hence all neurons by default.
DEFAULT_MAX_NEURONS: int | None = None


@dataclass(frozen=True)
class BlockView:
    """How the rest of the model reads a GLU block's output, at the kept rows.

    ``residual``: ``[k, d]`` residual stream entering the MLP branch (the branch adds its
    output to it), row ``t`` matching kept input row ``t``. ``post``: the transform of the
    MLP output before the addition (Gemma-2/3's post-feedforward norm), or None."""

    residual: torch.Tensor
    post: Activation | None = None


@dataclass
class RowErrors:
    """Per-candidate squared error of each kept row (``errors[alpha]``, ``[k]``) and each
    row's squared scale (``[k]``) the errors are relative to; ``measured_at`` names where."""

    errors: dict[float, torch.Tensor]
    scale: torch.Tensor
    measured_at: str


def neuron_subset(neurons: int, pattern: Pattern, max_neurons: int | None) -> torch.Tensor | None:
    """Indices of evenly spaced whole groups of neurons (M consecutive ones for N:M, so
    the subset's N:M masks are exactly the full masks restricted to it), at most
    ``max_neurons`` of them; None when every neuron fits."""
    if not max_neurons or neurons <= max_neurons:
        return None
    size = pattern.m if pattern.is_nm else 1
    groups = neurons // size
    keep = max(1, min(groups, max_neurons // size))
    starts = torch.div(torch.arange(keep) * groups, keep, rounding_mode="floor")
    return (starts.reshape(-1, 1) * size + torch.arange(size)).reshape(-1)


def reduce_rows(err: torch.Tensor, scale: torch.Tensor, criterion: str = "token",
                rows: torch.Tensor | None = None) -> float:
    """Relative error of rows ``err`` against squared scales ``scale`` (optionally only
    ``rows``): mean of per-row ratios (``"token"``; rows of zero scale left out) or summed
    error over summed scale (``"total"``)."""
    if rows is not None:
        err, scale = err[rows], scale[rows]
    if criterion == "total":
        return float(err.sum()) / (float(scale.sum()) or 1.0)
    if criterion != "token":
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    live = scale > 0
    if not bool(live.any()):
        return float(err.sum())
    return float((err[live] / scale[live]).mean())


def relative_error(pruned: torch.Tensor, dense: torch.Tensor, criterion: str = "token") -> float:
    """Relative reconstruction error of outputs ``pruned`` against ``dense`` (``[rows, d]``):
    the mean over rows of each row's relative squared error (``"token"``; rows whose dense
    output is zero are left out), or the total squared error over the total squared norm
    (``"total"``)."""
    return reduce_rows((pruned - dense).pow(2).sum(dim=1), dense.pow(2).sum(dim=1), criterion)


def halves(k: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of ``k`` kept rows: alternate rows (the rows are ordered by
    calibration position, so each half spreads over all windows)."""
    idx = torch.arange(k, device=device)
    return idx[0::2], idx[1::2]


def candidate_row_errors(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    down_mask: torch.Tensor,
    neuron_norm: torch.Tensor,
    x: torch.Tensor,
    pattern: Pattern,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    act: Activation | None = None,
    max_neurons: int | None = None,
    view: BlockView | None = None,
    rescale: str = "none",
    rescale_target: str = "block",
) -> RowErrors:
    """Each candidate's squared error on each kept row, where the model reads the block
    (module docstring), and the rows' squared scales.

    With ``max_neurons`` the candidates are compared on an evenly spaced subset of whole
    neuron groups (:func:`neuron_subset`): the sub-block's output error estimates the
    block's at a fraction of the cost (exact masks for N:M). With a ``view`` the sub-block's
    error is added to the *full* dense block output before ``post``, so a nonlinear
    post-norm sees the right scale. With ``rescale`` ("down"/"all"), each candidate is
    judged after :func:`dass.core.rescale.rescale_glu` fitted on the same rows, as it will
    be applied (``alpha_rescaled``; the halves of :func:`decide_alpha` then compare
    in-sample fits).
    """
    from dass.core.rescale import rescale_glu

    act = act or F.silu
    xf = x.float()
    g, u, dn, dm, a = gate.float(), up.float(), down.float(), down_mask, neuron_norm.float()
    idx = neuron_subset(g.shape[0], pattern, max_neurons)
    full_y = glu_forward(g, u, dn, xf, act) if view is not None else None
    if idx is not None:
        idx = idx.to(g.device)
        g, u, a, dn, dm = g[idx], u[idx], a[idx], dn[:, idx], dm[:, idx]
    y = glu_hidden(xf, g, u, act) @ dn.t()
    if view is not None:
        post = view.post or (lambda t: t)
        z = view.residual.float() + post(full_y).float()
        scale, where = z.pow(2).sum(1), ("next layer input (post-norm)" if view.post else "next layer input")
    else:
        scale, where = y.pow(2).sum(1), "MLP output"
    out: dict[float, torch.Tensor] = {}
    for alpha in candidates:
        mg, mu = dass_glu_masks(g, u, a, pattern, float(alpha))
        if rescale == "none":
            h = glu_hidden(xf, g * mg, u * mu, act)
            yp = h @ (dn * dm).t()
        else:  # judged as it will be applied: fitted on the same rows
            gp, upp, dp, _ = rescale_glu(g, u, dn, (mg, mu, dm), xf, act, scope=rescale, target=rescale_target,
                                         dense_out=y, normalise=view is not None and view.post is not None)
            yp = glu_hidden(xf, gp, upp, act) @ dp.t()
        diff = yp - y
        if view is not None:
            diff = post(full_y + diff).float() - post(full_y).float() if view.post else diff
        out[float(alpha)] = diff.pow(2).sum(1)
    return RowErrors(out, scale, where)


def alpha_errors(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    down_mask: torch.Tensor,
    neuron_norm: torch.Tensor,
    x: torch.Tensor,
    pattern: Pattern,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    act: Activation | None = None,
    max_neurons: int | None = None,
    criterion: str = "token",
    rescale: str = "none",
    rescale_target: str = "block",
    view: BlockView | None = None,
) -> dict[float, float]:
    """Each candidate's relative error over all kept rows (:func:`candidate_row_errors`
    reduced by ``criterion``)."""
    rows = candidate_row_errors(gate, up, down, down_mask, neuron_norm, x, pattern, candidates, act,
                                max_neurons, view, rescale, rescale_target)
    return {a: reduce_rows(e, rows.scale, criterion) for a, e in rows.errors.items()}


@dataclass
class AlphaDecision:
    """What :func:`decide_alpha` chose and why (recorded in the gate/up results' ``info``)."""

    alpha: float
    reason: str  # "gain" | "default is best" | "weak evidence" | "guard" (no eligible candidate beat the default)
    errors: dict[float, float]  # primary reduction over all rows, per candidate
    guard_errors: dict[float, float]
    gain: float  # the winner's relative gain over the default (smaller of the two halves)
    noise: float  # how much the two halves disagree about that ratio
    proposed: float  # the best candidate by the primary error alone

    def info(self) -> dict:
        return {
            "alpha": self.alpha,
            "alpha_errors": {str(a): e for a, e in self.errors.items()},
            "alpha_guard_errors": {str(a): e for a, e in self.guard_errors.items()},
            "alpha_decision": {"reason": self.reason, "gain": self.gain, "noise": self.noise,
                               "proposed": self.proposed},
        }


def decide_alpha(
    rows: RowErrors,
    criterion: str = "token",
    guard: str | None = "total",
    default: float = DEFAULT_ALPHA,
    min_gain: float = MIN_GAIN,
) -> AlphaDecision:
    """The alpha to use for one block (module docstring, steps 1-3).

    A candidate may replace ``default`` only if, on each of two disjoint halves of the
    rows, it is no worse than the default by ``guard`` and by ``criterion``, and its gain
    by ``criterion`` (``1 - err / err_default`` on the worse half) exceeds both ``min_gain``
    and the halves' disagreement about that ratio. ``default`` must be a candidate.
    """
    if default not in rows.errors:
        raise ValueError(f"the default alpha {default} must be one of the candidates {sorted(rows.errors)}")
    k = rows.scale.shape[0]
    parts = halves(k, rows.scale.device)
    crit = {a: reduce_rows(e, rows.scale, criterion) for a, e in rows.errors.items()}
    crit_h = {a: [reduce_rows(e, rows.scale, criterion, p) for p in parts] for a, e in rows.errors.items()}
    gcrit = guard or criterion
    grd = {a: reduce_rows(e, rows.scale, gcrit) for a, e in rows.errors.items()}
    grd_h = {a: [reduce_rows(e, rows.scale, gcrit, p) for p in parts] for a, e in rows.errors.items()}
    proposed = min(crit, key=lambda a: crit[a])

    def not_worse(h: dict[float, list[float]], a: float) -> bool:
        return all(v <= d for v, d in zip(h[a], h[default]))

    eligible = [a for a in crit if a == default or (not_worse(grd_h, a) and not_worse(crit_h, a))]
    best = min(eligible, key=lambda a: crit[a])
    ratios = [v / d if d > 0 else 1.0 for v, d in zip(crit_h[best], crit_h[default])]
    gain, noise = 1.0 - max(ratios), abs(ratios[0] - ratios[1])
    if best == default:
        reason = "default is best" if proposed == default else "guard"
        alpha = default
    elif gain > max(min_gain, noise):
        reason, alpha = "gain", best
    else:
        reason, alpha = "weak evidence", default
    return AlphaDecision(alpha, reason, crit, grd, gain, noise, proposed)


def choose_alpha(errors: dict[float, float]) -> float:
    """The candidate with the lowest error (the first listed among exact ties)."""
    return min(errors, key=lambda a: errors[a])


def select_alpha(rows: RowErrors, select: str = "safe", criterion: str = "token", guard: str = "total",
                 default: float = DEFAULT_ALPHA) -> tuple[float, dict]:
    """The chosen alpha and the ``info`` to record: :func:`decide_alpha` (``"safe"``) or the
    lowest ``criterion`` error (``"min"``)."""
    if select == "min":
        errors = {a: reduce_rows(e, rows.scale, criterion) for a, e in rows.errors.items()}
        alpha = choose_alpha(errors)
        return alpha, {"alpha": alpha, "alpha_errors": {str(a): e for a, e in errors.items()},
                       "alpha_measured_at": rows.measured_at}
    if select != "safe":
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    decision = decide_alpha(rows, criterion, None if guard == "none" else guard, default)
    return decision.alpha, {**decision.info(), "alpha_measured_at": rows.measured_at}
