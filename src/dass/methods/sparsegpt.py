"""SparseGPT: OBS reconstruction with the input Hessian; weights are updated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dass.core.patterns import Pattern
from dass.core.sparsegpt import sparsegpt_prune
from dass.core.stats import FeatureStats
from dass.methods.base import MatrixResult, PruningMethod, register
from dass.methods.options import MethodOptions, as_nonneg_float, as_positive_int, option


@dataclass(frozen=True)
class SparseGPTOptions(MethodOptions):
    method = "sparsegpt"
    blocksize: int = option(128, "input columns per OBS block", as_positive_int)
    percdamp: float = option(0.01, "dampening, as a fraction of the mean Hessian diagonal", as_nonneg_float)


@register
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    summary = "OBS weight updates from the input Hessian X^T X (Frantar & Alistarh, 2023)"
    Options = SparseGPTOptions

    @property
    def needs_hessian(self) -> bool:
        return True

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        assert stats is not None
        res = sparsegpt_prune(weight, stats.hessian(), pattern, blocksize=self.opts.blocksize, percdamp=self.opts.percdamp)
        info = {"damp": res.damp, "dead_inputs": res.dead_inputs}
        if res.retries:
            info["cholesky_retries"] = res.retries
        return MatrixResult(res.mask, "input" if pattern.is_nm else None, weight=res.weight, info=info)
