"""Triton kernels for 2:4 products with 2 or more tokens (the "tile" kernels).

Imported lazily by :mod:`dass.infer.kernels` (needs triton and a GPU, or TRITON_INTERPRET=1).

``y = x @ W.T`` with ``x`` [T, K] and ``W`` [N, K] in the layouts of
:mod:`dass.infer.kernels.layout`. A program owns ``BN`` output features and ``BT`` tokens and
walks the reduction in steps of ``BK``:

1. it loads the compressed tile (``BN x BK/2`` values and the matching 4-bit metadata) once,
   with plain coalesced loads;
2. it expands the tile into the dense ``[BN, BK]`` matrix in registers by broadcasting: the
   kept positions ``i0, i1`` of each group are compared with ``p = 0..3`` along a new axis of
   size 4 (no gathers, no per-phase sub-products), then the 4-axis is merged into the grouped
   dimension with a reshape that keeps element order (rows ``4g + p`` for the output
   orientation, columns ``4c + p`` for the input orientation);
3. with ``USE_DOT`` it feeds that tile and the ``[BK, BT]`` slice of ``x`` to one ``tl.dot``
   (tensor cores; ``BT >= 16``), otherwise it multiplies and reduces in fp32 registers (FMA;
   for 2-8 tokens, where padding the token dimension to 16 would waste most of the MMA);
4. ``PREFETCH`` issues the loads of the next step before this step's arithmetic, so each
   program keeps two steps of weights in flight (the old tile kernels waited for memory once
   per step: their 16-128-token products ran at a fraction of the bandwidth);
5. ``SPLIT_K > 1`` splits the reduction over grid axis 1 and writes fp32 partials
   ``[SPLIT_K, T, N]`` (summed by the caller), for shapes with too few row blocks to fill the GPU.

Why one expanded tile and one ``tl.dot`` per step instead of four phase sub-products: the MMA
runs at full width ``BN`` and the token slice is loaded once per step, contiguous along K.
``T`` is not specialised (``do_not_specialize``), so a compiled kernel serves every token
count of its bucket.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _positions(nib):
    """Kept positions ``(i0, i1)`` of each group from its one-hot nibble (layout docstring)."""
    i0 = tl.where((nib & 1) != 0, 0, tl.where((nib & 2) != 0, 1, 2))
    i1 = tl.where((nib & 4) != 0, 1, tl.where((nib & 8) != 0, 3, 2))
    return i0, i1


@triton.jit
def _load_out(v_ptr, m_ptr, g, gmask, k, kmask, K):
    """Output orientation: values of the two kept rows and the nibble of each group, [BG, BK]."""
    g64 = g.to(tl.int64)
    m2 = gmask[:, None] & kmask[None, :]
    v0 = tl.load(v_ptr + ((2 * g64) * K)[:, None] + k[None, :], mask=m2, other=0.0)
    v1 = tl.load(v_ptr + ((2 * g64 + 1) * K)[:, None] + k[None, :], mask=m2, other=0.0)
    mb = tl.load(m_ptr + ((g64 // 2) * K)[:, None] + k[None, :], mask=m2, other=0)
    return v0, v1, mb


@triton.jit
def _expand_out(v0, v1, mb, g, BG: tl.constexpr, BK: tl.constexpr):
    """Dense ``[4*BG, BK]`` tile (row ``4g + p``) of an output-orientation 2:4 tile."""
    nib = (mb.to(tl.int32) >> ((g % 2) * 4)[:, None]) & 15
    i0, i1 = _positions(nib)
    p = tl.arange(0, 4)[None, :, None]
    z = tl.zeros([BG, 4, BK], dtype=v0.dtype)
    w = tl.where(i0[:, None, :] == p, v0[:, None, :], tl.where(i1[:, None, :] == p, v1[:, None, :], z))
    return tl.reshape(w, (4 * BG, BK))


@triton.jit
def _load_in(v_ptr, m_ptr, r, rmask, c0, c_hi, NC, BC: tl.constexpr):
    """Input orientation: the [BN, 2*BC] values and [BN, BC/2] metadata bytes of BC groups."""
    r64 = r.to(tl.int64)
    vc = 2 * c0 + tl.arange(0, 2 * BC)
    vv = tl.load(v_ptr + (r64 * (2 * NC))[:, None] + vc[None, :],
                 mask=rmask[:, None] & (vc < 2 * c_hi)[None, :], other=0.0)
    mc = c0 // 2 + tl.arange(0, BC // 2)
    mb = tl.load(m_ptr + (r64 * ((NC + 1) // 2))[:, None] + mc[None, :],
                 mask=rmask[:, None] & (2 * mc < c_hi)[None, :], other=0)
    return vv, mb


@triton.jit
def _expand_in(vv, mb, BN: tl.constexpr, BC: tl.constexpr):
    """Dense ``[BN, 4*BC]`` tile (column ``4c + p``) of an input-orientation 2:4 tile."""
    v0, v1 = tl.split(tl.reshape(vv, (BN, BC, 2)))
    mb = mb.to(tl.int32)
    nib = tl.reshape(tl.join(mb & 15, mb >> 4), (BN, BC))
    i0, i1 = _positions(nib)
    p = tl.arange(0, 4)[None, None, :]
    z = tl.zeros([BN, BC, 4], dtype=v0.dtype)
    w = tl.where(i0[:, :, None] == p, v0[:, :, None], tl.where(i1[:, :, None] == p, v1[:, :, None], z))
    return tl.reshape(w, (BN, 4 * BC))


@triton.jit
def _mac(acc, w, xt, USE_DOT: tl.constexpr):
    """acc [BN, BT] += w [BN, BK] @ xt [BK, BT] (tensor cores, or fp32 FMA + reduction)."""
    if USE_DOT:
        acc = tl.dot(w, xt, acc)
    else:
        acc += tl.sum(w.to(tl.float32)[:, :, None] * xt.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _store(y_ptr, acc, rows, rmask, t, tmask, stride_yt, pid_k, stride_ys):
    yp = y_ptr + pid_k.to(tl.int64) * stride_ys + t.to(tl.int64)[None, :] * stride_yt + rows.to(tl.int64)[:, None]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & tmask[None, :])


@triton.jit(do_not_specialize=["T", "stride_ys"])
def nm24_out_tile_kernel(
    x_ptr, v_ptr, m_ptr, y_ptr,
    T, NG, K, stride_xt, stride_yt, stride_ys, k_per_split,
    BG: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    USE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Output orientation (groups of 4 output rows): W [4*NG, K]; a program owns 4*BG rows."""
    pid_g = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    g = pid_g * BG + tl.arange(0, BG)
    gmask = g < NG
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < T
    xrow = x_ptr + t.to(tl.int64)[None, :] * stride_xt
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([4 * BG, BT], dtype=tl.float32)
    k = k_lo + tl.arange(0, BK)
    if PREFETCH:
        v0, v1, mb = _load_out(v_ptr, m_ptr, g, gmask, k, k < k_hi, K)
    for kk in range(0, k_per_split, BK):
        k = k_lo + kk + tl.arange(0, BK)
        kmask = k < k_hi
        if PREFETCH:
            kn = k + BK
            n0, n1, nm = _load_out(v_ptr, m_ptr, g, gmask, kn, kn < k_hi, K)
        else:
            v0, v1, mb = _load_out(v_ptr, m_ptr, g, gmask, k, kmask, K)
        xt = tl.load(xrow + k[:, None], mask=kmask[:, None] & tmask[None, :], other=0.0)
        acc = _mac(acc, _expand_out(v0, v1, mb, g, BG, BK), xt, USE_DOT)
        if PREFETCH:
            v0, v1, mb = n0, n1, nm
    rows = 4 * (pid_g * BG) + tl.arange(0, 4 * BG)
    _store(y_ptr, acc, rows, rows < 4 * NG, t, tmask, stride_yt, pid_k, stride_ys)


@triton.jit(do_not_specialize=["T", "stride_ys"])
def nm24_in_tile_kernel(
    x_ptr, v_ptr, m_ptr, y_ptr,
    T, N, NC, stride_xt, stride_yt, stride_ys, c_per_split,
    BN: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    USE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Input orientation (groups of 4 inputs): W [N, 4*NC]; a program owns BN rows and walks
    BC groups (4*BC inputs) per step."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    r = pid_n * BN + tl.arange(0, BN)
    rmask = r < N
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < T
    xrow = x_ptr + t.to(tl.int64)[None, :] * stride_xt
    c_lo = pid_k * c_per_split
    c_hi = tl.minimum(c_lo + c_per_split, NC)
    acc = tl.zeros([BN, BT], dtype=tl.float32)
    if PREFETCH:
        vv, mb = _load_in(v_ptr, m_ptr, r, rmask, c_lo, c_hi, NC, BC)
    for cc in range(0, c_per_split, BC):
        c0 = c_lo + cc
        if PREFETCH:
            nv, nm = _load_in(v_ptr, m_ptr, r, rmask, c0 + BC, c_hi, NC, BC)
        else:
            vv, mb = _load_in(v_ptr, m_ptr, r, rmask, c0, c_hi, NC, BC)
        k = 4 * c0 + tl.arange(0, 4 * BC)
        xt = tl.load(xrow + k[:, None], mask=(k < 4 * c_hi)[:, None] & tmask[None, :], other=0.0)
        acc = _mac(acc, _expand_in(vv, mb, BN, BC), xt, USE_DOT)
        if PREFETCH:
            vv, mb = nv, nm
    _store(y_ptr, acc, r, rmask, t, tmask, stride_yt, pid_k, stride_ys)
