"""Kernel layouts of 2:4 matrices (pure torch; no triton needed).

Both layouts store the kept values exactly as :func:`dass.io.nm_codec.compress_nm` does,
plus a metadata tensor of 4-bit "nibbles", one per group of 4. With ``i0 < i1`` the
positions of the two kept weights inside the group (so ``i0`` is 0, 1 or 2 and ``i1`` is
1, 2 or 3) the nibble's bits are one-hot flags::

    bit 0: i0 == 0    bit 1: i0 == 1    bit 2: i1 == 1    bit 3: i1 == 3

(``i0 == 2`` when bits 0-1 are clear, ``i1 == 2`` when bits 2-3 are clear). Why not the
plain ``i0 | i1 << 2``: a kernel decodes a group with one bit test per row and no compares
of 2-bit fields, which roughly halves the integer instructions of the 1-token kernels,
whose speed is bounded by them, not by memory (docs/speed.md). Two nibbles share a byte
(low nibble = even group).

orientation "output" (groups of 4 output rows within each column; ``W`` is ``[N, K]``)
    ``values[2g + s, j]`` (shape ``[N/2, K]``): the s-th kept weight of rows ``4g..4g+3``
    in column ``j``. ``meta[h, j]`` (shape ``[ceil(N/8), K]``): nibbles of groups ``2h``
    (low) and ``2h + 1`` (high) in column ``j``. A program owning a block of row-groups
    streams whole rows of ``values`` and ``meta``: coalesced reads, half the value bytes.

orientation "input" (groups of 4 input columns within each row)
    ``values[i, 2c + s]`` (shape ``[N, K/2]``), ``meta[i, h]`` (shape ``[N, ceil(K/8)]``)
    with nibbles of groups ``2h`` (low) and ``2h + 1`` (high) of row ``i``.
"""

from __future__ import annotations

import torch

from dass.io.nm_codec import compress_nm, nm_mask

__all__ = ["to_kernel_layout", "from_kernel_layout", "nibbles_from_mask", "encode_positions", "decode_positions"]


def nibbles_from_mask(keep: torch.Tensor, orientation: str) -> torch.Tensor:
    """uint8 nibble per group (one-hot flags, module docstring) from a 2:4 keep-mask [N, K]."""
    N, K = keep.shape
    if orientation == "output":
        kg = keep.reshape(N // 4, 4, K)
        gdim = 1
    else:
        kg = keep.reshape(N, K // 4, 4)
        gdim = 2
    pos = torch.sort((~kg).to(torch.int8), dim=gdim, stable=True).indices.narrow(gdim, 0, 2)
    i0, i1 = pos.unbind(gdim)
    return encode_positions(i0, i1)  # [N/4, K] or [N, K/4]


def encode_positions(i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles (one-hot flags, module docstring) from the kept positions ``i0 < i1``."""
    nib = (i0 == 0).to(torch.uint8) | ((i0 == 1).to(torch.uint8) << 1)
    return nib | ((i1 == 1).to(torch.uint8) << 2) | ((i1 == 3).to(torch.uint8) << 3)


def decode_positions(nib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions ``(i0, i1)`` (int64) from nibbles; inverse of :func:`encode_positions`."""
    nib = nib.long()
    i0 = torch.where(nib & 1 != 0, 0, torch.where(nib & 2 != 0, 1, 2))
    i1 = torch.where(nib & 4 != 0, 1, torch.where(nib & 8 != 0, 3, 2))
    return i0, i1


def _pair_pack(nib: torch.Tensor, dim: int) -> torch.Tensor:
    if nib.shape[dim] % 2:
        pad_shape = list(nib.shape)
        pad_shape[dim] = 1
        nib = torch.cat([nib, nib.new_zeros(pad_shape)], dim=dim)
    lo = nib.unflatten(dim, (-1, 2)).select(dim + 1, 0)
    hi = nib.unflatten(dim, (-1, 2)).select(dim + 1, 1)
    return (lo | (hi << 4)).contiguous()


def to_kernel_layout(
    W: torch.Tensor, orientation: str, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of a 2:4 matrix ``W`` [N, K] in the kernel layout of ``orientation``."""
    if keep is None:
        keep = nm_mask(W, 2, 4, orientation)
    parts = compress_nm(W, 2, 4, orientation, mask=keep)
    nib = nibbles_from_mask(keep, orientation)
    meta = _pair_pack(nib, 0 if orientation == "output" else 1)
    return parts["values"], meta


def from_kernel_layout(values: torch.Tensor, meta: torch.Tensor, shape, orientation: str) -> torch.Tensor:
    """Dense [N, K] matrix from the kernel layout (reference implementation in torch)."""
    N, K = int(shape[0]), int(shape[1])
    if orientation == "output":
        NG = N // 4
        nib = torch.stack([meta & 15, meta >> 4], dim=1).reshape(-1, K)[:NG]  # [NG, K]
        i0, i1 = decode_positions(nib)
        v = values.view(NG, 2, K)
        out = torch.zeros(NG, 4, K, dtype=values.dtype, device=values.device)
        out.scatter_(1, i0.unsqueeze(1), v[:, 0:1])
        out.scatter_(1, i1.unsqueeze(1), v[:, 1:2])
        return out.view(N, K)
    NC = K // 4
    nib = torch.stack([meta & 15, meta >> 4], dim=2).reshape(N, -1)[:, :NC]  # [N, NC]
    i0, i1 = decode_positions(nib)
    v = values.view(N, NC, 2)
    out = torch.zeros(N, NC, 4, dtype=values.dtype, device=values.device)
    out.scatter_(2, i0.unsqueeze(2), v[:, :, 0:1])
    out.scatter_(2, i1.unsqueeze(2), v[:, :, 1:2])
    return out.view(N, K)
