"""OBS reconstruction with masks chosen along the *output* dimension (for ``dass-obs``).

Pure tensor code. SparseGPT (:mod:`dass.core.sparsegpt`) sweeps the input columns of a weight
``[rows, cols]`` in blocks, prunes, and propagates each pruned column's error to the
columns not yet visited (``W[:, j:] -= err * Hinv[i, j:]``, upper Cholesky factor of
``H^-1``). That update works for any mask. This module chooses the mask *while* the
sweep goes, like SparseGPT, but with DaSS's comparison groups for W_gate/W_up: when the
sweep reaches input column ``j`` every weight of that column already carries the updates
of the earlier columns, and the rows of column ``j`` compete in groups of M consecutive
output rows (N:M, "output" orientation) or all together (unstructured, DaSS's per-column
group).

Within one column the OBS saliency ``w_ij^2 / [H^-1]_jj`` has the same denominator for
every row, so it ranks the rows by ``|w_ij|`` alone: OBS says nothing about which output
row should keep its weight. What does is how much each row's output matters downstream,
the row weight ``r_i`` (DaSS: ``a_i ** (2 alpha)``, the neuron's activation norm). The
score is ``r_i * w_ij^2`` on the *updated* weights, i.e. DaSS's ``|w| * a_i^alpha`` of
the current weight, squared.

Layout and speed follow :func:`dass.core.sparsegpt.sparsegpt_prune`: the solver works on the
transposed weight (one contiguous row per input column), the per-column loop has no host
synchronisation, and on CUDA a full block is replayed from a captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from dass.core.graphs import run_block
from dass.core.patterns import Pattern
from dass.core.sparsegpt import prepare


@dataclass
class OBSResult:
    weight: torch.Tensor  # updated weight (same dtype as the input), zeros where pruned
    mask: torch.Tensor  # bool, True = kept
    damp: float
    retries: int
    dead_inputs: int


def _group_shape(rows: int, pattern: Pattern, row_groups: int) -> tuple[int, int, int]:
    """``(groups, size, pruned per group)`` for one column's rows."""
    if pattern.is_nm:
        return rows // pattern.m, pattern.m, pattern.m - pattern.n
    size = rows // row_groups
    return row_groups, size, int(size * pattern.sparsity)


def _block_loop(
    W1: torch.Tensor,
    P1: torch.Tensor,
    Hinv1: torch.Tensor,
    Err1: torch.Tensor,
    r: torch.Tensor,
    groups: int,
    size: int,
    k: int,
) -> None:
    """The sequential part on one block of the transposed weight ``W1`` ``[count, rows]``:
    for each input column in order, prune the ``k`` lowest ``r * w^2`` of every group of
    ``size`` rows, then spread the column's error over the block's later columns. Updates
    ``W1``, ``P1`` (True = pruned) and ``Err1`` in place; no host synchronisation."""
    count = W1.shape[0]
    d = torch.diagonal(Hinv1)
    for i in range(count):
        w = W1[i]
        if k:
            score = (w * w * r).view(groups, size)
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            P1[i].view(groups, size).scatter_(1, idx, True)
        torch.mul(w, P1[i], out=Err1[i])
        Err1[i].div_(d[i])
        if i + 1 < count:
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], Err1[i], alpha=-1.0)
    W1.masked_fill_(P1, 0.0)


def obs_prune_output_groups(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    row_weight: torch.Tensor | None = None,
    *,
    row_groups: int = 1,
    blocksize: int = 128,
    percdamp: float = 0.01,
    order: str = "natural",
) -> OBSResult:
    """Prune ``weight`` ``[rows, cols]`` with SparseGPT's blocked OBS updates from the input
    ``hessian`` ``[cols, cols]``, choosing each input column's pruned rows when the sweep
    reaches it, by ``row_weight[i] * w_ij^2`` within groups along the output dimension:
    N:M over M consecutive rows, or (unstructured) the lowest ``sparsity`` fraction of the
    column's rows.

    ``row_groups`` > 1 means ``weight`` stacks that many matrices sharing one input (gate
    over up): the unstructured per-column ranking is then done within each stacked matrix,
    so each keeps exactly its own sparsity (N:M groups never straddle them when the rows of
    each are a multiple of M). Computed in fp32 on the device of ``weight``.

    ``order="hessian"`` sweeps the input columns by decreasing ``H_jj`` (GPTQ's "act
    order"): the columns that carry the most signal are pruned first, while the most
    columns are left to absorb their error. Output-dimension groups lie inside one column,
    so any column order keeps the pattern valid (SparseGPT's input-dimension N:M groups
    could not be reordered like this).
    """
    if order not in ("natural", "hessian"):
        raise ValueError(f"order must be 'natural' or 'hessian', got {order!r}")
    rows, cols = weight.shape
    if rows % row_groups:
        raise ValueError(f"{rows} rows cannot be split into {row_groups} stacked matrices")
    if pattern.is_nm and (rows // row_groups) % pattern.m:
        raise ValueError(f"{rows // row_groups} rows are not divisible by M={pattern.m}")
    device = weight.device
    r = (torch.ones(rows) if row_weight is None else row_weight.detach()).to(device, torch.float32).contiguous()
    perm = None
    if order == "hessian":
        diag = torch.diagonal(hessian.detach()).to(device, torch.float32)
        perm = torch.argsort(diag, descending=True, stable=True)
    WT, hinv, damp, retries, dead = prepare(weight, hessian, percdamp, perm)
    prunedT = torch.zeros(cols, rows, dtype=torch.bool, device=device)
    groups, size, k = _group_shape(rows, pattern, row_groups)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, P1 = WT[i1:i2], prunedT[i1:i2]  # views: updated in place
        Err1 = torch.empty_like(W1)
        run_block(partial(_block_loop, groups=groups, size=size, k=k), ("obs", groups, size, k),
                  (W1, P1, hinv[i1:i2, i1:i2], Err1, r), graph=(i2 - i1) == blocksize and cols >= 2 * blocksize)
        if i2 < cols:
            WT[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
    if perm is not None:
        inv = torch.argsort(perm)
        WT, prunedT = WT[inv], prunedT[inv]
    return OBSResult(
        weight=WT.t().to(weight.dtype).contiguous(),
        mask=(~prunedT).t().contiguous(),
        damp=damp,
        retries=retries,
        dead_inputs=int(dead.sum()),
    )
