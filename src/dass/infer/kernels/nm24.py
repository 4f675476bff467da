"""Triton kernels for 2:4 matrices stored in the layouts of :mod:`dass.infer.kernels.layout`.

Imported lazily by :mod:`dass.infer.kernels` (needs triton and a GPU, or TRITON_INTERPRET=1).

``y = x @ W.T`` with ``x`` [T, K] and ``W`` [N, K] given as (values, meta):

- one token per program (grid axis 2, or axis 0 with ``T_FAST``): a streaming GEMV that keeps
  fp32 partial products in registers and reduces them once at the end. Two or more tokens
  run the tile kernels of :mod:`dass.infer.kernels.tiles` (or this GEMV once per token, which
  the autotuner may pick for 2-8 tokens: with ``T_FAST`` the weights come from memory once).
- ``SPLIT_K > 1``: programs split the reduction and write fp32 partials (summed on the host
  side), for shapes that would otherwise give too few programs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _out_pair_loads(x_ptr, v_ptr, m_ptr, t, stride_xt, ra, mr, K, k, k_hi, amask, bmask):
    """One BLOCK_K step of the 1-token output kernel: x, the pair's metadata byte and the four
    value rows (two per group), as fp32 / int32; zeros past the end."""
    km = k < k_hi
    ma = amask[:, None] & km[None, :]
    mbm = bmask[:, None] & km[None, :]
    kp = k[None, :]
    xv = tl.load(x_ptr + t * stride_xt + k, mask=km, other=0.0).to(tl.float32)[None, :]
    mb = tl.load(m_ptr + mr[:, None] + kp, mask=ma, other=0).to(tl.int32)
    u0 = tl.load(v_ptr + ra[:, None] + kp, mask=ma, other=0.0).to(tl.float32)
    u1 = tl.load(v_ptr + (ra + K)[:, None] + kp, mask=ma, other=0.0).to(tl.float32)
    w0 = tl.load(v_ptr + (ra + 2 * K)[:, None] + kp, mask=mbm, other=0.0).to(tl.float32)
    w1 = tl.load(v_ptr + (ra + 3 * K)[:, None] + kp, mask=mbm, other=0.0).to(tl.float32)
    return xv, mb, u0, u1, w0, w1


@triton.jit
def _group_accumulate(acc0, acc1, acc3, tot, mb, v0, v1, xv, SHIFT: tl.constexpr):
    """Add one block of a group's products (its flags at bits SHIFT..SHIFT+3 of ``mb``) to the
    accumulators of rows 0, 1, 3 and to the group's total (row 2 = total - the others)."""
    acc0 += tl.where((mb & (1 << SHIFT)) != 0, v0, 0.0) * xv
    acc1 += tl.where((mb & (2 << SHIFT)) != 0, v0, tl.where((mb & (4 << SHIFT)) != 0, v1, 0.0)) * xv
    acc3 += tl.where((mb & (8 << SHIFT)) != 0, v1, 0.0) * xv
    tot += (v0 + v1) * xv
    return acc0, acc1, acc3, tot


@triton.jit
def _group_store(yp, acc0, acc1, acc3, tot, mask):
    """Rows 0-3 of a group from its accumulators."""
    ety = yp.dtype.element_ty
    s0 = tl.sum(acc0, axis=1)
    s1 = tl.sum(acc1, axis=1)
    s3 = tl.sum(acc3, axis=1)
    tl.store(yp + 0, s0.to(ety), mask=mask)
    tl.store(yp + 1, s1.to(ety), mask=mask)
    tl.store(yp + 2, (tl.sum(tot, axis=1) - s0 - s1 - s3).to(ety), mask=mask)
    tl.store(yp + 3, s3.to(ety), mask=mask)


@triton.jit(do_not_specialize=["T", "stride_ys"])
def _nm24_out_kernel(
    x_ptr, v_ptr, m_ptr, y_ptr,
    T, NG, K, stride_xt, stride_yt, stride_ys, k_per_split,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, T_FAST: tl.constexpr,
):
    # T_FAST: the token index is grid axis 0 (the programs of one row block and every token
    # run side by side, so the weights are read from memory once and the other tokens hit L2)
    pid_g = tl.program_id(2) if T_FAST else tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(0) if T_FAST else tl.program_id(2)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    y_base = y_ptr + pid_k.to(tl.int64) * stride_ys
    # GEMV over BLOCK_G // 2 pairs of groups: a pair shares one metadata byte (group 2h in
    # the low nibble, 2h + 1 in the high one), so each byte is loaded once and every row is
    # one bit test + one select; row 2 of a group is its total minus rows 0, 1 and 3.
    HP: tl.constexpr = BLOCK_G // 2
    t = pid_t.to(tl.int64)
    hh = pid_g * HP + tl.arange(0, HP)
    h64 = hh.to(tl.int64)
    amask = (2 * hh) < NG
    bmask = (2 * hh + 1) < NG
    ra = (4 * h64) * K
    mr = h64 * K
    a0 = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    a1 = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    a3 = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    at = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    b0 = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    b1 = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    b3 = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    bt = tl.zeros([HP, BLOCK_K], dtype=tl.float32)
    # PREFETCH = d > 0: the loads of the block d steps ahead are issued before this block's
    # arithmetic (a program's blocks otherwise wait on memory one after another)
    kb = k_lo + tl.arange(0, BLOCK_K)
    if PREFETCH >= 1:
        xv, mb, u0, u1, w0, w1 = _out_pair_loads(x_ptr, v_ptr, m_ptr, t, stride_xt, ra, mr, K, kb, k_hi,
                                                 amask, bmask)
    if PREFETCH >= 2:
        pxv, pmb, pu0, pu1, pw0, pw1 = _out_pair_loads(x_ptr, v_ptr, m_ptr, t, stride_xt, ra, mr, K, kb + BLOCK_K,
                                                       k_hi, amask, bmask)
    for kk in range(0, k_per_split, BLOCK_K):
        if PREFETCH >= 1:
            nxv, nmb, nu0, nu1, nw0, nw1 = _out_pair_loads(x_ptr, v_ptr, m_ptr, t, stride_xt, ra, mr, K,
                                                           kb + kk + PREFETCH * BLOCK_K, k_hi, amask, bmask)
        else:
            xv, mb, u0, u1, w0, w1 = _out_pair_loads(x_ptr, v_ptr, m_ptr, t, stride_xt, ra, mr, K, kb + kk, k_hi,
                                                     amask, bmask)
        a0, a1, a3, at = _group_accumulate(a0, a1, a3, at, mb, u0, u1, xv, 0)
        b0, b1, b3, bt = _group_accumulate(b0, b1, b3, bt, mb, w0, w1, xv, 4)
        if PREFETCH >= 2:
            xv, mb, u0, u1, w0, w1 = pxv, pmb, pu0, pu1, pw0, pw1
            pxv, pmb, pu0, pu1, pw0, pw1 = nxv, nmb, nu0, nu1, nw0, nw1
        elif PREFETCH == 1:
            xv, mb, u0, u1, w0, w1 = nxv, nmb, nu0, nu1, nw0, nw1
    yp = y_base + t * stride_yt + 8 * h64
    _group_store(yp, a0, a1, a3, at, amask)
    _group_store(yp + 4, b0, b1, b3, bt, bmask)


@triton.jit(do_not_specialize=["T", "stride_ys"])
def _nm24_in_kernel(
    x_ptr, v_ptr, m_ptr, y_ptr,
    T, N, NC, stride_xt, stride_yt, stride_ys, c_per_split,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, T_FAST: tl.constexpr,
):
    # W is [N, 4*NC]; values [N, 2*NC]; meta [N, ceil(NC/2)]; T_FAST as in _nm24_out_kernel
    pid_m = tl.program_id(2) if T_FAST else tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(0) if T_FAST else tl.program_id(2)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < N
    r64 = r.to(tl.int64)
    VK = 2 * NC
    MK = (NC + 1) // 2
    vrow = r64 * VK
    mrow = r64 * MK
    c_lo = pid_k * c_per_split
    c_hi = tl.minimum(c_lo + c_per_split, NC)
    y_base = y_ptr + pid_k.to(tl.int64) * stride_ys
    t = pid_t.to(tl.int64)
    xrow = x_ptr + t * stride_xt
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for cc in range(0, c_per_split, BLOCK_C):
        c0 = c_lo + cc
        c = c0 + tl.arange(0, BLOCK_C)
        vc = 2 * c0 + tl.arange(0, 2 * BLOCK_C)
        mc = c0 // 2 + tl.arange(0, BLOCK_C // 2)
        cmask = c < c_hi
        vv = tl.load(v_ptr + vrow[:, None] + vc[None, :],
                     mask=rmask[:, None] & (vc < 2 * c_hi)[None, :], other=0.0)
        mb = tl.load(m_ptr + mrow[:, None] + mc[None, :],
                     mask=rmask[:, None] & (2 * mc < c_hi)[None, :], other=0).to(tl.int32)
        x0 = tl.load(xrow + 4 * c + 0, mask=cmask, other=0.0).to(tl.float32)[None, :]
        x1 = tl.load(xrow + 4 * c + 1, mask=cmask, other=0.0).to(tl.float32)[None, :]
        x2 = tl.load(xrow + 4 * c + 2, mask=cmask, other=0.0).to(tl.float32)[None, :]
        x3 = tl.load(xrow + 4 * c + 3, mask=cmask, other=0.0).to(tl.float32)[None, :]
        v0, v1 = tl.split(tl.reshape(vv, (BLOCK_M, BLOCK_C, 2)))
        nib = tl.reshape(tl.join(mb & 15, mb >> 4), (BLOCK_M, BLOCK_C))
        xs0 = tl.where((nib & 1) != 0, x0, tl.where((nib & 2) != 0, x1, x2))
        xs1 = tl.where((nib & 8) != 0, x3, tl.where((nib & 4) != 0, x1, x2))
        acc += v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1
    out = tl.sum(acc, axis=1)
    tl.store(y_base + t * stride_yt + r64, out.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _nm24_out_decompress_kernel(v_ptr, m_ptr, w_ptr, NG, K, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m2 = (g < NG)[:, None] & (k < K)[None, :]
    g64 = g.to(tl.int64)
    v0 = tl.load(v_ptr + ((2 * g64) * K)[:, None] + k[None, :], mask=m2, other=0.0)
    v1 = tl.load(v_ptr + ((2 * g64 + 1) * K)[:, None] + k[None, :], mask=m2, other=0.0)
    mb = tl.load(m_ptr + ((g64 // 2) * K)[:, None] + k[None, :], mask=m2, other=0).to(tl.int32)
    nib = (mb >> ((g % 2) * 4)[:, None]) & 15
    z = tl.zeros_like(v0)
    base = w_ptr + ((4 * g64) * K)[:, None] + k[None, :]
    tl.store(base, tl.where((nib & 1) != 0, v0, z), mask=m2)
    tl.store(base + K, tl.where((nib & 2) != 0, v0, tl.where((nib & 4) != 0, v1, z)), mask=m2)
    tl.store(base + 2 * K, tl.where((nib & 3) == 0, v0, tl.where((nib & 12) == 0, v1, z)), mask=m2)
    tl.store(base + 3 * K, tl.where((nib & 8) != 0, v1, z), mask=m2)


@triton.jit
def _nm24_in_decompress_kernel(v_ptr, m_ptr, w_ptr, N, NC, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = tl.program_id(1) * BLOCK_C
    rmask = r < N
    r64 = r.to(tl.int64)
    vc = 2 * c0 + tl.arange(0, 2 * BLOCK_C)
    vv = tl.load(v_ptr + (r64 * (2 * NC))[:, None] + vc[None, :],
                 mask=rmask[:, None] & (vc < 2 * NC)[None, :], other=0.0)
    v0, v1 = tl.split(tl.reshape(vv, (BLOCK_M, BLOCK_C, 2)))
    mc = c0 // 2 + tl.arange(0, BLOCK_C // 2)
    mb = tl.load(m_ptr + (r64 * ((NC + 1) // 2))[:, None] + mc[None, :],
                 mask=rmask[:, None] & (2 * mc < NC)[None, :], other=0).to(tl.int32)
    nib = tl.reshape(tl.join(mb & 15, mb >> 4), (BLOCK_M, BLOCK_C))
    z = tl.zeros_like(v0)
    d0 = tl.where((nib & 1) != 0, v0, z)
    d1 = tl.where((nib & 2) != 0, v0, tl.where((nib & 4) != 0, v1, z))
    d2 = tl.where((nib & 3) == 0, v0, tl.where((nib & 12) == 0, v1, z))
    d3 = tl.where((nib & 8) != 0, v1, z)
    # interleave the four phases back into 4*BLOCK_C contiguous columns
    w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_M, 4 * BLOCK_C))
    wc = 4 * c0 + tl.arange(0, 4 * BLOCK_C)
    tl.store(w_ptr + (r64 * (4 * NC))[:, None] + wc[None, :], w,
             mask=rmask[:, None] & (wc < 4 * NC)[None, :])
