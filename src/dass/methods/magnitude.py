"""Magnitude pruning: ``|W|``, one ranking over the whole matrix (unstructured)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dass.core.patterns import Pattern, select_mask
from dass.core.scores import magnitude_score
from dass.core.stats import FeatureStats
from dass.methods.base import MatrixResult, PruningMethod, register
from dass.methods.options import MethodOptions


@dataclass(frozen=True)
class MagnitudeOptions(MethodOptions):
    """Magnitude pruning has no options."""

    method = "magnitude"


@register
class Magnitude(PruningMethod):
    name = "magnitude"
    summary = "|W|, no calibration data (N:M along each row's inputs; unstructured: one threshold per matrix)"
    Options = MagnitudeOptions
    needs_calibration = False

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        mask = select_mask(magnitude_score(weight), pattern, group="matrix", orientation="input")
        return MatrixResult(mask, "input" if pattern.is_nm else None)
