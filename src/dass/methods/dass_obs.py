"""DaSS-OBS: DaSS's dependency-aware grouping and neuron weighting with SparseGPT's OBS
weight reconstruction (a weight-updating DaSS). Registered as ``dass-obs``.

W_gate and W_up (which share the block input and its Hessian ``H_x``) are stacked and swept
once, input column by input column, with SparseGPT's blocked OBS updates. How the masks
are chosen (``masks``):

- ``sweep`` (default): each input column's pruned rows are chosen when the sweep reaches
  it, on the weights already updated by the earlier columns, by ``r_i * w_ij^2`` within
  DaSS's groups (M consecutive output rows of the column for N:M, "output" orientation;
  the whole column for unstructured). The OBS saliency ``w_ij^2 / [H^-1]_jj`` is the same
  for every row of a column, so the neuron weight ``r_i`` is what lets rows compete
  (:mod:`dass.core.obs`). Since a group lies inside one column, the columns can be swept in
  any order: ``order="hessian"`` (default) takes them by decreasing ``H_jj``, as GPTQ's
  act-order, ``order="natural"`` left to right.
- ``fixed``: DaSS's masks are chosen first from the dense weights (``|W| * a_i^alpha``),
  then SparseGPT's update runs with those masks fixed (the issue's measured variant).

Neuron weights ``r_i`` (``weights``):

- ``dass`` (default): ``a_i ** (2 alpha)``, DaSS's score squared (``a_i`` = intermediate
  neuron norm; ``alpha`` defaults to 1 here).
- ``taylor``: the second-order weight of the dependency group for the block output: gate
  row i counts ``||W_down'[:, i]||^2 * mean(act'(g_i) u_i)^2``, up row i
  ``||W_down'[:, i]||^2 * mean(act(g_i)^2)`` (``W_down'`` the pruned, updated down
  projection; means over ``sample_tokens`` kept calibration rows). It reconstructs each
  block better but gave a higher perplexity (docs/ablation.md).

W_down is pruned first, by SparseGPT itself (its OBS saliency ``w^2 / [H_h^-1]_ii^2``
generalises DaSS's/Wanda's ``|w| a_i`` along the reduction dimension), or, with
``down="dass"``, with DaSS's down mask fixed and OBS updates. Attention projections (scope
``all``) are pruned by SparseGPT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dass.core.obs import obs_prune_output_groups
from dass.core.patterns import Orientation, Pattern
from dass.core.sparsegpt import sparsegpt_prune
from dass.core.stats import FeatureStats
from dass.methods.base import MatrixResult, MethodError, PruningMethod, register
from dass.methods.dass import dass_glu_mask
from dass.methods.wanda import wanda_mask

MASKS = ("sweep", "fixed")
ORDERS = ("hessian", "natural")
WEIGHTS = ("dass", "taylor")
DOWNS = ("sparsegpt", "dass")


def taylor_weights(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, act=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-order block-output weights of gate rows and up rows from input rows ``x``."""
    act = act or F.silu
    xf = x.float()
    with torch.enable_grad():
        g = (xf @ gate.detach().float().t()).requires_grad_(True)
        a = act(g)
        (da,) = torch.autograd.grad(a.sum(), g)
    a = a.detach()
    u = xf @ up.detach().float().t()
    col = down.detach().float().pow(2).sum(0)
    return col * (da * u).pow(2).mean(0), col * a.pow(2).mean(0)


@register
class DaSSOBS(PruningMethod):
    name = "dass-obs"
    requires_glu = True
    needs_hessian = True

    def __init__(
        self,
        alpha: float = 1.0,
        masks: str = "sweep",
        weights: str = "dass",
        down: str = "sparsegpt",
        blocksize: int = 128,
        percdamp: float = 0.01,
        sample_tokens: int = 512,
        order: str = "hessian",
    ) -> None:
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError):
            raise MethodError(f"dass-obs: alpha must be a number, got {alpha!r}") from None
        if not self.alpha >= 0:
            raise MethodError(f"alpha must be >= 0, got {alpha!r}")
        for label, value, allowed in (("masks", masks, MASKS), ("weights", weights, WEIGHTS), ("down", down, DOWNS),
                                      ("order", order, ORDERS)):
            if value not in allowed:
                raise MethodError(f"dass-obs: {label} must be one of {', '.join(allowed)}, got {value!r}")
        if masks == "fixed" and weights != "dass":
            raise MethodError("dass-obs: masks='fixed' uses DaSS's own scores; weights must be 'dass'")
        self.masks, self.weights, self.down, self.order = masks, weights, down, order
        self.blocksize, self.percdamp = int(blocksize), float(percdamp)
        self.sample_tokens = int(sample_tokens) if weights == "taylor" else 0

    def options(self) -> dict:
        opts = {"alpha": self.alpha, "masks": self.masks, "weights": self.weights, "down": self.down,
                "blocksize": self.blocksize, "percdamp": self.percdamp}
        if self.masks == "sweep":
            opts["order"] = self.order
        if self.weights == "taylor":
            opts["sample_tokens"] = self.sample_tokens
        return opts

    def orientation(self, role: str) -> Orientation:
        return "output" if role in ("gate", "up") else "input"

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        """Attention (scope ``all``) and non-GLU linears: SparseGPT."""
        assert stats is not None
        res = sparsegpt_prune(weight, stats.hessian(), pattern, blocksize=self.blocksize, percdamp=self.percdamp)
        return MatrixResult(res.mask, "input" if pattern.is_nm else None, weight=res.weight,
                            info={"damp": res.damp, "dead_inputs": res.dead_inputs})

    def _row_weights(self, gate, up, down, x_stats, h_stats, act):
        if self.weights == "taylor":
            x = x_stats.sample() if x_stats is not None else None
            if x is not None and x.shape[0]:
                rg, ru = taylor_weights(gate, up, down, x.to(gate.device), act)
                return torch.cat([rg, ru]), "taylor"
        r = h_stats.norm.to(gate.device).float().pow(2 * self.alpha)
        return torch.cat([r, r]), "dass"

    def prune_glu(self, gate, up, down, x_stats, h_stats, pattern, act=None):
        assert x_stats is not None and h_stats is not None
        D = gate.shape[0]
        # down: along the reduction dimension, like SparseGPT (or DaSS's mask + OBS update)
        down_mask = wanda_mask(down, h_stats, pattern).mask if self.down == "dass" else None
        rd = sparsegpt_prune(down, h_stats.hessian(), pattern, blocksize=self.blocksize,
                             percdamp=self.percdamp, mask=down_mask)
        stacked = torch.cat([gate.detach(), up.detach()])
        hx = x_stats.hessian()
        if self.masks == "fixed":
            mg = dass_glu_mask(gate, h_stats, pattern, self.alpha).mask
            mu = dass_glu_mask(up, h_stats, pattern, self.alpha).mask
            res = sparsegpt_prune(stacked, hx, pattern, blocksize=self.blocksize, percdamp=self.percdamp,
                                  mask=torch.cat([mg, mu]))
            used = "dass"
        else:
            # the gate/up errors reach the output through the *pruned* W_down
            r, used = self._row_weights(gate, up, rd.weight, x_stats, h_stats, act)
            res = obs_prune_output_groups(stacked, hx, pattern, r, row_groups=2, blocksize=self.blocksize,
                                          percdamp=self.percdamp, order=self.order)
        orient_gu = "output" if pattern.is_nm else None
        info = {"damp": res.damp, "dead_inputs": res.dead_inputs, "weights": used}
        if res.retries:
            info["cholesky_retries"] = res.retries
        wg, wu = res.weight.split(D)
        mg, mu = res.mask.split(D)
        dinfo = {"damp": rd.damp, "dead_inputs": rd.dead_inputs}
        if rd.retries:
            dinfo["cholesky_retries"] = rd.retries
        return (
            MatrixResult(mg.contiguous(), orient_gu, weight=wg.to(gate.dtype), info=dict(info)),
            MatrixResult(mu.contiguous(), orient_gu, weight=wu.to(up.dtype), info=dict(info)),
            MatrixResult(rd.mask, "input" if pattern.is_nm else None, weight=rd.weight, info=dinfo),
        )
