"""SparseGPT: OBS reconstruction with the input Hessian; weights are updated."""

from __future__ import annotations

import torch

from dass.core.patterns import Pattern
from dass.core.sparsegpt import sparsegpt_prune
from dass.core.stats import FeatureStats
from dass.methods.base import MatrixResult, PruningMethod, register


@register
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    needs_hessian = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        self.blocksize = blocksize
        self.percdamp = percdamp

    def options(self) -> dict:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        assert stats is not None
        res = sparsegpt_prune(weight, stats.hessian(), pattern, blocksize=self.blocksize, percdamp=self.percdamp)
        info = {"damp": res.damp, "dead_inputs": res.dead_inputs}
        if res.retries:
            info["cholesky_retries"] = res.retries
        return MatrixResult(res.mask, "input" if pattern.is_nm else None, weight=res.weight, info=info)
