"""Propagation without re-running attention (scope ``mlp``).

Under scope ``mlp`` only the MLP changes, so a layer's attention output is the same before
and after pruning: the statistics pass keeps the residual stream entering the MLP branch
(``h``) and the next layer's input is ``h + post(mlp(pre(h)))`` with the pruned MLP
(:class:`MLPResidual`), instead of a second pass through the whole layer. The form is known
per decoder-layer class (:func:`dass.arch.mlp_branch`) and checked numerically on the first
layer; anything else falls back to running the whole pruned layer again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dass.arch import LayerPlan, mlp_branch
from dass.run.capture import first_output
from dass.run.report import PruneReport


@dataclass
class MLPResidual:
    """``h -> h + post(mlp(pre(h)))``; ``entry`` is the module whose input is ``h``."""

    entry: nn.Module
    pre: nn.Module | None
    mlp: nn.Module
    post: nn.Module | None

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.pre(h) if self.pre is not None else h

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        y = first_output(self.mlp(self.mlp_input(h)))
        if self.post is not None:
            y = self.post(y)
        return h + y


def mlp_residual(plan: LayerPlan) -> MLPResidual | None:
    """The MLP branch of ``plan.layer`` if its form is known and only the MLP is pruned."""
    if plan.attention_pruned:
        return None
    branch = mlp_branch(plan.layer)
    if branch is None:
        return None
    return MLPResidual(branch.pre if branch.pre is not None else branch.mlp, branch.pre, branch.mlp, branch.post)


class FastPath:
    """Per-run state of the MLP-only propagation: checked once, on the first layer, by
    comparing ``h + post(mlp(pre(h)))`` with the layer's own output on one batch.
    ``enabled=False`` always runs the whole layer (to compare the two in tests)."""

    def __init__(self, report: PruneReport, enabled: bool = True) -> None:
        self.report = report
        self.checked = False
        self.ok = enabled

    def get(self, plan: LayerPlan, hidden: torch.Tensor, call: tuple[tuple, dict], dev: torch.device) -> MLPResidual | None:
        branch = mlp_residual(plan) if self.ok else None
        if branch is None or self.checked:
            return branch
        self.checked = True
        seen: dict[str, torch.Tensor] = {}
        handle = branch.entry.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
        try:
            x = hidden.to(dev)
            want = first_output(plan.layer(x, *call[0], **call[1]))
        finally:
            handle.remove()
        got = branch(seen["h"]) if "h" in seen else None
        if got is not None and got.shape == want.shape:
            diff = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
            if float(diff) <= 1e-3:
                self._note(f"propagation: MLP branch only ({type(plan.layer).__name__}: attention outputs reused)")
                return branch
        self.ok = False
        self._note(
            f"propagation: {type(plan.layer).__name__} did not match h + post(mlp(pre(h))); "
            "every pruned layer is run again in full"
        )
        return None

    def _note(self, text: str) -> None:
        if text not in self.report.notes:
            self.report.notes.append(text)
