"""Fragment layouts of 2:4 matrices for the CUDA kernels (pure torch, runs anywhere).

The CUDA kernels (:mod:`dass.infer.cuda.kernels`) stream the weight straight from global
memory into tensor-core fragments: each warp reads 512 contiguous bytes of values per step
(16 bytes a lane, one ``uint4`` load) and one 32-bit metadata word a lane per step pair,
with no shared memory, no shuffles and no index arithmetic beyond a pointer increment.
That only works if the bytes are stored in the order the warp's lanes consume them, so the
matrix is permuted once, here, when a module is built (``NM24Linear`` / ``accelerate()``).

``W`` is ``[N, K]`` (``y = x @ W.T``); a "group" is 4 weights of which 2 are kept, at
positions ``i0 < i1``; ``v0``/``v1`` are the kept weights and the 4-bit code of a group is
``i0 | i1 << 2`` (the hardware's code for ``mma.sp``). ``g = lane // 4``, ``t = lane % 4``.

Input orientation (groups of 4 along K; Wanda, DaSS's down_proj): sparse tensor cores,
``mma.sp.m16n8k32`` with the weight as the sparse operand A (16 rows x 32 K).

- ``values``: int32 ``[N/16, K/32, 32, 4]``: tile ``(rt, ks)`` (rows ``16rt..``, K
  ``32ks..``), lane, register. Register ``r`` holds ``v0 | v1 << 16`` of one group; which
  row and group is set by ``VALUE_LAYOUTS`` (the PTX ISA's fragment table). Default "a":
  ``r0``: row g, group t; ``r1``: row g+8, group t; ``r2``: row g, group 4+t; ``r3``: row
  g+8, group 4+t (group index within the 8 groups of the step).
- ``meta``: int32 ``[N/16, K/64, 32]``: one word a lane per pair of K-steps: lanes with
  ``t < 2`` hold step ``2p`` (read with sparsity selector 0), lanes ``t >= 2`` step
  ``2p+1`` (selector 1). ``q = t % 2``; with ``META_LAYOUTS`` "a" (default) the word is
  row g's groups ``4q..4q+3`` in bits 0-15 and row g+8's in bits 16-31, 4 bits a group.

Output orientation (groups of 4 along N; DaSS's gate/up): ``mma.sp`` cannot take sparsity
along M, so values are loaded compressed and expanded in registers into dense
``mma.m16n8k16`` A fragments. A warp tile is 32 rows (8 groups) as two m16 fragments whose
rows are permuted so that lane g holds all four rows of group g: fragment row ``g + 8q``
is the matrix row ``32rt + 4g + q``. Each lane then expands its own groups with byte
permutes and masks, with no data from other lanes; the kernel writes each output row back
to its true place, so the permutation is invisible outside.

- ``values``: int32 ``[N/32, K/32, 2, 32, 4]``: tile, K-step of 32, half ``h`` (16 K),
  lane, register: with columns ``c0..c3 = 16h + (2t, 2t+1, 2t+8, 2t+9)`` and the lane's
  group ``8rt + g``: ``{v0[c0] | v0[c1] << 16, v1[c0] | v1[c1] << 16, v0[c2] | v0[c3] << 16,
  v1[c2] | v1[c3] << 16}``.
- ``meta``: int32 ``[N/32, K/32, 32]``: the code of column ``c_j`` of half ``h`` in bits
  ``16h + 4j``.

Both store exactly the kept values (bit for bit) and 4 bits per group: 56.25% of the dense
bytes of a 16-bit matrix. :func:`unpack` rebuilds the dense matrix from either layout, and
the tests check it bit for bit against the original.
"""

from __future__ import annotations

import torch

from dass.io.nm_codec import nm_mask

__all__ = [
    "pack",
    "unpack",
    "check_shape",
    "VALUE_LAYOUTS",
    "META_LAYOUTS",
    "packed_bytes",
]

# Which (row offset, group) each of a lane's 4 value registers holds, as functions of t.
# "a": the PTX ISA's table for sparse m16n8k32 with 16-bit types (a0,a1: row g, first 16
# columns; a2,a3: row g+8; a4..a7: the last 16 columns); "b" keeps the 8 columns of a lane
# together (the 8-bit types' table), kept so a GPU probe can tell them apart.
VALUE_LAYOUTS: dict[str, tuple[tuple[int, tuple[int, int]], ...]] = {
    # (row offset, (group multiplier of t, group offset))
    "a": ((0, (1, 0)), (8, (1, 0)), (0, (1, 4)), (8, (1, 4))),
    "b": ((0, (2, 0)), (8, (2, 0)), (0, (2, 1)), (8, (2, 1))),
}
# How a metadata word of quad position q covers rows and groups: "a": row g (bits 0-15)
# and row g+8 (bits 16-31), groups 4q..4q+3; "b": one row (g for q=0, g+8 for q=1), all 8
# groups.
META_LAYOUTS = ("a", "b")


def check_shape(N: int, K: int, orientation: str) -> str | None:
    """Why an ``[N, K]`` matrix cannot use the CUDA kernels (None when it can)."""
    if orientation == "input":
        if N % 16 or K % 64:
            return f"input orientation needs N % 16 == 0 and K % 64 == 0, got [{N}, {K}]"
    elif orientation == "output":
        if N % 32 or K % 32:
            return f"output orientation needs N % 32 == 0 and K % 32 == 0, got [{N}, {K}]"
    else:
        return f"orientation must be 'input' or 'output', got {orientation!r}"
    return None


def _u16(v: torch.Tensor) -> torch.Tensor:
    """The 16-bit pattern of fp16/bf16 values as int32 (0..65535)."""
    if v.element_size() != 2:
        raise ValueError(f"the CUDA layouts hold 16-bit weights, got {v.dtype}")
    return v.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def _pair(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int32 words ``lo | hi << 16`` (two's complement wrap for the sign bit)."""
    w = lo.to(torch.int64) | (hi.to(torch.int64) << 16)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _groups(W: torch.Tensor, keep: torch.Tensor, orientation: str):
    """(v0, v1, code) per group: [N, K/4] (input) or [N/4, K] (output)."""
    N, K = W.shape
    if orientation == "input":
        Wg, kg, dim = W.reshape(N, K // 4, 4), keep.reshape(N, K // 4, 4), 2
    else:
        Wg, kg, dim = W.reshape(N // 4, 4, K), keep.reshape(N // 4, 4, K), 1
    cnt = kg.sum(dim=dim)
    if bool((cnt != 2).any()):
        raise ValueError("the keep-mask must keep exactly 2 of every 4 weights")
    pos = torch.sort((~kg).to(torch.int8), dim=dim, stable=True).indices.narrow(dim, 0, 2)
    i0, i1 = pos.unbind(dim)
    bits = _u16(Wg)
    v0 = bits.gather(dim, i0.unsqueeze(dim)).squeeze(dim)
    v1 = bits.gather(dim, i1.unsqueeze(dim)).squeeze(dim)
    code = (i0 | (i1 << 2)).to(torch.int32)
    return v0, v1, code


def pack(
    W: torch.Tensor,
    orientation: str,
    keep: torch.Tensor | None = None,
    value_layout: str = "a",
    meta_layout: str = "a",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of the 2:4 matrix ``W`` ``[N, K]`` (fp16/bf16) in the CUDA layout of
    ``orientation`` (module docstring). ``keep`` fixes the kept positions (exactly 2 of 4;
    default: from ``W``'s nonzeros, as :func:`dass.io.nm_codec.nm_mask`)."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {list(W.shape)}")
    N, K = W.shape
    why = check_shape(N, K, orientation)
    if why:
        raise ValueError(why)
    if keep is None:
        keep = nm_mask(W, 2, 4, orientation)
    v0, v1, code = _groups(W, keep.to(torch.bool), orientation)
    dev = W.device
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    if orientation == "input":
        words = _pair(v0, v1)  # [N, K/4]
        R, S = N // 16, K // 32
        rt = torch.arange(R, device=dev).view(R, 1, 1)
        ks = torch.arange(S, device=dev).view(1, S, 1)
        regs = []
        for roff, (mul, off) in VALUE_LAYOUTS[value_layout]:
            rows = 16 * rt + g + roff                   # [R, 1, 32]
            grp = 8 * ks + mul * t + off                # [1, S, 32]
            regs.append(words[rows.expand(R, S, 32), grp.expand(R, S, 32)])
        values = torch.stack(regs, dim=-1).contiguous()  # [R, S, 32, 4]
        P = K // 64
        pp = torch.arange(P, device=dev).view(1, P, 1)
        step = 2 * pp + (t // 2)                          # [1, P, 32]
        q = t % 2
        word = torch.zeros(R, P, 32, dtype=torch.int64, device=dev)
        c64 = code.to(torch.int64)
        if meta_layout == "a":
            for half, roff in ((0, 0), (1, 8)):
                rows = (16 * rt + g + roff).expand(R, P, 32)
                for j in range(4):
                    grp = (8 * step + 4 * q + j).expand(R, P, 32)
                    word |= c64[rows, grp] << (16 * half + 4 * j)
        elif meta_layout == "b":
            rows = (16 * rt + g + 8 * q).expand(R, P, 32)
            for j in range(8):
                grp = (8 * step + j).expand(R, P, 32)
                word |= c64[rows, grp] << (4 * j)
        else:
            raise ValueError(f"unknown meta layout {meta_layout!r}")
        meta = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()
        return values, meta
    # output orientation: v0/v1/code are [N/4, K]
    R, S = N // 32, K // 32
    rt = torch.arange(R, device=dev).view(R, 1, 1, 1)
    ks = torch.arange(S, device=dev).view(1, S, 1, 1)
    h = torch.arange(2, device=dev).view(1, 1, 2, 1)
    grp = (8 * rt + g).expand(R, S, 2, 32)
    cols = [(32 * ks + 16 * h + c).expand(R, S, 2, 32) for c in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
    regs = [
        _pair(v0[grp, cols[0]], v0[grp, cols[1]]),
        _pair(v1[grp, cols[0]], v1[grp, cols[1]]),
        _pair(v0[grp, cols[2]], v0[grp, cols[3]]),
        _pair(v1[grp, cols[2]], v1[grp, cols[3]]),
    ]
    values = torch.stack(regs, dim=-1).contiguous()  # [R, S, 2, 32, 4]
    c64 = code.to(torch.int64)
    word = torch.zeros(R, S, 32, dtype=torch.int64, device=dev)
    for hh in range(2):
        for j in range(4):
            word |= c64[grp[:, :, hh], cols[j][:, :, hh]] << (16 * hh + 4 * j)
    meta = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()
    return values, meta


def packed_bytes(N: int, K: int) -> int:
    """Bytes of values + metadata of a packed 16-bit ``[N, K]`` 2:4 matrix (either layout)."""
    return N * K + N * K // 8


def _halves(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.to(torch.int64) & 0xFFFFFFFF
    return w & 0xFFFF, w >> 16


def _bits_to(dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    b = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16)
    return b.view(dtype)


def unpack(
    values: torch.Tensor,
    meta: torch.Tensor,
    shape,
    orientation: str,
    dtype: torch.dtype,
    value_layout: str = "a",
    meta_layout: str = "a",
) -> torch.Tensor:
    """The dense ``[N, K]`` matrix from a packed layout: a reference decoder that reads the
    layout the way the kernels do, written independently of :func:`pack`'s indexing."""
    N, K = int(shape[0]), int(shape[1])
    why = check_shape(N, K, orientation)
    if why:
        raise ValueError(why)
    out = torch.zeros(N, K, dtype=torch.int64, device=values.device)
    if orientation == "input":
        R, S = N // 16, K // 32
        vals = values.reshape(R, S, 32, 4)
        mw = meta.reshape(R, K // 64, 32).to(torch.int64) & 0xFFFFFFFF
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for r, (roff, (mul, off)) in enumerate(VALUE_LAYOUTS[value_layout]):
                lo, hi = _halves(vals[:, :, lane, r])              # [R, S]
                grp = mul * t + off                                # group within the step
                row = g + roff
                # this group's code, found in the metadata word of the lane that holds it
                step_parity = torch.arange(S, device=values.device) % 2
                code = _meta_code(mw, row, grp, step_parity, meta_layout)  # [R, S]
                i0, i1 = code & 3, code >> 2
                for s in range(S):
                    k0 = 32 * s + 4 * grp
                    rows = torch.arange(R, device=values.device) * 16 + row
                    out[rows, k0 + i0[:, s]] = lo[:, s]
                    out[rows, k0 + i1[:, s]] = hi[:, s]
        return _bits_to(dtype, out)
    R, S = N // 32, K // 32
    vals = values.reshape(R, S, 2, 32, 4)
    mw = meta.reshape(R, S, 32).to(torch.int64) & 0xFFFFFFFF
    ar = torch.arange(R, device=values.device)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        cs = (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)
        for h in range(2):
            p0a, p0b = _halves(vals[:, :, h, lane, 0])
            p1a, p1b = _halves(vals[:, :, h, lane, 1])
            p2a, p2b = _halves(vals[:, :, h, lane, 2])
            p3a, p3b = _halves(vals[:, :, h, lane, 3])
            per_col = ((p0a, p1a), (p0b, p1b), (p2a, p3a), (p2b, p3b))  # (v0, v1) of c0..c3
            for j, c in enumerate(cs):
                code = (mw[:, :, lane] >> (16 * h + 4 * j)) & 15     # [R, S]
                i0, i1 = code & 3, code >> 2
                v0, v1 = per_col[j]
                for s in range(S):
                    col = 32 * s + 16 * h + c
                    base = 32 * ar + 4 * g
                    out[base + i0[:, s], col] = v0[:, s]
                    out[base + i1[:, s], col] = v1[:, s]
    return _bits_to(dtype, out)


def _meta_code(mw: torch.Tensor, row: int, grp: int, parity: torch.Tensor, layout: str) -> torch.Tensor:
    """The 4-bit code of (row within the tile, group within the step) for every step: [R, S]."""
    R, P, _ = mw.shape
    S = 2 * P
    g = row % 8
    upper = row >= 8
    codes = []
    for s in range(S):
        sel = s % 2
        if layout == "a":
            q = grp // 4
            lane = 4 * g + 2 * sel + q
            shift = 16 * int(upper) + 4 * (grp % 4)
        else:
            q = int(upper)
            lane = 4 * g + 2 * sel + q
            shift = 4 * grp
        codes.append((mw[:, s // 2, lane] >> shift) & 15)
    del parity
    return torch.stack(codes, dim=1)
