"""Sparsity patterns and mask selection: pure tensor maths, no model knowledge.

A *mask* is a bool tensor shaped like the weight, ``True`` where the weight is kept.
Selection is deterministic: among equal scores the weight with the lower index is pruned
first (stable sort), so the same scores always give the same mask on any device, which the
distributed and resume paths rely on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from dass.errors import UserValueError

Orientation = Literal["input", "output"]
"""Which weight dimension N:M groups run along: ``input`` = dim 1 of an ``[out, in]``
weight (the reduction dimension, what sparse tensor cores accelerate), ``output`` = dim 0."""

UnstructuredGroup = Literal["matrix", "row", "column"]

ORIENTATION_DIM: dict[str, int] = {"input": 1, "output": 0}


class PatternError(UserValueError):
    """A sparsity pattern that cannot be applied (bad syntax, impossible N:M, bad shape)."""


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured at ``sparsity`` or N:M (N weights *kept* per M).

    ``sparsity`` is the pruned fraction; for N:M it is ``(M - N) / M``.
    """

    kind: Literal["unstructured", "nm"]
    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"unstructured:{self.sparsity:g}"

    def check_shape(self, shape: tuple[int, ...], orientation: Orientation, name: str = "matrix") -> None:
        """Raise :class:`PatternError` if N:M groups along ``orientation`` do not tile ``shape``."""
        if not self.is_nm:
            return
        dim = ORIENTATION_DIM[orientation]
        size = shape[dim]
        if size % self.m != 0:
            raise PatternError(
                f"{name}: dimension {dim} ({orientation}) has size {size}, "
                f"which is not divisible by M={self.m} of pattern {self}"
            )


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(spec: "str | float | Pattern") -> Pattern:
    """Parse ``"2:4"``, ``"4:8"``, ``"unstructured:0.5"``, ``"0.5"``, ``"50%"`` or a float.

    N:M requires ``0 < N < M``; an unstructured ratio must lie in ``[0, 1)``.
    """
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return _unstructured(float(spec), str(spec))
    if not isinstance(spec, str):
        raise PatternError(f"pattern must be a string such as '2:4' or '0.5', got {spec!r}")
    text = spec.strip().lower()
    if text.startswith("unstructured:"):
        text = text.split(":", 1)[1]
        return _unstructured(_ratio(text, spec), spec)
    match = _NM_RE.match(text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise PatternError(
                f"impossible N:M pattern {spec!r}: N (weights kept per group) must satisfy 0 < N < M"
            )
        return Pattern("nm", (m - n) / m, n, m)
    return _unstructured(_ratio(text, spec), spec)


def _ratio(text: str, original: str) -> float:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        raise PatternError(
            f"cannot parse pattern {original!r}: use N:M (e.g. 2:4, 4:8) or an unstructured "
            "ratio (e.g. 0.5, 50%, unstructured:0.5)"
        ) from None


def _unstructured(ratio: float, original: str) -> Pattern:
    if not 0.0 <= ratio < 1.0 or ratio != ratio:
        raise PatternError(f"unstructured sparsity must be in [0, 1), got {original!r}")
    return Pattern("unstructured", ratio)


# --------------------------------------------------------------------------------------
# Mask selection
# --------------------------------------------------------------------------------------


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask keeping all but the ``k`` lowest entries of each row of a 2D ``scores``."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
    mask.scatter_(-1, order, False)
    return mask


def select_unstructured(scores: torch.Tensor, sparsity: float, group: UnstructuredGroup) -> torch.Tensor:
    """Prune the lowest ``sparsity`` fraction of ``scores`` within each comparison group.

    ``group``: ``matrix`` (one ranking over all entries, magnitude pruning), ``row`` (each
    output row, Wanda), ``column`` (each input column, DaSS's gate/up). Exactly
    ``int(size * sparsity)`` entries are pruned per group.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2D, got shape {tuple(scores.shape)}")
    s = scores.float()
    if group == "matrix":
        k = int(s.numel() * sparsity)
        return _prune_lowest(s.reshape(1, -1), k).reshape(s.shape)
    if group == "row":
        return _prune_lowest(s, int(s.shape[1] * sparsity))
    if group == "column":
        return _prune_lowest(s.t(), int(s.shape[0] * sparsity)).t().contiguous()
    raise ValueError(f"unknown comparison group {group!r}")


def select_nm(scores: torch.Tensor, n: int, m: int, orientation: Orientation) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores along ``orientation``.

    A reshape to ``[..., m]`` groups and one stable sort: no loop over groups.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2D, got shape {tuple(scores.shape)}")
    s = scores.float()
    if orientation == "output":
        s = s.t()
    rows, cols = s.shape
    if cols % m:
        raise PatternError(f"dimension of size {cols} is not divisible by M={m}")
    groups = s.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, False)
    mask = mask.reshape(rows, cols)
    return mask.t().contiguous() if orientation == "output" else mask


def select_mask(
    scores: torch.Tensor,
    pattern: Pattern,
    *,
    group: UnstructuredGroup,
    orientation: Orientation,
) -> torch.Tensor:
    """Dispatch to :func:`select_nm` or :func:`select_unstructured` for ``pattern``."""
    if pattern.is_nm:
        return select_nm(scores, pattern.n, pattern.m, orientation)
    return select_unstructured(scores, pattern.sparsity, group)


def nm_violations(weight: torch.Tensor, n: int, m: int, orientation: Orientation) -> int:
    """Number of N:M groups along ``orientation`` holding more than ``n`` nonzeros."""
    w = weight if orientation == "input" else weight.t()
    rows, cols = w.shape
    if cols % m:
        return rows * (cols // m + 1)
    counts = (w.reshape(rows, cols // m, m) != 0).sum(-1)
    return int((counts > n).sum())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)
