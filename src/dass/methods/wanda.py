"""Wanda: ``|W[k, j]| * ||X_j||``, compared within each output row (Sun et al., 2023)."""

from __future__ import annotations

import torch

from ..patterns import Pattern, select_mask
from ..scores import wanda_score
from ..stats import FeatureStats
from .base import MatrixResult, PruningMethod, register


def wanda_mask(weight: torch.Tensor, stats: FeatureStats, pattern: Pattern) -> MatrixResult:
    """Wanda's mask for one matrix; shared by DaSS for down and attention projections."""
    mask = select_mask(wanda_score(weight, stats.norm), pattern, group="row", orientation="input")
    return MatrixResult(mask, "input" if pattern.is_nm else None)


@register
class Wanda(PruningMethod):
    name = "wanda"

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        assert stats is not None
        return wanda_mask(weight, stats, pattern)
