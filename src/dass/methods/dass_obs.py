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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dass.core.glu import dass_glu_masks
from dass.core.obs import obs_prune_output_groups
from dass.core.patterns import Orientation, Pattern
from dass.core.sparsegpt import sparsegpt_prune
from dass.core.stats import FeatureStats
from dass.methods.base import MatrixResult, PruningMethod, register
from dass.methods.options import (
    MethodError,
    MethodOptions,
    as_nonneg_float,
    as_positive_int,
    one_of,
    option,
)
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


@dataclass(frozen=True)
class DaSSOBSOptions(MethodOptions):
    method = "dass-obs"
    alpha: float = option(1.0, "exponent of the neuron norm in the row weights a^(2 alpha)", as_nonneg_float)
    masks: str = option("sweep", "sweep (chosen during the OBS sweep) or fixed (DaSS's masks first)", one_of(*MASKS))
    weights: str = option("dass", "row weights: dass (a^(2 alpha)) or taylor (second-order block-output weights)",
                          one_of(*WEIGHTS))
    down: str = option("sparsegpt", "W_down: sparsegpt (its own OBS masks) or dass (DaSS's mask + OBS update)",
                       one_of(*DOWNS))
    blocksize: int = option(128, "input columns per OBS block", as_positive_int)
    percdamp: float = option(0.01, "dampening, as a fraction of the mean Hessian diagonal", as_nonneg_float)
    sample_tokens: int | None = option(None, "with weights=taylor: kept calibration input rows", as_positive_int,
                                       when=lambda o: o.weights == "taylor", default_text="512")
    order: str | None = option(None, "with masks=sweep: column order, hessian (decreasing H_jj) or natural",
                               one_of(*ORDERS), when=lambda o: o.masks == "sweep", default_text="hessian")

    def resolve(self) -> None:
        if self.masks == "fixed" and self.weights != "dass":
            raise MethodError("dass-obs: masks='fixed' uses DaSS's own scores; weights must be 'dass'")
        if self.weights == "taylor" and self.sample_tokens is None:
            self._set("sample_tokens", 512)
        if self.masks == "sweep" and self.order is None:
            self._set("order", "hessian")


@register
class DaSSOBS(PruningMethod):
    name = "dass-obs"
    summary = "DaSS's groups and neuron weights with SparseGPT's OBS weight updates"
    Options = DaSSOBSOptions

    @property
    def requires_glu(self) -> bool:
        return True

    @property
    def needs_hessian(self) -> bool:
        return True

    @property
    def sample_tokens(self) -> int:
        return self.opts.sample_tokens or 0

    def orientation(self, role: str) -> Orientation:
        return "output" if role in ("gate", "up") else "input"

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        """Attention (scope ``all``) and non-GLU linears: SparseGPT."""
        assert stats is not None
        res = sparsegpt_prune(weight, stats.hessian(), pattern, blocksize=self.opts.blocksize, percdamp=self.opts.percdamp)
        return MatrixResult(res.mask, "input" if pattern.is_nm else None, weight=res.weight,
                            info={"damp": res.damp, "dead_inputs": res.dead_inputs})

    def _row_weights(self, gate, up, down, x_stats, h_stats, act):
        if self.opts.weights == "taylor":
            x = x_stats.sample() if x_stats is not None else None
            if x is not None and x.shape[0]:
                rg, ru = taylor_weights(gate, up, down, x.to(gate.device), act)
                return torch.cat([rg, ru]), "taylor"
        r = h_stats.norm.to(gate.device).float().pow(2 * self.opts.alpha)
        return torch.cat([r, r]), "dass"

    def prune_glu(self, gate, up, down, x_stats, h_stats, pattern, act=None):
        assert x_stats is not None and h_stats is not None
        D = gate.shape[0]
        # down: along the reduction dimension, like SparseGPT (or DaSS's mask + OBS update)
        down_mask = wanda_mask(down, h_stats, pattern).mask if self.opts.down == "dass" else None
        rd = sparsegpt_prune(down, h_stats.hessian(), pattern, blocksize=self.opts.blocksize,
                             percdamp=self.opts.percdamp, mask=down_mask)
        stacked = torch.cat([gate.detach(), up.detach()])
        hx = x_stats.hessian()
        if self.opts.masks == "fixed":
            mg, mu = dass_glu_masks(gate, up, h_stats.norm.to(gate.device), pattern, self.opts.alpha)
            res = sparsegpt_prune(stacked, hx, pattern, blocksize=self.opts.blocksize, percdamp=self.opts.percdamp,
                                  mask=torch.cat([mg, mu]))
            used = "dass"
        else:
            # the gate/up errors reach the output through the *pruned* W_down
            r, used = self._row_weights(gate, up, rd.weight, x_stats, h_stats, act)
            res = obs_prune_output_groups(stacked, hx, pattern, r, row_groups=2, blocksize=self.opts.blocksize,
                                          percdamp=self.opts.percdamp, order=self.opts.order)
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
