"""Run 2:4 sparse models on the GPU: ``accelerate(model)`` swaps 2:4 ``nn.Linear`` weights
for compressed :class:`NM24Linear` modules and graph-captures the GLU MLP blocks.

Each ``NM24Linear`` call runs one of three paths:

- ``"triton"``: the Triton kernels of :mod:`dass.infer.kernels` (values + 4-bit metadata, 56% of
  the dense bytes), either orientation;
- ``"cslt"``: cuSPARSELt sparse tensor cores (``torch._cslt_sparse_mm`` on a
  ``torch._cslt_compress``-ed weight); input orientation only;
- ``"dense"``: decompress in one Triton pass, then cuBLAS.

By default the path is measured, not guessed: on first use of each (shape, token bucket)
every candidate is timed and the fastest kept (``AccelerateConfig(autotune=False)`` uses
the static thresholds instead). cuSPARSELt costs about 0.5 ms of host work per eager call
(a plan is built every time); a CUDA-graph replay skips it, so cuSPARSELt products are
replayed from graphs captured per token bucket, and a module with ``gate_proj``,
``up_proj`` and ``down_proj`` children (a GLU MLP) is captured whole (one input copy, one
output copy, no launch gaps). Inside a graph the caller captures, the plain paths run.
Inference only (no autograd). Measured speeds: docs/speed.md.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from dass.errors import UserRuntimeError
from dass.io.sparse_format import detect_orientation, is_nm, parse_entry

__all__ = [
    "AccelerationError",
    "AccelerateConfig",
    "NM24Linear",
    "accelerate",
    "check_device",
    "clear_graphs",
    "tuning_log",
    "cslt_supported",
]


class AccelerationError(UserRuntimeError):
    """Raised when acceleration is impossible here (no supported GPU, bad manifest, ...)."""


@dataclass
class AccelerateConfig:
    """Dispatch thresholds (token counts) measured on an H200; see docs/speed.md."""

    triton_max_tokens: dict[str, int] = field(default_factory=lambda: {"input": 32, "output": 64})
    # input orientation: token counts [lo, hi] where decompress + cuBLAS beats cuSPARSELt
    dense_band: tuple[int, int] | None = None
    # time the candidate paths on first use of each (shape, token bucket) and keep the fastest;
    # when False the static thresholds above decide
    autotune: bool = True
    autotune_max_triton_tokens: int = 1024
    graphs: bool = True
    graph_mlp: bool = True
    graph_max_tokens: int = 16384
    max_graphs_per_module: int = 16
    # ask cuSPARSELt for its fastest algorithm per (shape, token bucket) on first use; its
    # default (alg_id 0) ran 0.74-0.92x of dense cuBLAS at 1024-16384 tokens on an H200,
    # the searched one 1.31-1.68x (docs/speed.md)
    cslt_alg_search: bool = True
    # ... from this many tokens on (below it cuSPARSELt never wins), bf16 only: with torch
    # 2.11's cuSPARSELt on an H200 the fp16 search fails ("internal error") and leaves the
    # CUDA context broken (illegal instruction on the next kernel)
    cslt_search_min_tokens: int = 256
    # which NM24Linear paths replay per-module graphs when called outside a graphed MLP
    graph_paths: tuple[str, ...] = ("cslt",)
    # stack a GLU's 2:4 gate and up into one product (module docstring of _fuse_gate_up)
    fuse_gate_up: bool = True


_DEFAULT = AccelerateConfig()

# --------------------------------------------------------------------------- device checks


def check_device(device: torch.device | str | None = None) -> torch.device:
    """The CUDA device to use, or :class:`AccelerationError` if there is none that can run
    the kernels (compute capability 8.0 or newer)."""
    if not torch.cuda.is_available():
        raise AccelerationError(
            "dass.infer.accelerate needs a CUDA GPU (compute capability >= 8.0, e.g. A100/H100/H200); "
            "none is available here (torch.cuda.is_available() is False). Run the dense model instead."
        )
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        raise AccelerationError(
            f"dass.infer.accelerate needs the model on a CUDA device, got {dev}; move it with model.cuda() first"
        )
    cc = torch.cuda.get_device_capability(dev)
    if cc < (8, 0):
        raise AccelerationError(
            f"dass.infer.accelerate needs compute capability >= 8.0 (sparse tensor cores); {torch.cuda.get_device_name(dev)} is {cc}"
        )
    return dev


_CSLT_OK: dict[int, bool] = {}


def cslt_supported(device: torch.device) -> bool:
    """Whether torch's cuSPARSELt ops run on ``device`` (tried once on a tiny matrix)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CSLT_OK:
        ok = False
        backend = getattr(torch.backends, "cusparselt", None)
        if hasattr(torch, "_cslt_compress") and getattr(backend, "is_available", lambda: True)():
            try:
                w = torch.zeros(64, 64, dtype=torch.float16, device=device)
                w[:, ::2] = 1
                x = torch.ones(16, 64, dtype=torch.float16, device=device)
                y = torch._cslt_sparse_mm(torch._cslt_compress(w), x.t(), transpose_result=True)
                ok = bool(torch.allclose(y.float(), torch.full((16, 64), 32.0, device=device)))
            except Exception:
                ok = False
        _CSLT_OK[idx] = ok
    return _CSLT_OK[idx]


def cslt_search(compressed: torch.Tensor, dense_t: torch.Tensor, transpose_result: bool = True) -> int:
    """cuSPARSELt's fastest algorithm id for ``compressed @ dense_t`` (result transposed or
    not), 0 when the search is not available in this torch."""
    import warnings

    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is None:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.11 calls the op deprecated
        found = search(compressed, dense_t, transpose_result=transpose_result)
    return int(found[0] if isinstance(found, (tuple, list)) else found)


def _triton_ok() -> bool:
    from dass.infer.kernels import triton_available

    return triton_available()


# --------------------------------------------------------------------------- CUDA graphs

_LOCK = threading.Lock()
_POOLS: dict[int, Any] = {}
_STATIC: dict[tuple, torch.Tensor] = {}
_ALL_CACHES: "weakref.WeakSet[_GraphCache]" = weakref.WeakSet()


def _bucket(T: int) -> int:
    """Token-count bucket a graph is captured for: exact up to 16, then 4 per octave."""
    if T <= 16:
        return T
    step = 1 << (T.bit_length() - 3)  # T in (2^k, 2^(k+1)] -> steps of 2^(k-2)
    return -(-T // step) * step


def _static(device: torch.device, dtype: torch.dtype, rows: int, cols: int, tag: str) -> torch.Tensor:
    key = (device.index, dtype, rows, cols, tag)
    t = _STATIC.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.zeros(rows, cols, dtype=dtype, device=device)
        _STATIC[key] = t
    return t


def _pool(device: torch.device):
    idx = device.index
    if idx not in _POOLS:
        _POOLS[idx] = torch.cuda.graph_pool_handle()
    return _POOLS[idx]


def clear_graphs() -> None:
    """Drop every captured graph and the shared static buffers (frees their memory)."""
    with _LOCK:
        for c in _ALL_CACHES:
            c.graphs.clear()
        _STATIC.clear()
        _POOLS.clear()
        _FLUSH.clear()


_TLS = threading.local()


def _capturing() -> bool:
    """True while a graph is being captured, or while a whole-MLP graph warms up (then the
    modules inside must run their plain paths, not replay graphs of their own)."""
    if getattr(_TLS, "raw", 0):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _GraphCache:
    """Replays ``fn(x2d)`` from CUDA graphs captured per (token bucket, dtype, device).

    All graphs of a device share one memory pool and, per (rows, cols), one static input
    and one static output buffer. That is safe because every call copies its input in,
    replays, and copies the output out before returning, on the current stream.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], in_features: int, out_features: int,
                 max_graphs: int = 16):
        self.fn = fn
        self.in_features = in_features
        self.out_features = out_features
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        _ALL_CACHES.add(self)

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        T = x2.shape[0]
        b = _bucket(T)
        key = (b, x2.dtype, x2.device.index)
        sin = _static(x2.device, x2.dtype, b, self.in_features, "in")
        sout = _static(x2.device, x2.dtype, b, self.out_features, "out")
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key, sin, sout, x2.device)
        else:
            self.graphs.move_to_end(key)
        sin[:T].copy_(x2)
        g.replay()
        return sout[:T].clone()

    def _capture(self, key, sin, sout, device) -> torch.cuda.CUDAGraph:
        _TLS.raw = getattr(_TLS, "raw", 0) + 1
        try:
            return self._capture_inner(key, sin, sout, device)
        finally:
            _TLS.raw -= 1

    def _capture_inner(self, key, sin, sout, device) -> torch.cuda.CUDAGraph:
        with torch.inference_mode(False), torch.no_grad():
            cur = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                for _ in range(2):  # compile kernels, create handles, fill caches
                    self.fn(sin)
            cur.wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=_pool(device)):
                sout.copy_(self.fn(sin))
        self.graphs[key] = g
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g


# --------------------------------------------------------------------------- the module

_ALG_CACHE: dict[tuple, int] = {}
_PATH_CACHE: dict[tuple, str] = {}
_TUNE_LOG: dict[tuple, dict[str, float]] = {}
_FLUSH: dict[int, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A 256 MB buffer whose zeroing evicts the L2 cache (weights of other layers would)."""
    if device.index not in _FLUSH:
        with torch.inference_mode(False):
            _FLUSH[device.index] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    return _FLUSH[device.index]


def _graph_time(fn: Callable[[], Any], device: torch.device, calls: int = 3, reps: int = 5) -> float:
    """Median ms per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    del g
    return sorted(times)[len(times) // 2]


def tuning_log() -> dict[str, dict[str, float]]:
    """Times (ms) measured by the autotuner: '{orientation} {N}x{K} T={bucket}' -> {path: ms}."""
    return {f"{o} {n}x{k} T={t}": v for (o, n, k, t), v in _TUNE_LOG.items()}


class NM24Linear(nn.Module):
    """A 2:4 sparse ``nn.Linear`` replacement (bf16/fp16, CUDA, inference only).

    Holds the matrix as kernel-layout ``values`` + ``meta`` (see :mod:`dass.infer.kernels.layout`)
    and, for the input orientation when cuSPARSELt works here, ``cslt`` (cuSPARSELt's own
    compressed copy). ``dense_weight()`` gives back the exact dense matrix.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, orientation: str,
                 config: AccelerateConfig | None = None, keep: torch.Tensor | None = None):
        super().__init__()
        if orientation not in ("input", "output"):
            raise ValueError(f"orientation must be 'input' or 'output', got {orientation!r}")
        if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16) or not weight.is_cuda:
            raise ValueError("NM24Linear needs a 2-D fp16/bf16 CUDA weight")
        N, K = weight.shape
        if (orientation == "output" and N % 4) or (orientation == "input" and K % 4):
            raise ValueError(f"shape {[N, K]} cannot hold 2:4 groups along the {orientation} dim")
        from dass.infer.kernels.layout import to_kernel_layout

        self.in_features, self.out_features, self.orientation = K, N, orientation
        self.config = config or _DEFAULT
        with torch.no_grad():
            w = weight.detach().contiguous()
            values, meta = to_kernel_layout(w, orientation, keep)
            self.register_buffer("values", values)
            self.register_buffer("meta", meta)
            self.register_buffer("cslt", None)
            if orientation == "input" and N % 64 == 0 and K % 64 == 0 and cslt_supported(w.device):
                self.register_buffer("cslt", torch._cslt_compress(w))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._triton = _triton_ok()
        self._graph = _GraphCache(self._raw, K, N, self.config.max_graphs_per_module)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 along {self.orientation}, "
                f"cuSPARSELt={'yes' if self.cslt is not None else 'no'}, bias={self.bias is not None}")

    # -- paths
    def candidates(self, T: int) -> list[str]:
        c = []
        if self._triton and T <= self.config.autotune_max_triton_tokens:
            c.append("triton")
        if self.orientation == "input" and self.cslt is not None:
            c.append("cslt")
        c.append("dense")
        return c

    def path_for(self, T: int) -> str:
        """'triton', 'cslt' or 'dense' (decompress + cuBLAS) for a call with T tokens."""
        cfg = self.config
        if cfg.autotune:
            key = (self.orientation, self.out_features, self.in_features, _bucket(T), self.values.dtype,
                   self.values.device.index)
            p = _PATH_CACHE.get(key)
            if p is None and not torch.cuda.is_current_stream_capturing():
                p = _PATH_CACHE[key] = self._tune(_bucket(T))
            if p is not None:
                return p
        return self._static_path(T)

    def _static_path(self, T: int) -> str:
        cfg = self.config
        if self._triton and T <= cfg.triton_max_tokens[self.orientation]:
            return "triton"
        if self.orientation == "input" and self.cslt is not None:
            band = cfg.dense_band
            if self._triton and band is not None and band[0] <= T <= band[1]:
                return "dense"
            return "cslt"
        return "dense"

    def _tune(self, T: int) -> str:
        """Time each candidate path at T tokens (CUDA-graph replays, L2 flushed before each
        call, the flush's own time subtracted) and return the fastest."""
        cands = self.candidates(T)
        if len(cands) == 1:
            return cands[0]
        dev = self.values.device
        flush = _flush_buffer(dev)
        x = torch.randn(T, self.in_features, device=dev, dtype=self.values.dtype)
        times: dict[str, float] = {}
        with torch.inference_mode(False), torch.no_grad():
            base = _graph_time(lambda: flush.zero_(), dev)
            for p in cands:
                try:
                    self._run_path(x, p)
                    t = _graph_time(lambda: (flush.zero_(), self._run_path(x, p)), dev)
                except Exception:  # a path that cannot run here is simply not chosen
                    continue
                times[p] = t - base
        _TUNE_LOG[(self.orientation, self.out_features, self.in_features, T)] = times
        return min(times, key=times.get) if times else self._static_path(T)

    def dense_weight(self) -> torch.Tensor:
        from dass.infer.kernels import nm24_decompress
        from dass.infer.kernels.layout import from_kernel_layout

        if self._triton:
            return nm24_decompress(self.values, self.meta, self.out_features, self.in_features, self.orientation)
        return from_kernel_layout(self.values, self.meta, (self.out_features, self.in_features), self.orientation)

    def _cslt_mm(self, x2: torch.Tensor) -> torch.Tensor:
        T = x2.shape[0]
        pad = (-T) % 8
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        alg = 0
        if self.config.cslt_alg_search and T >= self.config.cslt_search_min_tokens and x2.dtype == torch.bfloat16:
            key = (self.out_features, self.in_features, _bucket(T), x2.dtype, x2.device.index)
            found = _ALG_CACHE.get(key)
            # the autotuner's first call searches (also while a whole-MLP graph warms up;
            # never inside a capture)
            if found is None and not torch.cuda.is_current_stream_capturing():
                found = _ALG_CACHE[key] = cslt_search(self.cslt, x2.t())
            alg = found or 0
        y = torch._cslt_sparse_mm(self.cslt, x2.t(), transpose_result=True, alg_id=alg)
        return y[:T] if pad else y

    def _raw(self, x2: torch.Tensor) -> torch.Tensor:
        """The product without graphs (this is what graphs capture)."""
        return self._run_path(x2, self.path_for(x2.shape[0]))

    def _run_path(self, x2: torch.Tensor, path: str) -> torch.Tensor:
        if path == "triton":
            from dass.infer.kernels import nm24_matmul

            y = nm24_matmul(x2, self.values, self.meta, self.out_features, self.in_features, self.orientation)
        elif path == "cslt":
            y = self._cslt_mm(x2)
        else:
            y = F.linear(x2, self.dense_weight())
        if self.bias is not None:
            y = y + self.bias
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.values.dtype:
            raise TypeError(f"NM24Linear holds {self.values.dtype} weights, got {x2.dtype} input")
        with torch.no_grad():
            T = x2.shape[0]
            if (self.config.graphs and self.path_for(T) in self.config.graph_paths and T <= self.config.graph_max_tokens
                    and not _capturing()):
                y = self._graph(x2)
            else:
                y = self._raw(x2)
        return y.view(*lead, self.out_features)


# --------------------------------------------------------------------------- stacked gate/up


def _act_kind(act: Any) -> str | None:
    """'silu' / 'gelu_tanh' when ``act`` is one of those (checked numerically by the caller)."""
    name = type(act).__name__.lower()
    if isinstance(act, nn.SiLU) or "silu" in name:
        return "silu"
    if (isinstance(act, nn.GELU) and act.approximate == "tanh") or "gelutanh" in name or "newgelu" in name:
        return "gelu_tanh"
    return None


def _fused_act(act: Any, D: int, device, dtype) -> str | None:
    """The Triton activation kind to use for ``act``, or None (torch ops), after checking the
    kernel against ``act(g) * u`` on random values."""
    kind = _act_kind(act)
    if kind is None or not _triton_ok():
        return None
    from dass.infer.kernels import glu_act_mul

    try:
        gu = torch.randn(8, 2 * D, device=device, dtype=dtype) * 3
        ref = (act(gu[:, :D]) * gu[:, D:]).double()
        err = ((glu_act_mul(gu, D, kind).double() - ref).norm() / ref.norm()).item()
    except Exception:
        return None
    return kind if err < 1e-2 else None


def _fuse_gate_up(mlp: nn.Module, config: AccelerateConfig) -> bool:
    """Replace a GLU MLP's ``gate_proj`` and ``up_proj`` (2:4 ``NM24Linear`` of one
    orientation, same shape, no bias, MLP with an ``act_fn``) by one ``NM24Linear`` of the
    stacked ``[gate; up]`` matrix (``mlp.dass_gate_up``), and its forward by
    ``down(act(g) * u)`` with the activation and product in one kernel.

    Why: one product of twice the rows runs closer to the hardware's rate than two (a
    1-token kernel's fixed cost is paid once; cuSPARSELt's larger GEMM is more efficient),
    and the fused activation moves 40% fewer bytes. Stacking rows keeps every 2:4 group in
    both orientations (D is a multiple of 4). The new forward is checked against the old
    one on a random input; on any mismatch nothing is changed."""
    g, u = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    down, act = getattr(mlp, "down_proj", None), getattr(mlp, "act_fn", None)
    if not (isinstance(g, NM24Linear) and isinstance(u, NM24Linear) and isinstance(down, nn.Module) and callable(act)):
        return False
    if (g.orientation != u.orientation or g.in_features != u.in_features or g.out_features != u.out_features
            or g.bias is not None or u.bias is not None or g.values.dtype != u.values.dtype):
        return False
    d, D = g.in_features, g.out_features
    dev, dtype = g.values.device, g.values.dtype
    with torch.no_grad():
        fused = NM24Linear(torch.cat([g.dense_weight(), u.dense_weight()]), None, g.orientation, config)
    kind = _fused_act(act, D, dev, dtype)
    from dass.infer.kernels import glu_act_mul  # imported here, not per call: the forward is host-bound at 1 token

    def forward(x: torch.Tensor) -> torch.Tensor:
        gu = fused(x)
        if kind is not None:
            h = glu_act_mul(gu.reshape(-1, 2 * D), D, kind).view(*x.shape[:-1], D)
        else:
            h = act(gu[..., :D]) * gu[..., D:]
        return down(h)

    with torch.no_grad():
        x = torch.randn(5, d, device=dev, dtype=dtype)
        ref, got = mlp(x).double(), forward(x).double()
        if not ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item() < 2e-2:
            return False
    del mlp.gate_proj, mlp.up_proj
    mlp.dass_gate_up = fused
    mlp.forward = forward
    mlp._dass_fused_act = kind
    return True


# --------------------------------------------------------------------------- whole-MLP graphs


def _graph_mlp(mlp: nn.Module, config: AccelerateConfig) -> bool:
    if getattr(mlp, "_dass_graphed", False):
        return True
    try:
        params = [p for p in inspect.signature(mlp.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    if len(params) != 1:
        return False
    d_in = (mlp.dass_gate_up if hasattr(mlp, "dass_gate_up") else mlp.gate_proj).in_features
    d_out = mlp.down_proj.out_features
    orig = mlp.forward
    cache = _GraphCache(lambda x2: orig(x2), d_in, d_out, config.max_graphs_per_module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, d_in)
        T = x2.shape[0]
        if T == 0 or T > config.graph_max_tokens or not x.is_cuda or _capturing():
            return orig(x)
        with torch.no_grad():
            return cache(x2).view(*x.shape[:-1], d_out)

    mlp._dass_orig_forward = orig
    mlp._dass_graph_cache = cache
    mlp.forward = forward
    mlp._dass_graphed = True
    return True


# --------------------------------------------------------------------------- accelerate()


def _matrices(manifest):
    if manifest is None:
        return None
    if isinstance(manifest, Mapping) and isinstance(manifest.get("matrices"), Mapping):
        return manifest["matrices"]
    return manifest


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def accelerate(
    model: nn.Module,
    manifest: Mapping[str, Any] | None = None,
    *,
    min_tokens: int | None = None,
    config: AccelerateConfig | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Swap every 2:4 ``nn.Linear`` of ``model`` (in place) for an :class:`NM24Linear`.

    ``manifest`` (the ``dass.json`` dict, or its ``"matrices"``) names the 2:4 matrices and
    their orientation; without it every Linear weight is checked group by group and
    accelerated when it is 2:4 along its input (preferred) or output dimension. Weights
    must be fp16/bf16 on a CUDA GPU of compute capability >= 8.0, otherwise
    :class:`AccelerationError`. Matrices that cannot be accelerated (other patterns,
    fp32, partial-tensor manifest entries) stay dense and are listed under ``"skipped"``.
    ``min_tokens`` overrides the token count from which cuSPARSELt is used (below it the
    Triton kernel runs). With ``strict``, a manifest entry whose weights are not 2:4 in
    the stated orientation raises :class:`AccelerationError`.

    GLU MLPs (``gate_proj``/``up_proj``/``down_proj`` and an ``act_fn``, as in LLaMA, Mistral,
    Qwen2, Gemma) whose gate and up were both replaced get them stacked into one module,
    ``mlp.dass_gate_up``, with the activation fused (``config.fuse_gate_up``).

    Returns ``{"replaced": {name: orientation}, "skipped": {name: reason},
    "fused_gate_up": [mlp names], "graphed_mlps": [...]}``.
    """
    config = config or AccelerateConfig()
    if min_tokens is not None:
        config.triton_max_tokens = dict(config.triton_max_tokens, input=int(min_tokens) - 1)
    check_device()
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    for d in devices:
        if d.type != "cuda":
            raise AccelerationError(f"the model has tensors on {d}: move it to the GPU (model.cuda()) before accelerate()")
        check_device(d)
    mats = _matrices(manifest)
    replaced: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        pname = f"{name}.weight"
        W = mod.weight
        orientation = None
        if mats is not None:
            entry = mats.get(pname)
            if entry is None:
                continue
            if "rows" in entry or "expert" in entry:
                skipped[name] = "partial-tensor manifest entry (fused or expert weight): kept dense"
                continue
            nmo = parse_entry(entry)
            if nmo is None or nmo[:2] != (2, 4):
                skipped[name] = f"pattern {entry.get('pattern')!r} is not 2:4: kept dense"
                continue
            orientation = nmo[2]
            if orientation is None:
                orientation = detect_orientation(W.detach(), 2, 4)
            if orientation is None or not is_nm(W.detach(), 2, 4, orientation):
                msg = f"{pname}: manifest says 2:4 ({nmo[2]}) but the weights are not 2:4 along that dimension"
                if strict:
                    raise AccelerationError(msg)
                skipped[name] = msg
                continue
        else:
            orientation = detect_orientation(W.detach(), 2, 4)
            if orientation is None:
                continue
        if W.dtype not in (torch.float16, torch.bfloat16):
            skipped[name] = f"dtype {W.dtype} not accelerated (cast the model to bf16/fp16): kept dense"
            continue
        N, K = W.shape
        if N % 64 or K % 64:
            skipped[name] = f"shape {[N, K]} is not a multiple of 64: kept dense"
            continue
        if orientation == "output" and not _triton_ok():
            skipped[name] = "output orientation needs triton, which is not installed: kept dense"
            continue
        new = NM24Linear(W, mod.bias, orientation, config)
        _set_child(model, name, new)
        replaced[name] = orientation
    fused: list[str] = []
    if config.fuse_gate_up:
        for name, mod in list(model.named_modules()):
            if _fuse_gate_up(mod, config):
                fused.append(name)
    graphed: list[str] = []
    if config.graphs and config.graph_mlp:
        for name, mod in model.named_modules():
            kids = [getattr(mod, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
            if hasattr(mod, "dass_gate_up"):
                kids = [mod.dass_gate_up, mod.down_proj]
            if all(isinstance(k, nn.Module) for k in kids) and any(isinstance(k, NM24Linear) for k in kids):
                if _graph_mlp(mod, config):
                    graphed.append(name)
    return {"replaced": replaced, "skipped": skipped, "fused_gate_up": fused, "graphed_mlps": graphed}
