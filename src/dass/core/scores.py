"""Importance scores: pure functions of a weight and activation norms (docs/method.md).

Every score is computed in fp32. Higher means more important (kept first).
"""

from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return weight.detach().float().abs()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: ``|W[k, j]| * ||X_j||``: each weight times the norm of its input feature."""
    return weight.detach().float().abs() * input_norm.float().reshape(1, -1)


def dass_glu_score(weight: torch.Tensor, neuron_norm: torch.Tensor, alpha: float) -> torch.Tensor:
    """DaSS for ``W_gate``/``W_up`` (``[D, d]``): ``|W[i, j]| * a_i ** alpha``.

    ``a_i`` is the calibration norm of intermediate neuron ``i`` (the input of ``W_down``),
    so every weight feeding a busy neuron counts for more: the dependency group of gate
    row i, up row i and down column i shares one importance factor.
    """
    return weight.detach().float().abs() * neuron_norm.float().reshape(-1, 1).pow(alpha)
