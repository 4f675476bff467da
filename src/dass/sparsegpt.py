"""The SparseGPT solver: blocked OBS pruning with lazy updates (Frantar & Alistarh, 2023).

Pure tensor code following IST-DASLab/sparsegpt ``SparseGPT.fasterprune``: dead inputs,
dampening ``percdamp * mean(diag H)``, the upper Cholesky factor of ``H^-1``, column blocks,
mask choice by ``w^2 / [H^-1]_jj^2`` (per block for unstructured, per M columns of each row
for N:M), and error propagation inside the block and lazily to later blocks. Differences
from the reference: an exact count of pruned weights per block (the reference thresholds
with ``<=``, which prunes more on ties) and a stable tie-break; when the Cholesky
factorisation fails the dampening is raised tenfold and retried, and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .patterns import Pattern


class SolverError(RuntimeError):
    """The Hessian could not be factorised even after raising the dampening."""


@dataclass
class SolverResult:
    weight: torch.Tensor  # updated weight, same dtype/device as the input
    mask: torch.Tensor  # bool, True = kept
    damp: float  # relative dampening finally used
    retries: int  # how many times the dampening was raised
    dead_inputs: int


def inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, max_retries: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising ``damp`` x10 on failure."""
    diag_mean = torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    for attempt in range(max_retries + 1):
        h = hessian + eye * (damp * diag_mean)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp, attempt
        damp *= 10.0
    raise SolverError(f"Cholesky factorisation failed even with dampening {damp / 10:g} x mean(diag H)")


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
    methods' masks can be combined with the weight update.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    hinv, damp, retries = inverse_cholesky(H, percdamp)
    given = mask.to(W.device) if mask is not None else None
    prune_mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned

    n, m = pattern.n, pattern.m
    if pattern.is_nm and blocksize % m:
        blocksize = max(m, blocksize - blocksize % m)  # an N:M group must not straddle blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if given is not None:
            mask1 = ~given[:, i1:i2]
        elif not pattern.is_nm:
            tmp = W1.pow(2) / d.reshape(1, -1).pow(2)
            k = int(tmp.numel() * pattern.sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool).reshape(-1)
            if k:
                mask1[torch.sort(tmp.reshape(-1), stable=True).indices[:k]] = True
            mask1 = mask1.reshape(W1.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if given is None and pattern.is_nm and i % m == 0:
                tmp = W1[:, i : i + m].pow(2) / d[i : i + m].reshape(1, -1).pow(2)
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, : m - n]
                mask1.scatter_(1, i + idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(hinv[i1:i2, i2:])
    W[prune_mask] = 0
    return SolverResult(
        weight=W.to(weight.dtype),
        mask=~prune_mask,
        damp=damp,
        retries=retries,
        dead_inputs=int(dead.sum()),
    )
