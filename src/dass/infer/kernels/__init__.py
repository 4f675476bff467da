"""GPU kernels for 2:4 sparse matrices in either orientation (Triton).

``import dass.infer.kernels`` never imports triton; the kernels are compiled on first use. Use
:func:`triton_available` to ask whether they can run here.

Public entry points (``x`` is ``[T, K]``, the matrix ``W`` is ``[N, K]`` in the layout of
:mod:`dass.infer.kernels.layout`):

- :func:`nm24_matmul` -- ``x @ W.T`` reading only the compressed matrix (one token: the GEMV
  kernels of :mod:`.nm24`; more: the tile kernels of :mod:`.tiles`);
- :func:`nm24_decompress` -- the dense ``W`` (for token counts where cuBLAS on the dense
  matrix is faster than a fused kernel);
- :func:`glu_act_mul` -- ``act(g) * u`` of a GLU from the stacked ``[g | u]`` (one pass).

Launch parameters: :func:`default_config`, overridden by :func:`set_config` (what ``dass
bench``'s sweeps install) or by the ``config`` argument; :mod:`dass.infer.kernels.tune`
searches them per (shape, token bucket) and records the winners on disk.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from dass.infer.kernels.launch import Launcher, block_t, cdiv, normalise_config
from dass.infer.kernels.launch import default_config as _base_config
from dass.infer.kernels.layout import (
    from_kernel_layout,
    nibbles_from_mask,
    to_kernel_layout,
)

__all__ = [
    "triton_available",
    "nm24_matmul",
    "nm24_decompress",
    "glu_act_mul",
    "default_config",
    "set_config",
    "Launcher",
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


@functools.lru_cache(maxsize=None)
def _mods():
    """(nm24, tiles) kernel modules; under TRITON_INTERPRET=1 also teaches the interpreter
    what it lacks (:mod:`dass.infer.kernels.interpret`)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from dass.infer.kernels.interpret import patch_interpreter

        patch_interpreter()
    from dass.infer.kernels import nm24, tiles

    return nm24, tiles


def _token_class(T: int) -> int:
    return 1 if T <= 1 else block_t(T)


# launch parameters installed at run time: key (orientation, token class) or
# (orientation, token class, N, K)
_OVERRIDES: dict[tuple, dict[str, Any]] = {}


def set_config(orientation: str, T: int, cfg: dict[str, Any], N: int | None = None, K: int | None = None) -> None:
    """Use ``cfg`` for every product with ``T``'s token class (1, 2, 4, ..., 128) in that
    orientation (or only for the shape [N, K] when given)."""
    key = (orientation, _token_class(T)) if N is None else (orientation, _token_class(T), N, K)
    _OVERRIDES[key] = dict(cfg)
    _LAUNCHERS.clear()


def default_config(orientation: str, T: int, N: int, K: int, device_index: int = 0) -> dict[str, Any]:
    """Launch parameters for a [N, K] matrix at T tokens: an installed override
    (:func:`set_config`) or the built-in default."""
    exact = _OVERRIDES.get((orientation, _token_class(T), N, K))
    if exact is not None:
        return normalise_config(orientation, T, exact)
    cfg = _base_config(orientation, T, N, K, device_index)
    generic = _OVERRIDES.get((orientation, _token_class(T)))
    if generic is not None:
        split = cfg["SPLIT_K"]
        if generic.get("KIND", cfg["KIND"]) != cfg["KIND"]:
            cfg = {}
        cfg.update({k: v for k, v in generic.items() if k != "SPLIT_K"})
        cfg.setdefault("SPLIT_K", split)
    return normalise_config(orientation, T, cfg)


# launchers of nm24_matmul calls, per (orientation, T, shape, device, config)
_LAUNCHERS: dict[tuple, Launcher] = {}


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
    key = (orientation, T, N, K, dev,
           None if config is None else tuple(sorted(config.items())))
    launch = _LAUNCHERS.get(key)
    if launch is None:
        cfg = dict(default_config(orientation, T, N, K, dev))
        if config:
            if config.get("KIND", cfg["KIND"]) != cfg["KIND"]:
                cfg = {}
            cfg.update(config)
        if len(_LAUNCHERS) > 4096:
            _LAUNCHERS.clear()
        launch = _LAUNCHERS[key] = Launcher(N, K, orientation, cfg, T)
    return launch(x, values, meta)


def nm24_decompress(values: torch.Tensor, meta: torch.Tensor, N: int, K: int, orientation: str,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [N, K] matrix from the kernel layout (Triton; one pass, writes every element)."""
    nm24, _ = _mods()
    w = out if out is not None else torch.empty(N, K, dtype=values.dtype, device=values.device)
    if orientation == "output":
        NG = N // 4
        BG, BK = 8, 256
        nm24._nm24_out_decompress_kernel[(cdiv(NG, BG), cdiv(K, BK))](values, meta, w, NG, K, BLOCK_G=BG, BLOCK_K=BK)
    else:
        NC = K // 4
        BM, BC = 16, 64
        nm24._nm24_in_decompress_kernel[(cdiv(N, BM), cdiv(NC, BC))](values, meta, w, N, NC, BLOCK_M=BM, BLOCK_C=BC)
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
        glu._glu_act_mul_kernel[(T, cdiv(D, BLOCK))](gu, h, D, gu.stride(0), h.stride(0), ACT=glu.ACTS[act], BLOCK=BLOCK)
    return h
