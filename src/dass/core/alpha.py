"""Choosing DaSS's exponent alpha from calibration data (``dass --alpha auto``).

Pure tensor code. DaSS scores a gate/up weight by ``|W[i, j]| * a_i ** alpha``; the paper
fixes alpha = 0.5, but the best value depends on the model, the layer and the pattern.
For one GLU block and a few kept calibration input rows ``X`` (``FeatureStats.sample()``),
every candidate alpha gives gate/up masks; the block with those masks (and down pruned as
DaSS prunes it, which does not depend on alpha) is run on ``X`` and the candidate whose
MLP output is closest to the dense block's output wins. With ``y_t`` the dense block's
output for row ``t`` and ``y'_t(alpha)`` the pruned block's,

    err(alpha) = mean_t ||y'_t(alpha) - y_t||^2 / ||y_t||^2        (criterion "token", default)
    err(alpha) = sum_t ||y'_t(alpha) - y_t||^2 / sum_t ||y_t||^2    (criterion "total")

Why per token: the next layer reads the residual stream through an RMS normalisation, and
the loss averages over tokens, so what matters is each token's error relative to its own
scale. The summed error is dominated by the few tokens with massive MLP outputs (attention
sinks, the first token) and on the embedded SmolLM2 it picks smaller alphas than are best
for perplexity (docs/ablation.md: 2:4 perplexity 70.1 with "total", 67.4 with "token",
Wanda 85.4).

The cost is three ``[k, d] x [d, D]``-sized products per candidate on ``k`` rows, plus one
mask selection per candidate and matrix: independent of the calibration size, and small
next to the layer forwards every method pays for.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dass.core.glu import dass_glu_masks, glu_forward, glu_hidden  # noqa: F401  (glu_forward: re-exported)
from dass.core.patterns import Pattern

Activation = Callable[[torch.Tensor], torch.Tensor]

#: Default candidate exponents for ``alpha="auto"`` (0 = magnitude within DaSS's groups).
DEFAULT_CANDIDATES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
#: How candidates' block-output errors are compared (see the module docstring).
CRITERIA = ("token", "total")
#: Default cap on the kept calibration input rows the candidates are compared on (the rows
#: are spread over all calibration tokens, between half the cap and the cap of them:
#: :meth:`dass.core.stats.FeatureStats._keep_sample`).
DEFAULT_SAMPLE_TOKENS = 1024
#: Default number of intermediate neurons (whole N:M groups, evenly spaced) the candidates
#: are compared on; the final masks always cover every neuron.
DEFAULT_MAX_NEURONS = 512


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


def relative_error(pruned: torch.Tensor, dense: torch.Tensor, criterion: str = "token") -> float:
    """Relative reconstruction error of outputs ``pruned`` against ``dense`` (``[rows, d]``):
    the mean over rows of each row's relative squared error (``"token"``; rows whose dense
    output is zero are left out), or the total squared error over the total squared norm
    (``"total"``)."""
    diff = (pruned - dense).pow(2).sum(dim=1)
    norm = dense.pow(2).sum(dim=1)
    if criterion == "total":
        return float(diff.sum()) / (float(norm.sum()) or 1.0)
    if criterion != "token":
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    live = norm > 0
    if not bool(live.any()):
        return float(diff.sum())
    return float((diff[live] / norm[live]).mean())


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
) -> dict[float, float]:
    """Relative block-output reconstruction error (:func:`relative_error`) for each candidate.

    With ``max_neurons``, the block is restricted to an evenly spaced subset of whole
    neuron groups (:func:`neuron_subset`): the error of that sub-block estimates the
    block's at a fraction of the cost (exact masks for N:M; for unstructured sparsity the
    per-column ranking runs within the subset).

    With ``rescale`` ("down" or "all"), each candidate's block is judged after the
    least-squares row rescaling of :func:`dass.core.rescale.rescale_glu` (fitted on the same rows
    and sub-block), i.e. as it will be applied.
    """
    from dass.core.rescale import rescale_glu

    act = act or F.silu
    xf = x.float()
    g, u, dn, dm, a = gate.float(), up.float(), down.float(), down_mask, neuron_norm.float()
    idx = neuron_subset(g.shape[0], pattern, max_neurons)
    if idx is not None:
        idx = idx.to(g.device)
        g, u, a, dn, dm = g[idx], u[idx], a[idx], dn[:, idx], dm[:, idx]
    dense_h = glu_hidden(xf, g, u, act)
    y = dense_h @ dn.t()
    d_pruned = dn * dm
    out: dict[float, float] = {}
    for alpha in candidates:
        mg, mu = dass_glu_masks(g, u, a, pattern, float(alpha))
        if rescale != "none":
            gp, upp, dp, _ = rescale_glu(g, u, dn, (mg, mu, dm), xf, act, scope=rescale, target=rescale_target,
                                         dense_out=y)
        else:
            gp, upp, dp = g * mg, u * mu, d_pruned
        h = glu_hidden(xf, gp, upp, act)
        out[float(alpha)] = relative_error(h @ dp.t(), y, criterion)
    return out


def choose_alpha(errors: dict[float, float]) -> float:
    """The candidate with the lowest error (the first listed among exact ties)."""
    return min(errors, key=lambda a: errors[a])
