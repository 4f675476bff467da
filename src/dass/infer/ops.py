"""The accelerated modules as PyTorch custom operators, so an accelerated model runs under
``torch.compile(..., fullgraph=True)`` (and ``mode="reduce-overhead"``, CUDA-graph capture)
without graph breaks.

Why operators: Dynamo cannot trace an :class:`~dass.infer.nm24_linear.NM24Linear`'s per-call
machinery (its dict of per-token-count runners, the dispatcher's measurements, Triton's
launcher, its own CUDA graphs), and must not: inside a compiled graph the module is one
opaque product. Each operator takes only tensors and ints (no ``nn.Module``): the module is
named by an int handle into a registry of weak references, and the real implementation
calls the module's existing eager path; the fake implementation (for tracing) returns an
empty tensor of the right shape and dtype.

- ``dass::nm24_linear(x, handle, out_features)``: ``NM24Linear`` forward;
- ``dass::nm24_glu(x, handle, D, act)``: a stacked [gate; up] ``NM24Linear``'s ``act(g) * u``
  (:meth:`~dass.infer.nm24_linear.NM24Linear.glu`: the kernel's GLU epilogue where tuned);
- ``dass::glu_act_mul(gu, D, act)``: the fused GLU activation (:func:`dass.infer.kernels.glu_act_mul`).

The operators are used only while compiling (``torch.compiler.is_compiling()``): eager calls
keep their old path and host cost. The real implementations run under
:class:`dass.infer.graphs.raw_mode`, so the modules neither capture nor replay CUDA graphs of
their own inside a compiled region (the compiler's CUDA graphs contain them instead).

The dispatcher decides a token bucket's path on first use by timing it; that must not happen
inside a compiled region (timing uses CUDA graphs, and the compiler's warm-up and capture
run on their own stream and memory pool). :func:`prepare_compile` registers the modules and
makes those decisions for the token counts the compiled model will see, before compiling.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["nm24_linear", "nm24_glu", "glu_act_mul", "register", "module_of", "prepare_compile", "use_ops"]

_LOCK = threading.Lock()
_REGISTRY: dict[int, "weakref.ref[nn.Module]"] = {}
_NEXT = itertools.count(1)
HANDLE_ATTR = "_dass_handle"


def register(mod: nn.Module) -> int:
    """The handle of ``mod`` (given once, kept on the module as ``_dass_handle``)."""
    h = mod.__dict__.get(HANDLE_ATTR)
    if h is not None and h in _REGISTRY and _REGISTRY[h]() is mod:
        return h
    with _LOCK:
        h = next(_NEXT)
        _REGISTRY[h] = weakref.ref(mod, lambda _r, h=h: _REGISTRY.pop(h, None))
    mod.__dict__[HANDLE_ATTR] = h
    return h


def module_of(handle: int) -> nn.Module:
    ref = _REGISTRY.get(handle)
    mod = ref() if ref is not None else None
    if mod is None:
        raise RuntimeError(f"dass: no live accelerated module has handle {handle} (was the model deleted?)")
    return mod


def use_ops() -> bool:
    """True while Dynamo traces (then modules call the operators instead of their eager path)."""
    return torch.compiler.is_compiling()


@torch.library.custom_op("dass::nm24_linear", mutates_args=())
def nm24_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """``x @ W.T + b`` of the NM24Linear with ``handle`` (its eager path, no graphs of its own)."""
    from dass.infer.graphs import raw_mode

    mod = module_of(handle)
    with raw_mode():  # outside Dynamo: the module's eager path
        return mod.forward(x)


@nm24_linear.register_fake
def _nm24_linear_fake(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("dass::nm24_glu", mutates_args=())
def nm24_glu(x: torch.Tensor, handle: int, D: int, act: str) -> torch.Tensor:
    """``act(g) * u`` of the stacked [gate; up] NM24Linear with ``handle`` (:meth:`NM24Linear.glu`)."""
    from dass.infer.graphs import raw_mode

    mod = module_of(handle)
    with raw_mode():
        return mod.glu(x)


@nm24_glu.register_fake
def _nm24_glu_fake(x: torch.Tensor, handle: int, D: int, act: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], D)


@torch.library.custom_op("dass::glu_act_mul", mutates_args=())
def glu_act_mul(gu: torch.Tensor, D: int, act: str) -> torch.Tensor:
    """``act(gu[:, :D]) * gu[:, D:]`` in one Triton pass (see :func:`dass.infer.kernels.glu_act_mul`)."""
    from dass.infer.kernels import glu_act_mul as kernel

    return kernel(gu.contiguous(), D, act)


@glu_act_mul.register_fake
def _glu_act_mul_fake(gu: torch.Tensor, D: int, act: str) -> torch.Tensor:
    return gu.new_empty(gu.shape[0], D)


def prepare_compile(model: nn.Module, tokens: Iterable[int] = (), run: bool = True) -> dict[str, object]:
    """Get an accelerated ``model`` ready for ``torch.compile``: give every ``NM24Linear`` its
    handle, decide the path of each of ``tokens`` (the token counts per call the compiled
    model will see: the batch size for decoding steps) and, with ``run``, call each module
    once at each count (compiles its kernel, fills cuSPARSELt's algorithm cache), all outside
    any compiled region. Returns ``{"modules": n, "paths": {T: {path: count}}}``."""
    from dass.infer.nm24_linear import NM24Linear

    mods = [m for m in model.modules() if isinstance(m, NM24Linear)]
    for m in mods:
        register(m)
    paths: dict[int, dict[str, int]] = {}
    with torch.no_grad():
        for T in sorted({int(t) for t in tokens if int(t) > 0}):
            count: dict[str, int] = {}
            for m in mods:
                p = m.decision(T).path
                count[p] = count.get(p, 0) + 1
                if run:
                    m(torch.zeros(T, m.in_features, dtype=m.weight_dtype, device=m.weight_device))
            paths[T] = count
    if mods and mods[0].weight_device.type == "cuda":
        torch.cuda.synchronize(mods[0].weight_device)
    return {"modules": len(mods), "paths": paths}
