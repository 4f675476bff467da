"""Triton kernel for a GLU's activation and product: ``h = act(g) * u`` from ``[g | u]``.

Imported lazily by :mod:`dass.infer.kernels` (needs triton and a GPU, or TRITON_INTERPRET=1).
Why: once gate and up run as one stacked product, ``act(gu[:, :D]) * gu[:, D:]`` in torch is
two kernels that move 450 MB at 4096 tokens of a 7B MLP (read g, write act, read act and u,
write h); this one reads ``gu`` once and writes ``h`` (270 MB).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: activation codes of :func:`_glu_act_mul_kernel`
ACTS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _glu_act_mul_kernel(gu_ptr, h_ptr, D, stride_gu, stride_h, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + D + cols, mask=m, other=0.0).to(tl.float32)
    if ACT == 0:  # silu(g) = g * sigmoid(g)
        a = g * tl.sigmoid(g)
    else:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g * sigmoid(2 z)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g * tl.sigmoid(2.0 * z)
    tl.store(h_ptr + row * stride_h + cols, (a * u).to(h_ptr.dtype.element_ty), mask=m)
