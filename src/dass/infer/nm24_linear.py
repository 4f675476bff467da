"""``NM24Linear``: a 2:4 sparse replacement for ``nn.Linear`` (bf16/fp16, CUDA, inference).

It holds the matrix compressed (kernel-layout ``values`` + 4-bit ``meta``: 56% of the dense
bytes; for the input orientation also cuSPARSELt's compressed copy; with
``AccelerateConfig.keep_dense`` the dense weight as well) and runs, per token bucket, the
path :func:`dass.infer.dispatch.decide` measured fastest.

Host work per call is kept small on purpose (eager ``generate()`` is bound by it): the first
call with T tokens builds a runner for exactly that T (the decision, the bound kernel
launcher, the graph choice) and later calls with T do one dict lookup and call it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dass.infer.config import AccelerateConfig
from dass.infer.device import cslt_search, cslt_supported, interpreting, triton_ok
from dass.infer.dispatch import Decision, bucket, decide
from dass.infer.graphs import GraphCache, capturing, graph_bucket, on_clear

__all__ = ["NM24Linear"]

_DEFAULT = AccelerateConfig()
# dass.infer.cuda.CHUNKED_MAX_TOKENS (not imported here: no import cost); past 128 tokens the
# CUDA path runs in slices and is a measured candidate only, never the static choice
_CUDA_MAX_TOKENS = 512
_CUDA_STATIC_MAX_TOKENS = 128
_ALG_CACHE: dict[tuple, int] = {}
on_clear(_ALG_CACHE.clear)


class NM24Linear(nn.Module):
    """A 2:4 sparse ``nn.Linear`` replacement (bf16/fp16, CUDA, inference only).

    ``dense_weight()`` gives back the exact dense matrix; ``decision(T)`` says which path a
    call with T tokens takes and why."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, orientation: str,
                 config: AccelerateConfig | None = None, keep: torch.Tensor | None = None):
        super().__init__()
        if orientation not in ("input", "output"):
            raise ValueError(f"orientation must be 'input' or 'output', got {orientation!r}")
        if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16) or not (weight.is_cuda or interpreting()):
            raise ValueError("NM24Linear needs a 2-D fp16/bf16 CUDA weight")
        N, K = weight.shape
        if (orientation == "output" and N % 4) or (orientation == "input" and K % 4):
            raise ValueError(f"shape {[N, K]} cannot hold 2:4 groups along the {orientation} dim")
        from dass.infer.kernels.layout import to_kernel_layout

        self.in_features, self.out_features, self.orientation = K, N, orientation
        self.config = config or _DEFAULT
        with torch.no_grad():
            w = weight.detach().contiguous()
            self.register_buffer("values", None)
            self.register_buffer("meta", None)
            self.register_buffer("cslt", None)
            self.register_buffer("dense", w if self.config.keep_dense else None)
            self.register_buffer("cu_values", None)
            self.register_buffer("cu_meta", None)
            self.cuda_reason = self._pack_cuda(w, keep)
            # one_copy: the CUDA layout alone serves every token count (module docstring)
            alone = self.cu_values is not None and self.config.one_copy
            if not alone:
                self.values, self.meta = to_kernel_layout(w, orientation, keep)
                if orientation == "input" and N % 64 == 0 and K % 64 == 0 and cslt_supported(w.device):
                    self.cslt = torch._cslt_compress(w)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._triton = triton_ok() and self.values is not None
        self._dtype = w.dtype
        self._runners: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._glu_runners: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._launchers: dict[tuple, Any] = {}
        #: the GLU activation when this is a stacked [gate; up] matrix (dass.infer.mlp_fusion):
        #: then the tuner also times the kernel's GLU epilogue and :meth:`glu` may run it
        self.glu_act: str | None = None
        self._graph = GraphCache(self._plain, K, N, self.config.max_graphs_per_module)

    def _pack_cuda(self, w: torch.Tensor, keep: torch.Tensor | None) -> str | None:
        """Pack ``w`` for the CUDA kernels (1-128 tokens); the reason when they cannot run it."""
        if not self.config.cuda_kernels:
            return "AccelerateConfig.cuda_kernels is off"
        if not w.is_cuda:
            return "weight not on a CUDA device"
        from dass.infer import cuda as cu
        from dass.infer.cuda.layout import check_shape, pack

        why = check_shape(self.out_features, self.in_features, self.orientation)
        if why:
            return why
        if not cu.available():
            return cu.unavailable_reason()
        cv, cm = pack(w, self.orientation, keep)
        self.cu_values, self.cu_meta = cv, cm
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 along {self.orientation}, "
                f"cuSPARSELt={'yes' if self.cslt is not None else 'no'}, dense copy={'yes' if self.dense is not None else 'no'}, "
                f"bias={self.bias is not None}")

    # ------------------------------------------------------------------ paths
    def candidates(self, T: int) -> list[str]:
        """Paths that can run a call with T tokens here."""
        c = []
        if self.cu_values is not None and T <= _CUDA_MAX_TOKENS:
            c.append("cuda")
        if self._triton and self.values is not None and T <= self.config.autotune_max_triton_tokens:
            c.append("triton")
        if self.cslt is not None:
            c.append("cslt")
        c.append("decompress")
        if self.dense is not None:
            c.append("dense")
        return c

    def static_path(self, T: int) -> str:
        """The path without measurements (``AccelerateConfig(autotune=False)``)."""
        cfg = self.config
        if self.cu_values is not None and T <= _CUDA_STATIC_MAX_TOKENS:
            return "cuda"
        if self._triton and self.values is not None and T <= cfg.triton_max_tokens[self.orientation]:
            return "triton"
        if self.cslt is not None:
            band = cfg.dense_band
            if not (band is not None and band[0] <= T <= band[1]):
                return "cslt"
        return "dense" if self.dense is not None else "decompress"

    def decision(self, T: int) -> Decision:
        """The path (and why) of a call with T tokens; measures it on first use."""
        return decide(self, T)

    def path_for(self, T: int) -> str:
        return self.decision(T).path

    # ------------------------------------------------------------------ operands
    def operands(self) -> tuple:
        return (self.values, self.meta, self.cslt, self.dense, self.cu_values, self.cu_meta)

    def operand_copy(self, path: str) -> tuple:
        """A copy of the operands ``path`` reads (timing cycles over copies to defeat L2)."""
        need = {"triton": (0, 1), "decompress": (0, 1) if self.values is not None else (4, 5), "cslt": (2,),
                "dense": (3,), "cuda": (4, 5)}[path]
        return tuple(t.clone() if (i in need and t is not None) else t for i, t in enumerate(self.operands()))

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def weight_device(self) -> torch.device:
        """Where the weight lives (whichever copies this module keeps)."""
        for t in (self.cu_values, self.values, self.dense):
            if t is not None:
                return t.device
        raise RuntimeError("NM24Linear holds no weight")

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor this module keeps (for memory accounting)."""
        return [t for t in (self.values, self.meta, self.cslt, self.dense, self.cu_values, self.cu_meta, self.bias)
                if t is not None]

    def dense_weight(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        from dass.infer.kernels import nm24_decompress
        from dass.infer.kernels.layout import from_kernel_layout

        if self.values is None:  # one_copy: the CUDA layout only
            from dass.infer import cuda as cu

            return cu.unpack(self.cu_values, self.cu_meta, self.out_features, self.in_features, self.orientation,
                             self._dtype)

        if self._triton:
            return nm24_decompress(self.values, self.meta, self.out_features, self.in_features, self.orientation)
        return from_kernel_layout(self.values, self.meta, (self.out_features, self.in_features), self.orientation)

    def _apply(self, fn, *args, **kwargs):
        # moved or cast: runners and launchers hold the old buffers
        self._runners.clear()
        self._glu_runners.clear()
        self._launchers.clear()
        return super()._apply(fn, *args, **kwargs)

    def drop_dense(self) -> None:
        """Free the dense copy (``keep_dense``) and forget runners that used it."""
        self.dense = None
        self._runners.clear()
        self._glu_runners.clear()

    # ------------------------------------------------------------------ running
    def _launcher(self, T: int, config: dict | None):
        from dass.infer.kernels import Launcher, default_config

        key = (bucket(T), None if config is None else tuple(sorted(config.items())))
        ln = self._launchers.get(key)
        if ln is None:
            cfg = config or default_config(self.orientation, T, self.out_features, self.in_features)
            ln = self._launchers[key] = Launcher(self.out_features, self.in_features, self.orientation, cfg, T)
        return ln

    def _cslt_mm(self, x2: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        T = x2.shape[0]
        pad = (-T) % 8  # cuSPARSELt refuses fewer than 8 rows
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        alg = 0
        cfg = self.config
        if cfg.cslt_alg_search and T >= cfg.cslt_search_min_tokens and x2.dtype == torch.bfloat16:
            key = (self.out_features, self.in_features, graph_bucket(T), x2.dtype, x2.device.index)
            found = _ALG_CACHE.get(key)
            if found is None and not torch.cuda.is_current_stream_capturing():
                found = _ALG_CACHE[key] = cslt_search(packed, x2.t())
            alg = found or 0
        y = torch._cslt_sparse_mm(packed, x2.t(), transpose_result=True, alg_id=alg)
        return y[:T] if pad else y

    def run_path(self, x2: torch.Tensor, path: str, config: dict | None = None, ops: tuple | None = None) -> torch.Tensor:
        """``x2 @ W.T + bias`` by ``path`` (on ``ops``, a copy of the operands, when given)."""
        values, meta, packed, dense, cu_values, cu_meta = ops or self.operands()
        if path == "cuda":
            from dass.infer import cuda as cu

            cfg = config or cu.default_config(self.orientation, x2.shape[0], self.out_features, self.in_features)
            return cu.mm(x2.contiguous(), cu_values, cu_meta, self.bias, self.out_features, self.orientation, cfg)
        if path == "triton":
            y = self._launcher(x2.shape[0], config)(x2.contiguous(), values, meta)
        elif path == "cslt":
            y = self._cslt_mm(x2, packed)
        elif path == "dense":
            return F.linear(x2, dense, self.bias)
        else:
            from dass.infer.kernels import nm24_decompress

            if values is None:
                from dass.infer import cuda as cu

                w = cu.unpack(cu_values, cu_meta, self.out_features, self.in_features, self.orientation, self._dtype)
            elif self._triton:
                w = nm24_decompress(values, meta, self.out_features, self.in_features, self.orientation)
            else:
                w = self.dense_weight()
            return F.linear(x2, w, self.bias)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _plain(self, x2: torch.Tensor) -> torch.Tensor:
        """The product without graphs (what graphs capture)."""
        d = self.decision(x2.shape[0])
        return self.run_path(x2, d.path, d.config)

    def _make_runner(self, T: int) -> Callable[[torch.Tensor], torch.Tensor]:
        d = self.decision(T)
        path, config = d.path, d.config
        cfg = self.config
        bias = self.bias
        if path == "triton":
            ln = self._launcher(T, config)
            values, meta = self.values, self.meta

            def plain(x2):
                y = ln(x2 if x2.is_contiguous() else x2.contiguous(), values, meta)
                return y if bias is None else y.add_(bias)
        elif path == "cuda":
            from dass.infer import cuda as cu

            c = config or cu.default_config(self.orientation, T, self.out_features, self.in_features)
            cu_run = cu.runner(self.cu_values, self.cu_meta, bias, self.out_features, self.orientation, c)

            def plain(x2):
                return cu_run(x2 if x2.is_contiguous() else x2.contiguous())
        else:
            def plain(x2):
                return self.run_path(x2, path, config)
        run = plain
        if cfg.graphs and path in cfg.graph_paths and T <= cfg.graph_max_tokens:
            graph = self._graph

            def run(x2):
                return plain(x2) if capturing() else graph(x2)
        self._keep(self._runners, T, run, d)
        return run

    def _keep(self, runners: dict, T: int, run: Callable[[torch.Tensor], torch.Tensor], d) -> None:
        """Remember ``run`` for T tokens, unless its decision is a stand-in made while capturing
        (static with autotune on: the measured one replaces it later)."""
        if d.source != "static" or not self.config.autotune:
            if len(runners) > 256:
                runners.clear()
            runners[T] = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque operator for Dynamo (dass.infer.ops); ~0.1 us eagerly
            return self._compiled_forward(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self._dtype:
            raise TypeError(f"NM24Linear holds {self._dtype} weights, got {x2.dtype} input")
        T = x2.shape[0]
        if T == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        run = self._runners.get(T)
        if run is None:
            run = self._make_runner(T)
            self._register_op()
        return run(x2).view(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ GLU
    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """``act(g) * u`` of ``[g | u] = self(x)`` for a stacked [gate; up] matrix (``glu_act``
        set): one launch where the tuner found the register kernel's GLU epilogue fastest,
        else the product and then the Triton activation kernel."""
        act = self.glu_act
        if act is None:
            raise RuntimeError("NM24Linear.glu needs glu_act (a stacked [gate; up] matrix)")
        D = self.out_features // 2
        if torch.compiler.is_compiling():
            return torch.ops.dass.nm24_glu(x, self._handle(), D, act)
        x2 = x.reshape(-1, self.in_features)
        T = x2.shape[0]
        if T == 0:
            return x.new_empty(*x.shape[:-1], D)
        run = self._glu_runners.get(T)
        if run is None:
            run = self._make_glu_runner(T, act)
            self._register_op()
        return run(x2).view(*x.shape[:-1], D)

    def glu_fused(self, T: int) -> bool:
        """Whether a call of :meth:`glu` with T tokens runs the kernel's GLU epilogue."""
        d = self.decision(T)
        return d.path == "cuda" and isinstance(d.config, dict) and "glu" in d.config and T <= _CUDA_STATIC_MAX_TOKENS

    def _make_glu_runner(self, T: int, act: str) -> Callable[[torch.Tensor], torch.Tensor]:
        from dass.infer.kernels import glu_act_mul

        d = self.decision(T)
        D = self.out_features // 2
        if self.glu_fused(T):
            from dass.infer import cuda as cu

            cu_run = cu.glu_runner(self.cu_values, self.cu_meta, self.bias, self.out_features, self.orientation,
                                   d.config["glu"], act)

            def run(x2):
                return cu_run(x2 if x2.is_contiguous() else x2.contiguous())
        else:
            def run(x2):
                return glu_act_mul(self.forward(x2), D, act)
        self._keep(self._glu_runners, T, run, d)
        return run

    # ------------------------------------------------------------------ torch.compile
    def _register_op(self) -> None:
        """Give this module its handle for the ``dass::nm24_linear`` operator (dass.infer.ops),
        so a model called eagerly once can be compiled; done on a runner miss, not per call."""
        from dass.infer import ops

        ops.register(self)  # checks that a handle copied along with the module (deepcopy) is its own

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What Dynamo traces: the ``dass::nm24_linear`` operator (its real implementation is
        :meth:`forward` run eagerly without graphs of its own; its fake one gives the shape)."""
        h = self._handle()
        if x.dtype != self._dtype:
            raise TypeError(f"NM24Linear holds {self._dtype} weights, got {x.dtype} input")
        return torch.ops.dass.nm24_linear(x, h, self.out_features)

    def _handle(self) -> int:
        """This module's operator handle (given by prepare_compile or a first eager call)."""
        h = self.__dict__.get("_dass_handle")
        if h is None:
            raise RuntimeError("NM24Linear under torch.compile needs a handle: call "
                               "dass.infer.ops.prepare_compile(model, tokens) (or run the model once) before compiling")
        return h
