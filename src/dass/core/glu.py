"""The GLU block's maths, written once: the hidden state, the block output, DaSS's masks.

Pure tensor code. A GLU MLP computes ``h = act(x W_gate^T) * (x W_up^T)`` (act = SiLU for
SwiGLU, tanh-GELU for GeGLU) and ``y = h W_down^T``. Row i of W_gate and W_up and column i of
W_down serve intermediate neuron i: DaSS scores every gate/up weight by
``|W[i, j]| * a_i ** alpha`` with ``a_i`` the calibration norm of neuron i, and compares
weights within each input column (N:M groups run along the output dimension).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dass.core.patterns import Pattern, select_mask
from dass.core.scores import dass_glu_score

Activation = Callable[[torch.Tensor], torch.Tensor]


def glu_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation | None = None) -> torch.Tensor:
    """``act(x W_gate^T) * (x W_up^T)`` in the inputs' dtype (act: SiLU by default)."""
    act = act or F.silu
    return act(x @ gate.t()) * (x @ up.t())


def glu_forward(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    x: torch.Tensor,
    act: Activation | None = None,
) -> torch.Tensor:
    """``W_down (act(W_gate x) * W_up x)`` in fp32 for rows ``x`` ``[k, d]`` (act: SiLU by default)."""
    xf = x.float()
    return glu_hidden(xf, gate.float(), up.float(), act) @ down.float().t()


def dass_glu_mask(weight: torch.Tensor, neuron_norm: torch.Tensor, pattern: Pattern, alpha: float) -> torch.Tensor:
    """DaSS's mask of one gate or up matrix ``[D, d]``: ``|W| * a ** alpha`` compared within
    each input column (N:M groups along the output dimension)."""
    return select_mask(dass_glu_score(weight, neuron_norm, alpha), pattern, group="column", orientation="output")


def dass_glu_masks(
    gate: torch.Tensor, up: torch.Tensor, neuron_norm: torch.Tensor, pattern: Pattern, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DaSS's gate and up masks for one alpha."""
    return dass_glu_mask(gate, neuron_norm, pattern, alpha), dass_glu_mask(up, neuron_norm, pattern, alpha)
