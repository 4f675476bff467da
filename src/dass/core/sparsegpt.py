"""The SparseGPT solver: blocked OBS pruning with lazy updates (Frantar & Alistarh, 2023).

Pure tensor code following IST-DASLab/sparsegpt ``SparseGPT.fasterprune``: dead inputs,
dampening ``percdamp * mean(diag H)``, the upper Cholesky factor of ``H^-1``, column blocks,
mask choice by ``w^2 / [H^-1]_jj^2`` (per block for unstructured, per M columns of each row
for N:M), and error propagation inside the block and lazily to later blocks. Differences
from the reference: an exact count of pruned weights per block (the reference thresholds
with ``<=``, which prunes more on ties) and a stable tie-break; when the Cholesky
factorisation fails the dampening is raised tenfold and retried, and the result says so.

Speed: the algorithm is sequential over the columns of a block, but every row is
independent, so the solver works on the transposed block (one contiguous row per input
column) with two kernels per column (the column's error, then a rank-1 update of the
block's later columns), a few per N:M group, and no host synchronisation inside the loop
(no boolean indexing, no ``.item()``). Column ``i`` of the block is only read after all
earlier columns have updated it, exactly as in the reference; the pruned weights are
zeroed once per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from dass.core.graphs import run_block
from dass.core.patterns import Pattern
from dass.errors import UserRuntimeError


class SolverError(UserRuntimeError):
    """The Hessian could not be factorised even after raising the dampening."""


@dataclass
class SolverResult:
    weight: torch.Tensor  # updated weight, same dtype/device as the input
    mask: torch.Tensor  # bool, True = kept
    damp: float  # relative dampening finally used
    retries: int  # how many times the dampening was raised
    dead_inputs: int


_HALF_GEMM_FP32_OUT: bool | None = None  # does torch.mm(..., out_dtype=float32) work here?


def accumulate_xtx(xtx: torch.Tensor, x: torch.Tensor) -> None:
    """``xtx += x^T x`` in fp32 for a 2D ``x`` of any dtype.

    For bf16/fp16 ``x`` on a GPU this is one half-precision matrix product with fp32
    output (exact products, fp32 accumulation) instead of an upcast and an fp32 product.
    """
    global _HALF_GEMM_FP32_OUT
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _HALF_GEMM_FP32_OUT is not False:
        try:
            xtx.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
            _HALF_GEMM_FP32_OUT = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _HALF_GEMM_FP32_OUT = False
    xf = x.float()
    xtx.add_(xf.t() @ xf)  # xtx may be an fp64 total (dass.core.stats)


def inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, max_retries: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising ``damp`` x10 on failure.

    Works on one copy of ``hessian`` (which is left unchanged), dampening its diagonal in
    place, so a large Hessian costs about three copies of itself at the peak.
    """
    diag0 = torch.diagonal(hessian).clone()
    diag_mean = torch.mean(diag0)
    h = hessian.clone()
    damp = percdamp
    for attempt in range(max_retries + 1):
        torch.diagonal(h).copy_(diag0 + damp * diag_mean)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp, attempt
            h = hessian.clone()
        damp *= 10.0
    raise SolverError(f"Cholesky factorisation failed even with dampening {damp / 10:g} x mean(diag H)")


def prepare(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float, perm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float, int, torch.Tensor]:
    """What every OBS sweep starts from: the transposed fp32 weight ``WT`` (row j = input
    column j, contiguous; rows of dead inputs zeroed), the upper Cholesky factor of the
    dampened ``H^-1`` (dead inputs' diagonal set to 1 first), the dampening used, the
    number of retries and the dead-input flags. With ``perm``, input columns are taken in
    that order (``WT``, ``H`` and the flags all permuted)."""
    H = hessian.detach().to(weight.device, torch.float32)
    if perm is not None:
        H = H[perm][:, perm]
    elif H.data_ptr() == hessian.data_ptr():
        H = H.clone()
    dead = torch.diagonal(H) == 0
    torch.diagonal(H).masked_fill_(dead, 1.0)
    WT = weight.detach().t().to(torch.float32)
    WT = (WT[perm] if perm is not None else WT).contiguous()
    WT.masked_fill_(dead.reshape(-1, 1), 0.0)
    hinv, damp, retries = inverse_cholesky(H, percdamp)
    return WT, hinv, damp, retries, dead


def _nm_group(WT: torch.Tensor, d: torch.Tensor, i: int, n: int, m: int, pruned: torch.Tensor) -> None:
    """Choose the ``m - n`` weights to prune in columns ``i..i+m`` of every row (rows of the
    transposed block ``WT``), from their current values: lowest ``w^2 / d^2``."""
    tmp = WT[i : i + m].pow(2) / d[i : i + m].reshape(-1, 1).pow(2)
    idx = torch.sort(tmp, dim=0, stable=True).indices[: m - n]
    pruned[i : i + m].scatter_(0, idx, True)


def _block_loop(W1: torch.Tensor, P1: torch.Tensor, Hinv1: torch.Tensor, Err1: torch.Tensor, nm: bool, n: int, m: int) -> None:
    """The sequential part: columns of one block in order (rows of the transposed block
    ``W1``), each pruned and its error spread over the block's later columns; the N:M mask
    of a group is chosen when the scan reaches its first column. ``P1`` (True = pruned) is
    given for unstructured/given masks and filled in for N:M. Updates ``W1``, ``P1`` and
    ``Err1`` in place; no host synchronisation (so it can be captured in a CUDA graph)."""
    count = W1.shape[0]
    d = torch.diagonal(Hinv1)
    scale = None if nm else P1 / d.reshape(-1, 1)  # err = w / d on pruned weights, else 0
    for i in range(count):
        if nm and i % m == 0:
            _nm_group(W1, d, i, n, m, P1)
            scale = P1[i : i + m] / d[i : i + m].reshape(-1, 1)
        s = scale[i % m] if nm else scale[i]  # type: ignore[index]
        torch.mul(W1[i], s, out=Err1[i])
        if i + 1 < count:
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], Err1[i], alpha=-1.0)
    W1.masked_fill_(P1, 0.0)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: torch.Tensor | None = None,
) -> SolverResult:
    """Prune ``weight`` (``[out, in]``) to ``pattern`` with OBS updates from ``hessian``.

    ``pattern`` N:M groups run along the input dimension (as in the reference). If ``mask``
    is given (True = kept) it is used instead of SparseGPT's own selection, so other
    methods' masks can be combined with the weight update. Computed in fp32 on the device
    of ``weight``.
    """
    rows, cols = weight.shape
    WT, hinv, damp, retries, dead = prepare(weight, hessian, percdamp)
    prunedT = torch.zeros(cols, rows, dtype=torch.bool, device=WT.device)
    givenT = (~mask.to(WT.device, torch.bool)).t() if mask is not None else None

    n, m = pattern.n, pattern.m
    nm = pattern.is_nm and givenT is None
    if pattern.is_nm and blocksize % m:
        blocksize = max(m, blocksize - blocksize % m)  # an N:M group must not straddle blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = WT[i1:i2]  # a view: updated in place
        P1 = prunedT[i1:i2]
        Hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        if givenT is not None:
            P1.copy_(givenT[i1:i2])
        elif not pattern.is_nm:
            k = int(count * rows * pattern.sparsity)
            if k:
                tmp = (W1.pow(2) / d.reshape(-1, 1).pow(2)).t().reshape(-1)  # reference order: [row, col]
                flat = torch.zeros(rows * count, dtype=torch.bool, device=WT.device)
                flat[torch.sort(tmp, stable=True).indices[:k]] = True
                P1.copy_(flat.reshape(rows, count).t())
        Err1 = torch.empty_like(W1)
        run_block(partial(_block_loop, nm=nm, n=n, m=m), ("sparsegpt", nm, n, m), (W1, P1, Hinv1, Err1),
                  graph=count == blocksize and cols >= 2 * blocksize)
        if i2 < cols:
            WT[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
    return SolverResult(
        weight=WT.t().to(weight.dtype).contiguous(),
        mask=(~prunedT).t().contiguous(),
        damp=damp,
        retries=retries,
        dead_inputs=int(dead.sum()),
    )
