"""Launch configurations of the 2:4 product kernels and a low-overhead launcher.

A configuration is a dict: ``KIND`` ("gemv": one token per program, :mod:`.nm24`; "tile": a
block of tokens per program, :mod:`.tiles`), block sizes, ``num_warps``/``num_stages``,
``SPLIT_K`` and kernel flags. :func:`default_config` gives the one used before any tuning;
:mod:`dass.infer.kernels.tune` searches for better ones.

:class:`Launcher` binds one configuration to one matrix. Why: Triton's ordinary launch
(``kernel[grid](...)``) binds and specialises every argument on every call, which costs more
host time than a small product takes on the GPU; the launcher keeps the compiled kernel of
its first launch and calls it directly when the next input has the same properties
(contiguous, 16-byte aligned, same dtype and device). ``T`` and the split stride are not
specialised by the kernels, so one compiled kernel serves every token count.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["default_config", "Launcher", "block_t", "cdiv", "normalise_config"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_t(T: int) -> int:
    """Token block of the tile kernels for T tokens (a power of 2; 16 or more for tl.dot)."""
    return max(2, min(128, 1 << max(0, (T - 1).bit_length())))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_for(nprog: int, kunits: int, block_k: int, sms: int) -> int:
    split = 1
    while nprog * split < 2 * sms and kunits // (split * 2) >= 4 * block_k and split < 8:
        split *= 2
    return split


def default_config(orientation: str, T: int, N: int, K: int, device_index: int = 0) -> dict[str, Any]:
    """Launch parameters before any tuning (GEMV defaults from H200 sweeps, docs/speed.md)."""
    if T <= 1:
        if orientation == "output":
            cfg = dict(KIND="gemv", BLOCK=2, BLOCK_K=512, num_warps=4, num_stages=1, PREFETCH=1, T_FAST=0)
        else:
            cfg = dict(KIND="gemv", BLOCK=8, BLOCK_K=256, num_warps=4, num_stages=1, T_FAST=0)
    else:
        bt = block_t(T)
        if bt < 16:
            cfg = dict(KIND="tile", BLOCK=32, BLOCK_K=64, BLOCK_T=bt, USE_DOT=0, PREFETCH=1, num_warps=4, num_stages=1)
        else:
            cfg = dict(KIND="tile", BLOCK=64, BLOCK_K=128, BLOCK_T=min(bt, 64), USE_DOT=1, PREFETCH=1,
                       num_warps=4, num_stages=2)
    rows = N // 4 if (orientation == "output" and cfg["KIND"] == "gemv") else N  # what BLOCK counts
    tok = T if cfg["KIND"] == "gemv" else cdiv(T, cfg["BLOCK_T"])
    kunits = K if orientation == "output" else K // 4
    bk = cfg["BLOCK_K"] if (orientation == "output" or cfg["KIND"] == "gemv") else cfg["BLOCK_K"] // 4
    cfg["SPLIT_K"] = _split_for(cdiv(rows, cfg["BLOCK"]) * tok, kunits, bk, sm_count(device_index))
    return cfg


def normalise_config(orientation: str, T: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill keys older callers leave out (``KIND``, flags) and check what the kernels need."""
    cfg = dict(cfg)
    cfg.setdefault("KIND", "gemv" if T <= 1 or cfg.get("BLOCK_T", 1) == 1 else "tile")
    cfg.pop("BLOCK_T", None) if cfg["KIND"] == "gemv" else cfg.setdefault("BLOCK_T", block_t(T))
    cfg.setdefault("SPLIT_K", 1)
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 1)
    if cfg["KIND"] == "gemv":
        cfg.setdefault("T_FAST", 0)
        if orientation == "output":
            cfg.setdefault("PREFETCH", 0)
            b = cfg["BLOCK"]
            if b < 2 or b & (b - 1):
                raise ValueError(f"the 1-token output-orientation kernel takes groups in pairs: BLOCK must be a power of 2 >= 2, got {b}")
        else:
            cfg.pop("PREFETCH", None)
    else:
        cfg.setdefault("USE_DOT", int(cfg["BLOCK_T"] >= 16))
        cfg.setdefault("PREFETCH", 1)
        if cfg["USE_DOT"] and cfg["BLOCK_T"] < 16:
            raise ValueError(f"tl.dot needs BLOCK_T >= 16, got {cfg['BLOCK_T']}")
        if orientation == "output" and cfg["BLOCK"] % 4:
            raise ValueError(f"output-orientation tiles hold whole groups: BLOCK must be a multiple of 4, got {cfg['BLOCK']}")
        if orientation == "input" and (cfg["BLOCK_K"] % 8):
            raise ValueError(f"input-orientation tiles hold whole metadata bytes: BLOCK_K must be a multiple of 8, got {cfg['BLOCK_K']}")
    return cfg


class Launcher:
    """``x @ W.T`` for a 2:4 matrix shape (kernel layout) with one launch configuration;
    the matrix itself is passed per call (a launcher holds no tensors)."""

    def __init__(self, N: int, K: int, orientation: str, cfg: dict[str, Any], T_hint: int = 1):
        from dass.infer.kernels import _mods

        self.N, self.K, self.orientation = N, K, orientation
        self.cfg = normalise_config(orientation, T_hint, cfg)
        nm24, tiles = _mods()
        c = self.cfg
        out = orientation == "output"
        if c["KIND"] == "gemv":
            self.kernel = nm24._nm24_out_kernel if out else nm24._nm24_in_kernel
            unit, nunits = c["BLOCK_K"], (K if out else K // 4)
            self.nblk = cdiv(N // 4, c["BLOCK"]) if out else cdiv(N, c["BLOCK"])
            const = (dict(BLOCK_G=c["BLOCK"], BLOCK_K=c["BLOCK_K"]) if out else dict(BLOCK_M=c["BLOCK"], BLOCK_C=c["BLOCK_K"]))
            self.bt = 1
        else:
            self.kernel = tiles.nm24_out_tile_kernel if out else tiles.nm24_in_tile_kernel
            unit = c["BLOCK_K"] if out else c["BLOCK_K"] // 4
            nunits = K if out else K // 4
            self.nblk = cdiv(N, c["BLOCK"])
            const = (dict(BG=c["BLOCK"] // 4, BK=c["BLOCK_K"]) if out else dict(BN=c["BLOCK"], BC=c["BLOCK_K"] // 4))
            self.bt = c["BLOCK_T"]
        self.per = cdiv(cdiv(nunits, c["SPLIT_K"]), unit) * unit
        self.split = cdiv(nunits, self.per)
        if c["KIND"] == "gemv":
            if out:
                const["PREFETCH"] = int(c.get("PREFETCH", 0))
            const["T_FAST"] = int(c.get("T_FAST", 0))
        else:
            const.update(BT=self.bt, USE_DOT=int(c["USE_DOT"]), PREFETCH=int(c["PREFETCH"]))
        self.const = const
        # the constexpr values in the kernel's parameter order (for the direct launch)
        self._const_pos = tuple(const[n] for n in self.kernel.arg_names[11:])
        self.opts = dict(num_warps=c["num_warps"], num_stages=c["num_stages"])
        self.dim = N // 4 if out else N  # NG or N
        self.kdim = K if out else K // 4  # K or NC
        self._compiled = None
        self._fast_key: tuple | None = None

    def warmup(self, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> None:
        """Compile for these arguments without running (under triton's AsyncCompileMode the
        compilation goes to its executor)."""
        y = torch.empty(1, self.N, dtype=torch.float32 if self.split > 1 else x.dtype, device=x.device)
        self.kernel.warmup(x, values, meta, y, x.shape[0], self.dim, self.kdim, x.stride(0), self.N, 0, self.per,
                           grid=self.grid(x.shape[0]), **self.const, **self.opts)

    def grid(self, T: int) -> tuple[int, int, int]:
        ntok = T if self.bt == 1 else cdiv(T, self.bt)
        if self.cfg["KIND"] == "gemv" and self.cfg.get("T_FAST"):
            return (ntok, self.split, self.nblk)
        return (self.nblk, self.split, ntok)

    def __call__(self, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """``x`` [T, K] (row-major rows) times the matrix (values, meta) in kernel layout."""
        T = x.shape[0]
        N = self.N
        if self.split == 1:
            y = torch.empty(T, N, dtype=x.dtype, device=x.device)
            stride_ys = 0
        else:
            y = torch.empty(self.split, T, N, dtype=torch.float32, device=x.device)
            stride_ys = T * N
        args = (x, values, meta, y, T, self.dim, self.kdim, x.stride(0), N, stride_ys, self.per)
        grid = self.grid(T)
        key = (x.dtype, x.device, x.stride(0),
               (x.data_ptr() | values.data_ptr() | meta.data_ptr()) % 16 == 0)
        if self._compiled is not None and key == self._fast_key:
            self._compiled[grid](*args, *self._const_pos)
        else:
            compiled = self.kernel[grid](*args, **self.const, **self.opts)
            if self._compiled is None and hasattr(compiled, "function") and key[3]:
                self._compiled, self._fast_key = compiled, key
        if self.split > 1:
            y = y.sum(0).to(x.dtype)
        return y
