"""GPU kernels for 2:4 sparse matrices in either orientation (Triton).

``import dass.infer.kernels`` never imports triton; the kernels are compiled on first use. Use
:func:`triton_available` to ask whether they can run here.

Public entry points (``x`` is ``[T, K]``, the matrix ``W`` is ``[N, K]`` in the layout of
:mod:`dass.infer.kernels.layout`):

- :func:`nm24_matmul` -- ``x @ W.T`` reading only the compressed matrix;
- :func:`nm24_decompress` -- the dense ``W`` (for token counts where cuBLAS on the dense
  matrix is faster than a fused kernel);
- :func:`glu_act_mul` -- ``act(g) * u`` of a GLU from the stacked ``[g | u]`` (one pass).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from dass.infer.kernels.layout import from_kernel_layout, nibbles_from_mask, to_kernel_layout

__all__ = [
    "triton_available",
    "nm24_matmul",
    "nm24_decompress",
    "glu_act_mul",
    "default_config",
    "set_config",
    "to_kernel_layout",
    "from_kernel_layout",
    "nibbles_from_mask",
]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports and can run (a CUDA GPU, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _mod():
    from dass.infer.kernels import nm24

    return nm24


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_t(T: int) -> int:
    if T <= 1:
        return 1
    if T <= 16:
        return 16
    if T <= 32:
        return 32
    return 64


# launch parameters installed at run time (dass bench's sweep does this):
# key (orientation, BLOCK_T class) or (orientation, BLOCK_T class, N, K)
_OVERRIDES: dict[tuple, dict[str, int]] = {}


def set_config(orientation: str, T: int, cfg: dict[str, int], N: int | None = None, K: int | None = None) -> None:
    """Use ``cfg`` for every product with ``T``'s token class (1, <=16, <=32, >32) in that
    orientation (or only for the shape [N, K] when given)."""
    key = (orientation, _block_t(T)) if N is None else (orientation, _block_t(T), N, K)
    _OVERRIDES[key] = dict(cfg)
    _PLANS.clear()


def default_config(orientation: str, T: int, N: int, K: int, device_index: int = 0) -> dict[str, int]:
    """Launch parameters (block sizes, warps, stages, split of the reduction).

    Defaults from a sweep on an H200 (docs/speed.md); :func:`set_config` overrides them."""
    bt = _block_t(T)
    exact = _OVERRIDES.get((orientation, bt, N, K))
    if exact is not None:
        return dict(exact)
    if orientation == "output":
        if bt == 1:  # H200 sweeps over 7B/13B/70B gate and stacked gate+up: within 2% of each
            # shape's best on average, 4% at worst (docs/speed.md)
            cfg = dict(BLOCK=2, BLOCK_K=512, BLOCK_T=1, num_warps=4, num_stages=1, PREFETCH=1)
        else:
            cfg = dict(BLOCK=16, BLOCK_K=64, BLOCK_T=bt, num_warps=4, num_stages=3)
    else:
        if bt == 1:  # H200 sweeps (7B/13B/70B gate, gate+up, down): within 1% of the best on average
            cfg = dict(BLOCK=8, BLOCK_K=256, BLOCK_T=1, num_warps=4, num_stages=1)
        else:
            cfg = dict(BLOCK=64, BLOCK_K=32, BLOCK_T=bt, num_warps=4, num_stages=3)
    generic = _OVERRIDES.get((orientation, bt))
    if generic is not None:
        cfg.update({k: v for k, v in generic.items() if k != "SPLIT_K"})
    # split the reduction when there are too few programs to fill the chip
    sms = _sm_count(device_index)
    rows = N // 4 if orientation == "output" else N
    nprog = _cdiv(rows, cfg["BLOCK"]) * (T if bt == 1 else _cdiv(T, bt))
    kunits = K if orientation == "output" else K // 4
    split = 1
    while nprog * split < 2 * sms and kunits // (split * 2) >= 4 * cfg["BLOCK_K"] and split < 8:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg


_PLANS: dict[tuple, tuple] = {}


def _plan(orientation: str, T: int, N: int, K: int, dev: int, config: dict | None):
    cfg = dict(default_config(orientation, T, N, K, dev))
    if config:
        cfg.update(config)
    bt, split = cfg["BLOCK_T"], cfg["SPLIT_K"]
    if orientation == "output" and bt == 1 and (cfg["BLOCK"] < 2 or cfg["BLOCK"] & (cfg["BLOCK"] - 1)):
        raise ValueError(f"the 1-token output-orientation kernel takes groups in pairs: BLOCK must be a power of 2 >= 2, got {cfg['BLOCK']}")
    if orientation == "output":
        unit, nunits, nblk = cfg["BLOCK_K"], K, _cdiv(N // 4, cfg["BLOCK"])
    else:
        unit, nunits, nblk = cfg["BLOCK_K"], K // 4, _cdiv(N, cfg["BLOCK"])
    per = _cdiv(_cdiv(nunits, split), unit) * unit
    split = _cdiv(nunits, per)
    grid = (nblk, split, T if bt == 1 else _cdiv(T, bt))
    mod = _mod()
    if orientation == "output":
        kern = mod._nm24_out_kernel
        const = dict(BLOCK_G=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], BLOCK_T=bt, SPLIT_K=split,
                     PREFETCH=int(cfg.get("PREFETCH", 0)) if bt == 1 else 0)
    else:
        kern = mod._nm24_in_kernel
        const = dict(BLOCK_M=cfg["BLOCK"], BLOCK_C=cfg["BLOCK_K"], BLOCK_T=bt, SPLIT_K=split)
    const.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return kern[grid], split, per, const


def nm24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    N: int,
    K: int,
    orientation: str,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 matrix ``W`` [N, K] given in kernel layout; ``x`` is [T, K].

    ``config`` overrides launch parameters (keys of :func:`default_config`)."""
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [T, {K}], got {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    T = x.shape[0]
    if T == 0:
        return x.new_empty(0, N)
    dev = x.device.index or 0
    key = (orientation, T, N, K, dev, None if config is None else tuple(sorted(config.items())))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(orientation, T, N, K, dev, config)
    launch, split, per, const = plan
    if split == 1:
        y = torch.empty(T, N, dtype=x.dtype, device=x.device)
        stride_ys = 0
    else:
        y = torch.empty(split, T, N, dtype=torch.float32, device=x.device)
        stride_ys = T * N
    if orientation == "output":
        launch(x, values, meta, y, T, N // 4, K, x.stride(0), N, stride_ys, per, **const)
    else:
        launch(x, values, meta, y, T, N, K // 4, x.stride(0), N, stride_ys, per, **const)
    if split > 1:
        y = y.sum(0).to(x.dtype)
    return y


def nm24_decompress(values: torch.Tensor, meta: torch.Tensor, N: int, K: int, orientation: str,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [N, K] matrix from the kernel layout (Triton; one pass, writes every element)."""
    mod = _mod()
    w = out if out is not None else torch.empty(N, K, dtype=values.dtype, device=values.device)
    if orientation == "output":
        NG = N // 4
        BG, BK = 8, 256
        mod._nm24_out_decompress_kernel[(_cdiv(NG, BG), _cdiv(K, BK))](values, meta, w, NG, K, BLOCK_G=BG, BLOCK_K=BK)
    else:
        NC = K // 4
        BM, BC = 16, 64
        mod._nm24_in_decompress_kernel[(_cdiv(N, BM), _cdiv(NC, BC))](values, meta, w, N, NC, BLOCK_M=BM, BLOCK_C=BC)
    return w


def glu_act_mul(gu: torch.Tensor, D: int, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gu[:, :D]) * gu[:, D:]`` for ``gu`` [T, 2D] (``act``: "silu" or "gelu_tanh"),
    computed in fp32 and rounded once (torch rounds after the activation and again after
    the product, so results differ from it by about one unit in the last place)."""
    from dass.infer.kernels import glu

    if act not in glu.ACTS:
        raise ValueError(f"act must be one of {sorted(glu.ACTS)}, got {act!r}")
    if gu.dim() != 2 or gu.shape[1] != 2 * D or gu.stride(1) != 1:
        raise ValueError(f"gu must be a row-major [T, {2 * D}] tensor, got {list(gu.shape)}")
    T = gu.shape[0]
    h = out if out is not None else torch.empty(T, D, dtype=gu.dtype, device=gu.device)
    if T:
        BLOCK = 1024
        glu._glu_act_mul_kernel[(T, _cdiv(D, BLOCK))](gu, h, D, gu.stride(0), h.stride(0), ACT=glu.ACTS[act], BLOCK=BLOCK)
    return h
