"""Least-squares per-output-row rescaling of pruned matrices (``dass --rescale``).

Pure tensor code. Masking a matrix row ``w_j`` to ``w'_j`` changes its output on input rows
``X`` from ``X w_j`` to ``X w'_j``. The scalar ``s_j`` minimising ``||X w_j - s X w'_j||^2`` is

    s_j = <X w_j, X w'_j> / ||X w'_j||^2

and ``s_j w'_j`` keeps the mask (still exactly N:M). It costs one product of the kept rows
with each matrix, next to nothing beside the layer forwards.

For a GLU block ``y = W_down (act(W_gate x) * W_up x)`` on kept calibration input rows:

- ``scope="down"``: only W_down's rows are rescaled, on the intermediate activations of the
  *pruned* gate/up (sequentially inside the block), against the dense block output
  (``target="block"``) or against the dense W_down applied to those same pruned
  activations (``target="layer"``, the layer-local least squares).
- ``scope="all"``: first W_gate's and W_up's rows against their own dense outputs
  (``X W_gate^T``, ``X W_up^T``), then W_down as above on the rescaled gate/up.

``normalise=True`` (a block whose output passes through an RMS norm before the residual,
Gemma-2/3's post-feedforward norm): W_down's factors are fitted on the per-token *unit*
outputs ``y_t / ||y_t||`` and ``y'_t / ||y'_t||``. The norm undoes each token's scale, so
the plain fit's main correction (the pruned block's overall shrinkage) is wasted there and
its per-channel part is weighted by the tokens' norms instead of what the next layer reads
(issue 15: the plain fit did nothing on a Gemma model, 137.17 -> 137.10, and on
Gemma-3-270M it cost 1%; docs/ablation.md).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dass.core.glu import glu_hidden

Activation = Callable[[torch.Tensor], torch.Tensor]

SCOPES = ("none", "down", "all")
TARGETS = ("block", "layer")


def ls_scale(target: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Per-column least-squares factor ``s_j = <target_j, approx_j> / ||approx_j||^2`` of
    outputs ``[rows, out]`` (fp32); 1 where ``approx_j`` is zero on every row."""
    t, a = target.float(), approx.float()
    num = (t * a).sum(0)
    den = a.pow(2).sum(0)
    live = den > 0
    return torch.where(live, num / torch.where(live, den, torch.ones_like(den)), torch.ones_like(den))


def rescale_rows(weight: torch.Tensor, mask: torch.Tensor, x: torch.Tensor,
                 target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s.reshape(-1, 1) * (weight * mask), s)`` with ``s`` the least-squares factor of each
    output row of ``weight`` ``[out, in]`` on input rows ``x`` ``[k, in]``, against
    ``target`` ``[k, out]`` (default: the dense output ``x @ weight.T``)."""
    xf, w = x.float(), weight.float()
    pruned = w * mask
    if target is None:
        target = xf @ w.t()
    s = ls_scale(target, xf @ pruned.t())
    return pruned * s.reshape(-1, 1), s


def rescale_glu(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    act: Activation | None = None,
    scope: str = "down",
    target: str = "block",
    dense_out: torch.Tensor | None = None,
    normalise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked (and rescaled) fp32 gate, up, down of one GLU block and the factors used
    (``{"gate": s, "up": s, "down": s}``, only for the rescaled matrices). ``dense_out``:
    the dense block output on ``x`` when the caller has it already (``target="block"``).
    ``normalise``: fit W_down's factors on per-token unit outputs (module docstring)."""
    if scope not in SCOPES or scope == "none":
        raise ValueError(f"scope must be 'down' or 'all', got {scope!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    act = act or F.silu
    mg, mu, md = masks
    xf = x.float()
    g, u, dn = gate.float(), up.float(), down.float()
    scales: dict[str, torch.Tensor] = {}
    if scope == "all":
        gp, scales["gate"] = rescale_rows(g, mg, xf)
        upr, scales["up"] = rescale_rows(u, mu, xf)
    else:
        gp, upr = g * mg, u * mu
    h = glu_hidden(xf, gp, upr, act)
    if target == "block":
        y = dense_out.float() if dense_out is not None else glu_hidden(xf, g, u, act) @ dn.t()
    else:
        y = h @ dn.t()
    if normalise:
        approx = h @ (dn * md).t()
        s = ls_scale(y / _row_norm(y), approx / _row_norm(approx))
        dp, scales["down"] = (dn * md) * s.reshape(-1, 1), s
    else:
        dp, scales["down"] = rescale_rows(dn, md, h, y)
    return gp, upr, dp, scales


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    """Each row's L2 norm as a column, 1 for zero rows (they then contribute nothing)."""
    n = t.norm(dim=1, keepdim=True)
    return torch.where(n > 0, n, torch.ones_like(n))
