"""DaSS: dependency-aware semi-structured sparsity for GLU MLPs (Guo et al., 2024).

Gate and up rows are scored by ``|W| * a_i ** alpha`` where ``a_i`` is the calibration
norm of intermediate neuron ``i``; comparison group = each input column (unstructured) or
M consecutive output rows of one column (N:M, "output" orientation). Down and attention
projections are scored like Wanda. No weight is updated.
"""

from __future__ import annotations

import torch

from ..patterns import Orientation, Pattern, select_mask
from ..scores import dass_glu_score
from ..stats import FeatureStats
from .base import MatrixResult, MethodError, PruningMethod, register
from .wanda import wanda_mask


def dass_glu_mask(weight: torch.Tensor, h_stats: FeatureStats, pattern: Pattern, alpha: float) -> MatrixResult:
    """DaSS mask of one gate or up matrix ``[D, d]`` from the intermediate activations."""
    score = dass_glu_score(weight, h_stats.norm, alpha)
    mask = select_mask(score, pattern, group="column", orientation="output")
    return MatrixResult(mask, "output" if pattern.is_nm else None)


@register
class DaSS(PruningMethod):
    name = "dass"
    requires_glu = True

    def __init__(self, alpha: float = 0.5) -> None:
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError):
            raise MethodError(f"alpha must be a number, got {alpha!r}") from None
        if not self.alpha >= 0:
            raise MethodError(f"alpha must be >= 0, got {alpha!r}")

    def options(self) -> dict:
        return {"alpha": self.alpha}

    def orientation(self, role: str) -> Orientation:
        return "output" if role in ("gate", "up") else "input"

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        assert stats is not None
        return wanda_mask(weight, stats, pattern)

    def prune_glu(self, gate, up, down, x_stats, h_stats, pattern, act=None):
        assert h_stats is not None
        return (
            dass_glu_mask(gate, h_stats, pattern, self.alpha),
            dass_glu_mask(up, h_stats, pattern, self.alpha),
            wanda_mask(down, h_stats, pattern),
        )
