"""Forward hooks that turn one pass of a layer over the calibration batches into the
statistics the method asked for (input norms, ``X^T X``, kept rows), and the hook that
stops the pass once the last statistic is in."""

from __future__ import annotations

import torch
from torch import nn

from dass.arch import ExpertsCapture, LayerPlan
from dass.core.glu import glu_hidden
from dass.core.sparsegpt import accumulate_xtx
from dass.core.stats import FeatureStats
from dass.run.capture import Stop


def observe(acc: FeatureStats, x: torch.Tensor) -> None:
    """``acc.add(x)``, with SparseGPT's ``X^T X`` taken by one half-precision matrix
    product with fp32 output on a GPU (products of bf16/fp16 values are exact in fp32 and
    the sum is accumulated in fp32: the same sum as upcasting first, without an fp32 GEMM,
    which is about ten times slower)."""
    if acc.xtx is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        acc.add(x)
        return
    xtx, acc.xtx = acc.xtx, None
    try:
        acc.add(x)  # sums of squares, token count, kept samples
    finally:
        acc.xtx = xtx
    accumulate_xtx(xtx, x.reshape(-1, x.shape[-1]))


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first argument of a module call, positional or keyword."""
    return args[0] if args else next(iter(kwargs.values()))


def _experts_hook(cap: ExpertsCapture, stats: dict[str, FeatureStats]):
    """Per-expert statistics from a fused-experts call: each expert's routed tokens and
    their intermediate activations, computed from the expert's own weights."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hs, idx = cap.routed(args, kwargs)
        for e in range(cap.num_experts):
            tokens = (idx == e).any(-1).nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            x = hs[tokens]
            gate, up = cap.gate_up(e)
            observe(stats[cap.x_key(e)], x)
            observe(stats[cap.h_key(e)], glu_hidden(x, gate, up, cap.act_fn))

    return hook


def register_stat_hooks(plan: LayerPlan, stats: dict[str, FeatureStats]) -> list:
    """Forward pre-hooks that accumulate each observed module's input (pre-hooks, so that
    a later hook on the same module can stop the layer right after)."""
    handles = []
    for cap in plan.inputs:
        acc = stats[cap.key]
        handles.append(
            cap.module.register_forward_pre_hook(
                lambda m, args, kwargs, acc=acc: observe(acc, first_input(args, kwargs)), with_kwargs=True
            )
        )
    for ecap in plan.experts:
        handles.append(ecap.module.register_forward_pre_hook(_experts_hook(ecap, stats), with_kwargs=True))
    return handles


def raise_stop(module: nn.Module, args: tuple) -> None:
    raise Stop


def last_observed(plan: LayerPlan) -> nn.Module | None:
    """The module whose input is the last statistic a layer pass gathers, if it is known:
    the down projection of a layer with one dense GLU block (attention projections, when
    observed, come before it). None for MoE layers and plain MLPs."""
    if len(plan.glu) != 1 or plan.experts or plan.glu[0].expert is not None:
        return None
    down = plan.glu[0].down.module
    return down if isinstance(down, nn.Linear) else None
