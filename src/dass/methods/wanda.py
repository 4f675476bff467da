"""Wanda: ``|W[k, j]| * ||X_j||``, compared within each output row (Sun et al., 2023).

``rescale`` ("none" by default, "down" or "all"; GLU models only) multiplies the masked rows
by their least-squares factors on kept calibration rows, as DaSS's ``rescale`` does
(:mod:`dass.core.rescale`): not part of Wanda, offered so that DaSS's rescaled ``alpha="auto"`` can
be compared with Wanda given the same correction (docs/ablation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dass.core.patterns import Pattern, select_mask
from dass.core.scores import wanda_score
from dass.core.stats import FeatureStats
from dass.methods.base import MatrixResult, PruningMethod, register
from dass.methods.rescale_options import RescaleOptions, rescaled_glu_results


def wanda_mask(weight: torch.Tensor, stats: FeatureStats, pattern: Pattern) -> MatrixResult:
    """Wanda's mask for one matrix; shared by DaSS for down and attention projections."""
    mask = select_mask(wanda_score(weight, stats.norm), pattern, group="row", orientation="input")
    return MatrixResult(mask, "input" if pattern.is_nm else None)


@dataclass(frozen=True)
class WandaOptions(RescaleOptions):
    method = "wanda"


@register
class Wanda(PruningMethod):
    name = "wanda"
    summary = "|W| x input-feature norm, compared within each output row (Sun et al., 2023)"
    Options = WandaOptions

    @property
    def requires_glu(self) -> bool:
        # a rescale needs the GLU block (down is fitted on the pruned gate/up) and kept rows
        return self.opts.rescale != "none"

    @property
    def sample_tokens(self) -> int:
        return self.opts.sample_tokens or 0

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        assert stats is not None
        return wanda_mask(weight, stats, pattern)

    def prune_glu(self, gate, up, down, x_stats, h_stats, pattern, act=None):
        results = super().prune_glu(gate, up, down, x_stats, h_stats, pattern, act)
        return rescaled_glu_results(results, gate, up, down, x_stats, act, self.opts)
