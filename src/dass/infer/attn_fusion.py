"""Attention's query, key and value projections stacked into one product.

Why: at decoding sizes a 2:4 product streams its weight at a rate that grows with the
matrix (a 7B layer's three 4096 x 4096 projections stream at about 1.5 TB/s one by one on an
H100, the stacked 22016-row gate+up at about 2.5 TB/s; docs/speed.md, round 9), so one
product of the stacked ``[q; k; v]`` matrix costs less than three. Stacking rows keeps every
2:4 group in both orientations (each projection's rows are a multiple of 4).

How, without knowing the attention's forward: the three linears are replaced by
:class:`QKVPart` modules that share one :class:`QKVStack`. The forwards of the supported
architectures (the adapter's :func:`dass.arch.qkv_children`) call ``q_proj(x)``,
``k_proj(x)``, ``v_proj(x)`` in that order on the same tensor, so the query part runs the
stacked product and keeps its output; the key and value parts slice it. A part called with
another tensor, or out of order, runs the stacked product itself and slices its own share,
so the result is right in every order (only slower). The kept output is dropped once all
three shares were served. All of this is plain Python attribute state, which Dynamo traces
(``fullgraph=True``) into one graph: nothing is kept between compiled calls.

Module names come from the architecture adapter, never from this file.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["QKVPart", "QKVStack", "stack_qkv"]


class QKVStack:
    """The stacked product and the output of its last call (shared by the three parts).

    Not an ``nn.Module``: the stacked module is registered on the attention module (as
    ``dass_qkv``), so it moves and casts with the model; this object only points at it."""

    def __init__(self, fused: nn.Module, sizes: tuple[int, int, int]):
        self.fused = fused
        self.bounds = (0, sizes[0], sizes[0] + sizes[1], sum(sizes))
        # (input, stacked output) of the last query call, one attribute so that it is read and
        # replaced as a whole (another thread's call cannot pair one input with another output)
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self.served = 0

    def share(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Projection ``i`` (0 = q, 1 = k, 2 = v) of ``x``."""
        lo, hi = self.bounds[i], self.bounds[i + 1]
        if i == 0:
            y = self.fused(x)
            self.kept, self.served = (x, y), 1
            return y[..., lo:hi]
        kept = self.kept
        if kept is None or kept[0] is not x:  # another input or another order: on its own
            return self.fused(x)[..., lo:hi]
        self.served += 1
        if self.served >= 3:
            self.kept = None
        return kept[1][..., lo:hi]


class QKVPart(nn.Module):
    """Stands in for one of the three projections (same ``in_features`` / ``out_features``)."""

    def __init__(self, stack: QKVStack, index: int, in_features: int, out_features: int):
        super().__init__()
        self.index, self.in_features, self.out_features = index, in_features, out_features
        self.__dict__["stack"] = stack  # not a submodule: the stacked module lives on the attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.share(x, self.index)

    def extra_repr(self) -> str:
        return f"{'qkv'[self.index]} of dass_qkv, in_features={self.in_features}, out_features={self.out_features}"


def stack_qkv(attn: nn.Module, names: tuple[str, str, str], fused: nn.Module, check: bool = True) -> bool:
    """Replace ``attn``'s three projections ``names`` by parts of ``fused`` (the product of
    their stacked ``[q; k; v]`` weights, registered as ``attn.dass_qkv``). With ``check``, the
    parts' outputs are compared with the old modules' on a random input first; on a mismatch
    (relative error >= 2e-2) nothing is changed and False is returned."""
    mods = [getattr(attn, n) for n in names]
    sizes = tuple(int(m.out_features) for m in mods)
    d = int(mods[0].in_features)
    if any(int(m.in_features) != d for m in mods) or int(getattr(fused, "out_features", sum(sizes))) != sum(sizes):
        return False
    stack = QKVStack(fused, sizes)
    parts = [QKVPart(stack, i, d, s) for i, s in enumerate(sizes)]
    if check:
        m0 = mods[0]  # an nn.Linear or an NM24Linear (which keeps no dense weight)
        dev = getattr(m0, "weight_device", None) or m0.weight.device
        dtype = getattr(m0, "weight_dtype", None) or m0.weight.dtype
        with torch.no_grad():
            x = torch.randn(5, d, device=dev, dtype=dtype)
            for m, part in zip(mods, parts):
                ref, got = m(x).double(), part(x).double()
                if not ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item() < 2e-2:
                    return False
    attn.dass_qkv = fused
    for n, part in zip(names, parts):
        setattr(attn, n, part)
    return True
