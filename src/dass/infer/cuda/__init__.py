"""CUDA C++ kernels for 2:4 products at 1-128 tokens (built on first use, cached).

``import dass.infer.cuda`` needs no compiler and no GPU: the extension is compiled the first
time :func:`load` is called on a machine with a CUDA GPU (compute capability >= 8.0), torch's
CUDA build and ``nvcc`` (``torch.utils.cpp_extension``, ninja, one unit per orientation and
dtype in parallel), into ``$DASS_CACHE/cuda-ext/`` (default ``~/.cache/dass/cuda-ext``)
under a name keyed by the sources, the GPU architecture and the torch version, so later
processes load it in a second. Anywhere it cannot be built, :func:`load` returns None and
:func:`unavailable_reason` says why (no GPU, CPU-only torch, no nvcc, a compile error); the
dispatcher then uses the other paths and writes that reason into its tuning log.
``DASS_CUDA_KERNELS=0`` turns the kernels off.

The weights are packed by :mod:`dass.infer.cuda.layout`; :func:`mm` runs one product with a
launch configuration. Two kernels share the packed layout:

- ``"reg"`` (nm24_kernels.cuh, ``{"kind", "mt", "ks", "splits"}`` and optionally ``"wr"``,
  ``"wt"``): the weight streamed straight into registers; 4 warps a block along the rows,
  each with all the tokens (best at 1-32 tokens), or ``wr`` x ``wt`` warps, ``wt`` token
  groups sharing the rows (for 32-128 tokens: fewer shared-memory reads a weight byte);
  split-K finished inside the kernel (the last K-slice of a row block adds the others'
  partials), so a product is one launch;
- ``"smem"`` (nm24_smem.cuh, ``{"kind", "mt", "wn", "ks", "splits"}``): 8 warps a block
  (``wn`` of them along the tokens), weight and tokens through a multi-stage shared-memory
  ring, split-K fixed up inside the kernel; made for 16-128 tokens, where the register
  kernel re-reads the tokens from L2 too often and has no registers left for loads in flight;
- ``"wg"`` (nm24_wg.cuh, ``{"kind", "mt", "wg", "ts", "ks", "splits"}``, output orientation on
  compute capability 9.0): ``wg`` x ``ts`` warpgroups a block (``ts`` along the tokens); the weight expanded in registers is
  the A operand of Hopper's warpgroup MMA (wgmma), the tokens its B operand in shared
  memory; made for 32-128 tokens, where dense ``mma.sync`` cannot issue fast enough;
- ``"wgs"`` (nm24_wgs.cuh, ``{"kind", "mt", "wg", "ks", "ws", "splits"}``, input orientation
  on compute capability 9.0): ``wg`` warpgroups a block, ``mt`` m64 tiles each; the packed
  weight (streamed into registers, or with ``ws`` = 1 staged in the shared-memory ring) is the
  sparse A operand of ``wgmma.mma_async.sp``, the tokens its B operand in shared memory (read
  once per warpgroup, not once per warp); made for 16-128 tokens, where the register kernel's
  ``ldmatrix`` + ``mma.sp`` per warp run out of issue rate.

``mt`` is warp tiles a warp, ``ks`` K-steps of 32 a pipeline stage, ``splits`` K-slices of the
grid. :func:`candidates` lists the configurations worth timing for a (shape, token bucket)
and the dispatcher keeps the fastest.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIGS",
    "SOURCES",
    "load",
    "available",
    "unavailable_reason",
    "mm",
    "nt_for",
    "candidates",
    "default_config",
    "MAX_TOKENS",
    "CHUNKED_MAX_TOKENS",
    "slices",
    "SMEM_CONFIGS",
    "WG_CONFIGS",
    "runner",
    "wg_supported",
    "WGS_CONFIGS",
    "wgs_supported",
    "unpack",
    "GLU_CONFIGS",
    "GLU_ACTS",
    "glu_candidates",
    "glu_runner",
    "pdl_enabled",
    "DEEP_CONFIGS",
    "deep_enabled",
]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = ("nm24_ext.cpp", "nm24_in_bf16.cu", "nm24_in_f16.cu", "nm24_out_bf16.cu", "nm24_out_f16.cu",
           "nm24s_in_bf16.cu", "nm24s_in_f16.cu", "nm24s_out_bf16.cu", "nm24s_out_f16.cu",
           "nm24w_out_bf16.cu", "nm24w_out_f16.cu", "nm24g_in_bf16.cu", "nm24g_in_f16.cu", "nm24_unpack.cu",
           "nm24_glu_in_bf16.cu", "nm24_glu_in_f16.cu", "nm24_glu_out_bf16.cu", "nm24_glu_out_f16.cu",
           "nm24d_in_bf16.cu", "nm24d_in_f16.cu", "nm24d_out_bf16.cu", "nm24d_out_f16.cu")
HEADERS = ("nm24_kernels.cuh", "nm24_dispatch.cuh", "nm24_smem.cuh", "nm24_dispatch_smem.cuh", "nm24_params.h",
           "nm24_wg.cuh", "nm24_dispatch_wg.cuh", "nm24_wgmma_ops.cuh", "nm24_wgs.cuh", "nm24_dispatch_wgs.cuh")
MAX_TOKENS = 128  # tokens of one launch
# A call with more tokens runs as equal slices of at most MAX_TOKENS (each re-reads the
# weight, from L2 where the slices run close together): a candidate up to this many tokens,
# chosen only where it measures faster than decompressing for cuBLAS.
CHUNKED_MAX_TOKENS = 512
WARPS = 4  # warps per block of the register kernel's classic shape (4 along the rows, 1 along the tokens)
# (mt, nt, ks, wr, wt) compiled per orientation: must equal nm24_dispatch.cuh's DASS24_CASE
# lists (tests/test_cuda_layout.py compares them). nt = the block's token tiles of 8 (a power
# of two), wr x wt = its warps along the rows and along the tokens (each warp: nt / wt tiles).
_CLASSIC = {
    "input": tuple((mt, nt, ks, 4, 1) for nt in (1, 2, 4, 8, 16) for mt in (1, 2) for ks in (2, 4)
                   if not (nt == 16 and mt == 2 and ks == 4)),
    "output": tuple((mt, nt, ks, 4, 1) for nt in (1, 2, 4, 8, 16) for mt in (1, 2) for ks in (2, 4)
                    if not (mt == 2 and (nt > 4 or ks == 4)) and not (nt == 16 and ks == 4)),
}
# two token groups (wt = 2: a weight fragment meets twice the tokens per shared-memory read and
# a block's token tile serves more rows) and eight-warp blocks, for 32-128 tokens
_WIDE = {
    "input": ((2, 4, 2, 4, 2), (4, 4, 2, 4, 2), (2, 8, 2, 4, 2), (4, 8, 2, 4, 2), (4, 8, 2, 2, 2),
              (2, 16, 2, 4, 2), (4, 16, 2, 4, 2), (4, 16, 2, 2, 2), (2, 16, 2, 8, 1), (2, 8, 2, 8, 1)),
    "output": ((2, 4, 2, 4, 2), (2, 8, 2, 4, 2), (1, 8, 4, 4, 2), (1, 16, 2, 4, 2), (1, 16, 2, 8, 1),
               (1, 8, 2, 8, 1)),
}
CONFIGS: dict[str, tuple[tuple[int, int, int, int, int], ...]] = {o: _CLASSIC[o] + _WIDE[o] for o in _CLASSIC}
# (mt, nt, ks, wr, wt) of the register kernel compiled with the GLU epilogue (a stacked
# [gate; up] matrix in, act(gate) * up out; half a warp's tiles gate, half up, so mt is even):
# must equal nm24_dispatch.cuh's DASS24_GLU_CASE lists.
GLU_CONFIGS: dict[str, tuple[tuple[int, int, int, int, int], ...]] = {
    "input": tuple(c for c in CONFIGS["input"] if c[0] == 2 and c[4] == 1),
    "output": tuple(c for c in CONFIGS["output"] if c[0] == 2 and c[4] == 1),
}
# (mt, nt, ks, wr, wt) of the register kernel's deep variant for 57-128 tokens (a 5-stage
# token ring and L2 prefetch of the weights 4 stages ahead): must equal nm24_dispatch.cuh's
# DASS24_DEEP_CASE lists. Timed beside the rest only with DASS_CUDA_DEEP=1 (new in round 9,
# not yet measured on a GPU).
DEEP_CONFIGS: dict[str, tuple[tuple[int, int, int, int, int], ...]] = {
    "input": ((2, 8, 2, 4, 1), (2, 8, 4, 4, 1), (2, 16, 2, 4, 1), (1, 16, 2, 4, 1), (1, 8, 4, 4, 1)),
    "output": ((1, 8, 4, 4, 1), (1, 8, 2, 4, 1), (1, 16, 2, 4, 1)),
}
#: GLU activation codes of the kernel's epilogue (dass.infer.kernels.glu has the same two)
GLU_ACTS = {"silu": 0, "gelu_tanh": 1}

# (mt, wn, nt, ks) of the shared-memory kernel: must equal nm24_dispatch_smem.cuh's
# DASS24_SMEM_CASE lists (the configurations that compile without spilling on sm_90).
SMEM_CONFIGS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "input": tuple((mt, wn, nt, ks) for (mt, wn, nt) in (
        (2, 1, 2), (4, 1, 2), (1, 1, 4), (2, 1, 4), (4, 1, 4), (1, 1, 8), (2, 1, 8), (2, 2, 8), (4, 2, 8),
        (1, 1, 16), (2, 2, 16), (4, 4, 16)) for ks in (2, 4)),
    "output": tuple((mt, wn, nt, ks) for (mt, wn, nt) in (
        (1, 1, 2), (2, 1, 2), (1, 1, 4), (2, 1, 4), (1, 1, 8), (1, 2, 8), (2, 2, 8), (1, 2, 16), (2, 4, 16))
        for ks in (2, 4)),
}
SMEM_WARPS = 8  # warps per block of the shared-memory kernel

# (mt, wg, ts, nt, ks) of the wgmma kernel (output orientation, compute capability 9.0 only):
# must equal nm24_dispatch_wg.cuh's DASS24_WG_CASE list. wg = warpgroups (of 4 warps) along
# the rows of a block, ts = along its tokens (each wgmma then has nt * 8 / ts tokens).
WG_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 1, 2, 16, 2), (1, 1, 2, 16, 4),
    (1, 1, 1, 8, 2), (1, 1, 1, 8, 4), (1, 2, 1, 8, 2), (1, 2, 1, 8, 4), (2, 1, 2, 8, 2),
    (1, 2, 1, 4, 2), (1, 2, 1, 4, 4), (2, 1, 1, 4, 2), (2, 1, 1, 4, 4), (2, 2, 1, 4, 2),
    (2, 1, 1, 2, 2), (2, 1, 1, 2, 4), (2, 2, 1, 2, 2),
)
# (mt, wg, nt, ks, ws) of the sparse-wgmma kernel (input orientation, compute capability 9.0
# only): must equal nm24_dispatch_wgs.cuh's DASS24_WGS_CASE list. mt = m64 tiles a warpgroup,
# wg = warpgroups a block, nt = token tiles of 8 (the wgmma's N is nt * 8, 16 at least),
# ws = 1: the weight staged in shared memory (0: straight into registers).
WGS_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = tuple((*c, 0) for c in (
    (1, 1, 16, 2), (1, 1, 16, 4), (1, 2, 16, 2), (1, 2, 16, 4), (2, 1, 16, 2), (2, 2, 16, 2),
    (1, 1, 8, 4), (1, 2, 8, 4), (2, 1, 8, 2), (2, 1, 8, 4), (2, 2, 8, 2), (2, 2, 8, 4),
    (2, 1, 4, 4), (2, 2, 4, 4), (1, 2, 4, 4),
    (2, 1, 2, 4), (2, 2, 2, 4),
)) + tuple((*c, 1) for c in (
    (1, 1, 16, 2), (1, 2, 16, 2), (2, 1, 16, 2), (2, 2, 16, 2),
    (1, 2, 8, 4), (2, 1, 8, 2), (2, 2, 8, 2), (2, 2, 8, 4),
    (2, 2, 4, 4),
)) + tuple((*c, ws) for ws in (0, 1) for c in (  # 3-4 warpgroups of one m64 tile: 192 / 256 rows a block
    (1, 3, 16, 2), (1, 4, 16, 2), (1, 3, 8, 4), (1, 4, 8, 4),
) if (c, ws) != ((1, 4, 16, 2), 1))  # that one spills (ptxas, sm_90a)
# 1 when a GPU probe (benchmarks/gpu_kernels.py) found the wgmma descriptor's two byte
# offsets the other way round from the PTX ISA's description; 0 as documented.
WG_SWAP = int(os.environ.get("DASS_WG_SWAP", "0"))

_REASON: str | None = None


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:12]


def _cache_dir() -> Path:
    root = os.environ.get("DASS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "dass"


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None if they can or :func:`load` was not called)."""
    return _REASON


def _precheck() -> str | None:
    if os.environ.get("DASS_CUDA_KERNELS", "1") == "0":
        return "DASS_CUDA_KERNELS=0"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    cc = torch.cuda.get_device_capability()
    if cc < (8, 0):
        return f"compute capability {cc} < 8.0 (no sparse tensor cores)"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # noqa: BLE001
        return f"torch.utils.cpp_extension unavailable: {e}"
    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found: set CUDA_HOME"
    return None


@functools.lru_cache(maxsize=None)
def load() -> Any:
    """The compiled extension, or None (then :func:`unavailable_reason` says why)."""
    global _REASON
    why = _precheck()
    if why:
        _REASON = why
        log.info("dass CUDA 2:4 kernels off: %s", why)
        return None
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    tv = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    name = f"dass_nm24_{_source_hash()}_sm{arch}_t{tv}"
    build = _cache_dir() / "cuda-ext" / name
    build.mkdir(parents=True, exist_ok=True)
    # sm_90 is built as sm_90a (the wgmma kernel needs its architecture-specific features)
    gen = f"{arch}a" if arch == "90" else arch
    flags = ["-O3", "-std=c++17", f"-gencode=arch=compute_{gen},code=sm_{gen}", "--use_fast_math",
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    try:
        from torch.utils.cpp_extension import load as _load

        os.environ.setdefault("MAX_JOBS", str(max(1, min(8, os.cpu_count() or 1))))
        mod = _load(name=name, sources=[str(HERE / s) for s in SOURCES], extra_cuda_cflags=flags,
                    extra_cflags=["-O3", "-std=c++17"], extra_include_paths=[str(HERE)],
                    build_directory=str(build), verbose=os.environ.get("DASS_CUDA_VERBOSE") == "1")
    except Exception as e:  # noqa: BLE001 -- a missing toolchain is a logged fallback
        _REASON = f"build failed: {type(e).__name__}: {str(e)[-400:]}"
        log.warning("dass CUDA 2:4 kernels off: %s", _REASON)
        return None
    _REASON = None
    return mod


def available() -> bool:
    """True when the extension is built (or builds now) and can run."""
    return load() is not None


def slices(T: int) -> tuple[int, int]:
    """(slice count, tokens a slice) of a call with T tokens: equal slices of at most
    MAX_TOKENS, so every slice of a call past MAX_TOKENS has more than MAX_TOKENS / 2 tokens
    and runs the configuration tuned for the MAX_TOKENS bucket."""
    n = max(1, math.ceil(T / MAX_TOKENS))
    return n, math.ceil(T / n)


def nt_for(T: int) -> int:
    """Token tiles of 8 a call with T tokens runs (a power of two, 1..16)."""
    n = max(1, math.ceil(T / 8))
    return 1 << (n - 1).bit_length()


def _ksteps_ok(K: int, ks: int) -> bool:
    return (K // 32) % ks == 0


def _reg_blocks(orientation: str, N: int, mt: int, wr: int = WARPS) -> int:
    """Row blocks of the register kernel's grid for an [N, K] matrix."""
    return math.ceil(N // (16 if orientation == "input" else 32) / (wr * mt))


def _auto_splits(orientation: str, N: int, K: int, mt: int, ks: int, sms: int, wr: int = WARPS) -> int:
    blocks = _reg_blocks(orientation, N, mt, wr)
    ksteps = K // 32
    s = 1
    while blocks * s < 4 * sms and ksteps // (2 * s) >= 2 * ks:
        s *= 2
    return s


def smem_blocks_per_sm(orientation: str, mt: int, wn: int, nt: int, ks: int) -> int:
    """Blocks an SM runs of a shared-memory configuration (nm24_smem.cuh SmemShape::MINB)."""
    nf = 1 if orientation == "input" else 2
    ntw = nt // wn
    acc = mt * nf * ntw * 4
    tiles = (SMEM_WARPS // wn) * mt
    x_u4 = nt * 8 * ks * 4
    vpt = ks * 32 * (1 if orientation == "input" else 2)
    mpt = ks * (4 if orientation == "input" else 8)
    stage = 16 * (x_u4 + tiles * (vpt + mpt))
    return 2 if (acc <= 32 and 3 * stage <= 110 * 1024) else 1


def smem_blocks(orientation: str, N: int, mt: int, wn: int) -> int:
    """Row blocks of the shared-memory kernel's grid for an [N, K] matrix."""
    rows = 16 if orientation == "input" else 32
    per = (SMEM_WARPS // wn) * mt
    return math.ceil((N // rows) / per)


def _wave_splits(blocks: int, slots: int, K: int, ks: int) -> list[int]:
    """K-slice counts that fill ``slots`` resident blocks about evenly (one or two whole
    waves) for a grid of ``blocks`` row blocks, keeping two stages a slice at least."""
    ksteps = K // 32
    out = {1}
    for waves in (1, 2):
        s = max(1, round(waves * slots / blocks))
        out.update({s, s + 1} if s > 1 else {s})
    return sorted(s for s in out if ksteps // s >= 2 * ks)


def _smem_splits(orientation: str, N: int, K: int, mt: int, wn: int, nt: int, ks: int, sms: int) -> list[int]:
    return _wave_splits(smem_blocks(orientation, N, mt, wn), sms * smem_blocks_per_sm(orientation, mt, wn, nt, ks),
                        K, ks)


def wg_supported() -> bool:
    """True on a GPU where the wgmma kernel runs (compute capability 9.0: H100, H200);
    ``DASS_CUDA_WG=0`` turns it off alone."""
    if os.environ.get("DASS_CUDA_WG", "1") == "0":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def wgs_supported() -> bool:
    """True on a GPU where the sparse-wgmma kernel runs (compute capability 9.0);
    ``DASS_CUDA_WGS=0`` turns it off alone (``DASS_CUDA_WG=0`` turns off both wgmma kernels)."""
    if os.environ.get("DASS_CUDA_WGS", "1") == "0":
        return False
    return wg_supported()


def wgs_blocks_per_sm(mt: int, wg: int, nt: int) -> int:
    """Blocks an SM runs of a sparse-wgmma configuration (nm24_wgs.cuh WgsShape::MINB)."""
    return 2 if (wg == 1 and mt * nt * 4 <= 64) else 1


def wgs_stages(mt: int, wg: int, nt: int, ks: int, ws: int) -> int:
    """Ring slots of a sparse-wgmma configuration (nm24_wgs.cuh WgsShape::STAGES)."""
    tiles = wg * 4 * mt
    stage = 16 * (nt * 8 * ks * 4 + (tiles * ks * 32 + tiles * (ks // 2) * 8 if ws else 0))
    budget = (110 if wgs_blocks_per_sm(mt, wg, nt) == 2 else 220) * 1024
    return min(8, budget // stage)


def _wgs_splits(N: int, K: int, mt: int, wg: int, nt: int, ks: int, sms: int) -> list[int]:
    blocks = math.ceil((N // 16) / (wg * 4 * mt))
    return _wave_splits(blocks, sms * wgs_blocks_per_sm(mt, wg, nt), K, ks)


def wg_blocks_per_sm(mt: int, wg: int, ts: int, nt: int, ks: int) -> int:
    """Blocks an SM runs of a wgmma configuration (nm24_wg.cuh WgShape::MINB)."""
    stage = 16 * (nt * 8 * ks * 4 + wg * 4 * mt * ks * 72)
    return 2 if (wg * ts == 1 and 4 * stage <= 110 * 1024) else 1


def _wg_splits(N: int, K: int, mt: int, wg: int, ts: int, nt: int, ks: int, sms: int) -> list[int]:
    return _wave_splits(math.ceil((N // 32) / (wg * 4 * mt)), sms * wg_blocks_per_sm(mt, wg, ts, nt, ks), K, ks)


def candidates(orientation: str, T: int, N: int, K: int, sms: int = 132,
               wg: bool | None = None) -> list[dict[str, Any]]:
    """Launch configurations worth timing for a [N, K] matrix at T tokens (every kernel;
    ``wg``: include the two wgmma kernels, default: each when this machine's GPU runs it)."""
    if T > CHUNKED_MAX_TOKENS:
        return []
    sliced = T > MAX_TOKENS  # only the register kernel runs slices (its nt_min)
    T = slices(T)[1]
    nt = nt_for(T)
    out: list[dict[str, Any]] = []
    for mt, cnt, ks, wr, wt in CONFIGS[orientation]:
        if cnt != nt or not _ksteps_ok(K, ks):
            continue
        base = _auto_splits(orientation, N, K, mt, ks, sms, wr)
        shape = {} if (wr, wt) == (WARPS, 1) else {"wr": wr, "wt": wt}
        splits = {1, max(1, base // 2), base, base * 2}
        if nt >= 8:  # 33-128 tokens: also slice counts that fill one or two blocks an SM evenly
            for per_sm in (1, 2):
                splits.update(_wave_splits(_reg_blocks(orientation, N, mt, wr), sms * per_sm, K, ks))
        deep = deep_enabled() and (mt, cnt, ks, wr, wt) in DEEP_CONFIGS[orientation]
        for s in sorted(splits):
            if (K // 32) // s >= ks:
                out.append({"kind": "reg", "mt": mt, "ks": ks, "splits": s, **shape})
                if deep:
                    out.append({"kind": "reg", "mt": mt, "ks": ks, "splits": s, **shape, "deep": 1})
    if sliced:
        return out
    smem = os.environ.get("DASS_CUDA_SMEM", "1") != "0"  # off alone, like DASS_CUDA_WG
    for mt, wn, cnt, ks in SMEM_CONFIGS[orientation] if smem else ():
        if cnt != nt or not _ksteps_ok(K, ks):
            continue
        for s in _smem_splits(orientation, N, K, mt, wn, nt, ks, sms):
            out.append({"kind": "smem", "mt": mt, "wn": wn, "ks": ks, "splits": s})
    if orientation == "output" and (wg_supported() if wg is None else wg):
        for mt, nwg, ts, cnt, ks in WG_CONFIGS:
            if cnt != nt or not _ksteps_ok(K, ks):
                continue
            for s in _wg_splits(N, K, mt, nwg, ts, nt, ks, sms):
                out.append({"kind": "wg", "mt": mt, "wg": nwg, "ts": ts, "ks": ks, "splits": s})
    if orientation == "input" and (wgs_supported() if wg is None else wg):
        for mt, nwg, cnt, ks, ws in WGS_CONFIGS:
            if cnt != nt or not _ksteps_ok(K, ks):
                continue
            for s in _wgs_splits(N, K, mt, nwg, nt, ks, sms):
                out.append({"kind": "wgs", "mt": mt, "wg": nwg, "ks": ks, "ws": ws, "splits": s})
    return out


def default_config(orientation: str, T: int, N: int, K: int, sms: int = 132) -> dict[str, int] | None:
    """A reasonable configuration without timing (None when the shape cannot run)."""
    c = candidates(orientation, T, N, K, sms)
    if not c:
        return None
    nt = nt_for(slices(T)[1])
    mt = 2 if nt <= 2 else 1
    ks = 4 if nt <= 8 else 2
    for cfg in c:
        if (cfg["kind"] == "reg" and cfg["mt"] == mt and cfg["ks"] == ks and "wt" not in cfg
                and cfg["splits"] == _auto_splits(orientation, N, K, mt, ks, sms)):
            return cfg
    return c[0]


def mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, N: int,
       orientation: str, config: dict[str, int]) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x ``[T, K]`` (T <= CHUNKED_MAX_TOKENS; past MAX_TOKENS in
    :func:`slices`) and W packed by :func:`layout.pack`."""
    return runner(values, meta, bias, N, orientation, config)(x)


def unpack(values: torch.Tensor, meta: torch.Tensor, N: int, K: int, orientation: str,
           dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` matrix of ``dtype`` from the packed layout, on the GPU (the
    CUDA twin of :func:`layout.unpack`; pruned places are +0)."""
    ext = _ext()
    like = torch.empty(0, dtype=dtype)
    return ext.unpack(values, meta, N, K, 0 if orientation == "input" else 1, like)


def _ext():
    """The built extension, or RuntimeError with the reason it is not there."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"dass CUDA 2:4 kernels unavailable: {_REASON}")
    return ext


def _reg_args(orientation: str, config: dict[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    """(orientation code, mt, ks, splits, wr, wt, pdl) of a register-kernel configuration:
    the arguments ext.mm takes after N, in its order."""
    return (0 if orientation == "input" else 1, int(config["mt"]), int(config["ks"]), int(config["splits"]),
            int(config.get("wr", WARPS)), int(config.get("wt", 1)), int(pdl_enabled()))


def deep_enabled() -> bool:
    """Whether the register kernel's deep variant (DEEP_CONFIGS) is a candidate:
    ``DASS_CUDA_DEEP=1``. Off by default until measured on a GPU (docs/speed.md, round 9)."""
    return os.environ.get("DASS_CUDA_DEEP", "0") == "1"


def pdl_enabled() -> bool:
    """Whether register-kernel launches use programmatic dependent launch (nm24_kernels.cuh):
    ``DASS_CUDA_PDL=1`` on a GPU of compute capability 9.0. Off by default until measured
    in decoding on the GPU (docs/speed.md)."""
    return (os.environ.get("DASS_CUDA_PDL", "0") == "1" and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (9, 0))


def glu_candidates(orientation: str, T: int, N: int, K: int, sms: int = 132) -> list[dict[str, Any]]:
    """Register-kernel configurations that run a stacked ``[gate; up]`` [N, K] matrix with the
    GLU epilogue at T tokens (1-128; [] where the shape has no whole gate tiles)."""
    rows = 16 if orientation == "input" else 32
    if T > MAX_TOKENS or N % (2 * rows):
        return []
    allowed = {(mt, ks, wr, wt) for mt, nt, ks, wr, wt in GLU_CONFIGS[orientation] if nt == nt_for(T)}
    out = []
    for c in candidates(orientation, T, N, K, sms, wg=False):
        # the deep variant has no GLU epilogue: its twins of the GLU configurations are left out
        if c["kind"] == "reg" and not c.get("deep") and (c["mt"], c["ks"], c.get("wr", WARPS), c.get("wt", 1)) in allowed:
            out.append(c)
    return out


def glu_runner(values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, N: int, orientation: str,
               config: dict[str, Any], act: str):
    """``f(x) = act(g) * u`` where ``[g | u] = x @ W.T (+ bias)`` for a stacked [gate; up] W of
    N = 2 D rows: one register-kernel launch, [T, D] out (1-128 tokens)."""
    ext = _ext()
    if act not in GLU_ACTS:
        raise ValueError(f"act must be one of {sorted(GLU_ACTS)}, got {act!r}")
    if config.get("kind", "reg") != "reg":
        raise ValueError(f"the GLU epilogue runs on the register kernel only, got {config}")
    ori, mt, ks, splits, wr, wt, pdl = _reg_args(orientation, config)
    code, fn = GLU_ACTS[act], ext.mm

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > MAX_TOKENS:
            raise ValueError(f"dass nm24 cuda: the GLU epilogue runs 1-{MAX_TOKENS} tokens a call, got {x.shape[0]}")
        return fn(x, values, meta, bias, N, ori, mt, ks, splits, wr, wt, 0, code, pdl)
    return run


def runner(values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, N: int, orientation: str,
           config: dict[str, Any]):
    """``f(x) = x @ W.T (+ bias)`` bound to one configuration (no per-call dict lookups)."""
    ext = _ext()
    ori = 0 if orientation == "input" else 1
    mt, ks, splits = int(config["mt"]), int(config["ks"]), int(config["splits"])
    kind = config.get("kind", "reg")
    if kind == "wgs":
        if orientation != "input":
            raise ValueError("the sparse-wgmma kernel runs the input orientation only")
        fn, nwg, wsm = ext.mm_wgs, int(config["wg"]), int(config.get("ws", 0))
        swap = int(config.get("swap", WG_SWAP))

        def run(x: torch.Tensor) -> torch.Tensor:
            return fn(x, values, meta, bias, N, mt, nwg, ks, wsm, splits, swap)
    elif kind == "wg":
        if orientation != "output":
            raise ValueError("the wgmma kernel runs the output orientation only")
        fn, nwg, ts = ext.mm_wg, int(config["wg"]), int(config.get("ts", 1))
        swap = int(config.get("swap", WG_SWAP))

        def run(x: torch.Tensor) -> torch.Tensor:
            return fn(x, values, meta, bias, N, mt, nwg, ts, ks, splits, swap)
    elif kind == "smem":
        fn, wn = ext.mm_smem, int(config["wn"])

        def run(x: torch.Tensor) -> torch.Tensor:
            return fn(x, values, meta, bias, N, ori, mt, wn, ks, splits)
    else:
        fn, deep = ext.mm, int(config.get("deep", 0))
        ori, mt, ks, splits, wr, wt, pdl = _reg_args(orientation, config)

        def run(x: torch.Tensor, nt_min: int = 0) -> torch.Tensor:
            return fn(x, values, meta, bias, N, ori, mt, ks, splits, wr, wt, nt_min, -1, pdl, deep)
    if kind != "reg":
        return run

    def sliced(x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if T <= MAX_TOKENS:
            return run(x)
        if T > CHUNKED_MAX_TOKENS:
            raise ValueError(f"dass nm24 cuda: {T} tokens; at most {CHUNKED_MAX_TOKENS} a call")
        step = slices(T)[1]
        nt = nt_for(step)  # the last, shorter slice runs the same configuration
        return torch.cat([run(x[i:i + step], nt) for i in range(0, T, step)])
    return sliced
