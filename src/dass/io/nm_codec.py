"""The N:M codec: compressed form of one sparse matrix (pure tensor code, CPU or GPU).

This module holds the codec alone (compress, decompress, bit packing, N:M masks and
orientation detection) and reads or writes no file; :mod:`dass.io.sparse_format` stores
its output in safetensors checkpoints, and the inference kernels' layouts build on it.

A weight ``W`` is a 2-D ``nn.Linear`` weight of shape ``[out, in]``; pattern ``N:M`` keeps
``N`` weights in every group of ``M`` consecutive weights.

- orientation ``"input"``: groups run along dim 1 (the reduction dim) within each row;
- orientation ``"output"``: groups run along dim 0 (output rows) within each column.

Compressed form (``compress_nm``) is two tensors:

``values``
    the kept weights, bit for bit, in the dtype of ``W``. The grouped dimension shrinks by
    ``N/M``: shape ``[out, in // M * N]`` for ``"input"`` and ``[out // M * N, in]`` for
    ``"output"``. Within a group the kept weights appear in increasing position order, so
    ``values`` of a 2:4 output-orientation matrix holds, for row-group ``g``, rows ``2g``
    and ``2g + 1`` (this is the layout the output-orientation kernel streams).
``mask``
    the boolean keep-mask of ``W`` (shape ``[out, in]``), flattened in row-major order
    and packed 8 per byte (``uint8``, bit ``k`` of byte ``b`` is element ``8b + k``,
    unused trailing bits are zero). One bit per weight: a 2:4 matrix in bf16/fp16
    takes ``0.5 * 2 + 1/8 = 1.125`` bytes per weight, 56.25% of dense.

``negzero`` (only when needed)
    pruning by multiplication (``W.mul_(mask)``) leaves ``-0.0`` at pruned positions of
    negative weights. When any pruned position holds ``-0.0``, one more packed bitmask,
    one bit per *pruned* position (row-major order), records those signs: +0.5 bit per
    weight for 2:4, so 59.4% of dense for 16-bit weights. The round trip is therefore
    bit-exact, signed zeros included.

Every group keeps exactly ``N`` positions. A group with fewer than ``N`` nonzero weights
still stores ``N`` positions, chosen deterministically: nonzeros first, then negative
zeros, then the earliest remaining positions.

Decompression validates everything it reads and raises ``ValueError`` on a wrong
shape or dtype, or a group whose mask bits do not count exactly ``N``: any single
flipped mask bit is detected.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dass.errors import UserValueError


class FormatError(UserValueError):
    """A compressed matrix or file that is not what its metadata says (corrupt or edited)."""


__all__ = [
    "FormatError",
    "ORIENTATIONS",
    "compress_nm",
    "decompress_nm",
    "nm_mask",
    "is_nm",
    "detect_orientation",
    "compressed_shapes",
    "pack_bits",
    "unpack_bits",
]

ORIENTATIONS = ("input", "output")


# --------------------------------------------------------------------------- helpers


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or isinstance(m, bool):
        raise FormatError(f"N:M must be integers, got {n!r}:{m!r}")
    if not (0 < n <= m) or m > 64:
        raise FormatError(f"invalid N:M pattern {n}:{m} (need 0 < N <= M <= 64)")


def _check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise FormatError(f"orientation must be 'input' or 'output', got {orientation!r}")


def _group_dim(orientation: str) -> int:
    # dimension of the grouped view that indexes positions inside a group
    return 2 if orientation == "input" else 1


def _grouped_shape(shape: tuple[int, int], m: int, orientation: str) -> tuple[int, int, int]:
    out, inp = shape
    if orientation == "input":
        if inp % m:
            raise FormatError(f"shape {list(shape)}: input dim {inp} is not a multiple of M={m}")
        return (out, inp // m, m)
    if out % m:
        raise FormatError(f"shape {list(shape)}: output dim {out} is not a multiple of M={m}")
    return (out // m, m, inp)


def _matrix_groups(W: torch.Tensor, n: int, m: int, orientation: str) -> tuple[tuple[int, int, int], int]:
    """Check ``W`` (2-D) and the pattern; the grouped shape of ``W`` and its group dimension."""
    _check_nm(n, m)
    _check_orientation(orientation)
    if W.dim() != 2:
        raise FormatError(f"expected a 2-D weight, got shape {list(W.shape)}")
    return _grouped_shape(tuple(W.shape), m, orientation), _group_dim(orientation)


def compressed_shapes(shape, n: int, m: int, orientation: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``values`` and ``mask`` tensors for a matrix of ``shape``."""
    _check_nm(n, m)
    _check_orientation(orientation)
    shape = (int(shape[0]), int(shape[1]))
    _grouped_shape(shape, m, orientation)
    out, inp = shape
    vals = (out, inp // m * n) if orientation == "input" else (out // m * n, inp)
    return {"values": vals, "mask": ((out * inp + 7) // 8,)}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened row-major) 8 per byte, little-endian bit order."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`; returns a flat bool tensor of ``numel`` elements.

    Raises ``ValueError`` if the byte count is wrong or a trailing padding bit is set.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise FormatError(f"packed mask must be a 1-D uint8 tensor, got {packed.dtype} {list(packed.shape)}")
    if packed.numel() != (numel + 7) // 8:
        raise FormatError(f"packed mask has {packed.numel()} bytes, expected {(numel + 7) // 8} for {numel} elements")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = ((packed.view(-1, 1) >> shifts) & 1).bool().view(-1)
    if bits.numel() > numel and bool(bits[numel:].any()):
        raise FormatError("packed mask has padding bits set beyond the last element")
    return bits[:numel]


def _float_view_nonzero(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value != 0, is negative zero) for a floating tensor; ints have no signed zero."""
    nz = W != 0
    if W.is_floating_point():
        negzero = (~nz) & torch.signbit(W)
    else:
        negzero = torch.zeros_like(nz)
    return nz, negzero


def _positions_from_keep(keep_g: torch.Tensor, n: int, gdim: int) -> torch.Tensor:
    """Sorted positions (ascending) of the n True entries of every group (exactly n assumed)."""
    # stable sort of ~keep puts kept positions first, in increasing order
    order = torch.sort((~keep_g).to(torch.int8), dim=gdim, stable=True).indices
    return order.narrow(gdim, 0, n)


# --------------------------------------------------------------------------- public API


def nm_mask(W: torch.Tensor, n: int, m: int, orientation: str) -> torch.Tensor:
    """The keep-mask ``compress_nm`` would store for ``W`` (bool, shape of ``W``).

    Raises ``ValueError`` if some group holds more than ``n`` nonzeros.
    """
    gshape, gdim = _matrix_groups(W, n, m, orientation)
    Wg = W.reshape(gshape)
    nz, negzero = _float_view_nonzero(Wg)
    count = nz.sum(dim=gdim)
    if bool((count > n).any()):
        bad = int((count > n).sum())
        raise FormatError(
            f"not a {n}:{m} matrix in {orientation} orientation: {bad} group(s) of {m} hold more than "
            f"{n} nonzeros (max {int(count.max())})"
        )
    # priority: nonzero (2) > negative zero (1) > +0 (0); ties -> earlier position
    prio = nz.to(torch.int32) * 2 + negzero.to(torch.int32)
    pos_shape = [1, 1, 1]
    pos_shape[gdim] = m
    pos = torch.arange(m, device=W.device, dtype=torch.int32).view(pos_shape)
    key = prio * m + (m - 1 - pos)
    top = torch.topk(key, n, dim=gdim, largest=True, sorted=False).indices
    keep = torch.zeros(gshape, dtype=torch.bool, device=W.device).scatter_(gdim, top, True)
    return keep.view(W.shape)


def is_nm(W: torch.Tensor, n: int, m: int, orientation: str) -> bool:
    """True when every group of ``m`` along ``orientation`` holds at most ``n`` nonzeros."""
    try:
        gshape = _grouped_shape(tuple(W.shape), m, orientation)
    except ValueError:
        return False
    count = (W.reshape(gshape) != 0).sum(dim=_group_dim(orientation))
    return bool((count <= n).all())


def detect_orientation(W: torch.Tensor, n: int, m: int) -> str | None:
    """``"input"`` or ``"output"`` if ``W`` is N:M along that dim (input preferred), else None."""
    for o in ORIENTATIONS:
        if is_nm(W, n, m, o):
            return o
    return None


def compress_nm(
    W: torch.Tensor, n: int, m: int, orientation: str, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Compress an N:M sparse matrix into ``{"values", "mask"}`` (see module doc).

    ``mask`` (optional, bool, shape of ``W``) fixes the kept positions; it must keep exactly
    ``n`` per group and ``W`` must be zero outside it. Without it the positions are chosen
    from ``W`` deterministically. Raises ``ValueError`` when ``W`` is not N:M.
    """
    gshape, gdim = _matrix_groups(W, n, m, orientation)
    if mask is None:
        keep = nm_mask(W, n, m, orientation)
    else:
        if mask.shape != W.shape or mask.dtype != torch.bool:
            raise FormatError(f"mask must be bool of shape {list(W.shape)}, got {mask.dtype} {list(mask.shape)}")
        keep = mask.to(W.device)
        cnt = keep.reshape(gshape).sum(dim=gdim)
        if bool((cnt != n).any()):
            raise FormatError(f"mask does not keep exactly {n} of every {m} along {orientation}")
        if bool((W.masked_select(~keep) != 0).any()):
            raise FormatError("W has nonzero weights outside the given mask")
    pos = _positions_from_keep(keep.reshape(gshape), n, gdim)
    vals = W.reshape(gshape).gather(gdim, pos)
    shapes = compressed_shapes(W.shape, n, m, orientation)
    parts = {"values": vals.reshape(shapes["values"]).contiguous(), "mask": pack_bits(keep)}
    if W.is_floating_point():
        negz = torch.signbit(W.masked_select(~keep))
        if bool(negz.any()):
            parts["negzero"] = pack_bits(negz)
    return parts


def decompress_nm(parts: Mapping[str, torch.Tensor], shape, n: int, m: int, orientation: str) -> torch.Tensor:
    """Rebuild the dense matrix from :func:`compress_nm`'s output (bit-exact).

    Raises ``ValueError`` on missing/extra parts, wrong shapes or dtypes, and on a mask
    whose groups do not keep exactly ``n`` positions.
    """
    _check_nm(n, m)
    _check_orientation(orientation)
    if len(shape) != 2:
        raise FormatError(f"expected a 2-D shape, got {list(shape)}")
    shape = (int(shape[0]), int(shape[1]))
    if not ({"values", "mask"} <= set(parts) <= {"values", "mask", "negzero"}):
        raise FormatError(f"compressed parts must be 'values', 'mask' (and optionally 'negzero'), got {sorted(parts)}")
    values, packed = parts["values"], parts["mask"]
    shapes = compressed_shapes(shape, n, m, orientation)
    if tuple(values.shape) != shapes["values"]:
        raise FormatError(
            f"values has shape {list(values.shape)}, expected {list(shapes['values'])} for a {n}:{m} "
            f"{orientation}-orientation matrix of shape {list(shape)}"
        )
    if tuple(packed.shape) != shapes["mask"]:
        raise FormatError(f"mask has shape {list(packed.shape)}, expected {list(shapes['mask'])}")
    gshape = _grouped_shape(shape, m, orientation)
    gdim = _group_dim(orientation)
    keep = unpack_bits(packed.to(values.device), shape[0] * shape[1]).view(gshape)
    cnt = keep.sum(dim=gdim)
    if bool((cnt != n).any()):
        bad = int((cnt != n).sum())
        raise FormatError(
            f"corrupted mask: {bad} group(s) do not keep exactly {n} of {m} positions "
            f"(counts seen: {sorted(set(cnt.unique().tolist()))})"
        )
    pos = _positions_from_keep(keep, n, gdim)
    vshape = list(gshape)
    vshape[gdim] = n
    out = torch.zeros(gshape, dtype=values.dtype, device=values.device)
    out.scatter_(gdim, pos, values.reshape(vshape))
    out = out.view(shape)
    if "negzero" in parts:
        pruned = ~keep.view(shape)
        npruned = shape[0] * shape[1] // m * (m - n)
        neg = unpack_bits(parts["negzero"].to(values.device), npruned)
        if not values.is_floating_point():
            raise FormatError("negzero part given for a non-floating matrix")
        zeros = torch.zeros(npruned, dtype=values.dtype, device=values.device)
        out[pruned] = torch.where(neg, -zeros, zeros)
    return out
