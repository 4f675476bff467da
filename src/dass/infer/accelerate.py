"""Run 2:4 sparse models on the GPU: ``accelerate(model)`` swaps 2:4 ``nn.Linear`` weights
for compressed :class:`~dass.infer.nm24_linear.NM24Linear` modules, stacks each GLU's gate and
up, and graph-captures the GLU MLP blocks.

This module is the model walk; the pieces live beside it:

- :mod:`dass.infer.nm24_linear` -- the module and its paths;
- :mod:`dass.infer.dispatch` -- which path runs each (shape, token bucket), measured, logged
  (:func:`tuning_log`) and remembered on disk (:mod:`dass.infer.tuning_cache`);
- :mod:`dass.infer.mlp_fusion` -- stacked gate/up with a fused activation, whole-MLP graphs;
- :mod:`dass.infer.attn_fusion` -- stacked q/k/v (``config.fuse_qkv``);
- :mod:`dass.infer.graphs` -- CUDA-graph capture and replay;
- :mod:`dass.infer.device` -- device checks, cuSPARSELt;
- :mod:`dass.infer.config` -- :class:`AccelerateConfig`.

Inference only (no autograd). Measured speeds: docs/speed.md.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from dass.arch import glu_children, qkv_children
from dass.infer.attn_fusion import stack_qkv
from dass.infer.config import AccelerateConfig
from dass.infer.device import (
    AccelerationError,
    check_device,
    cslt_search,
    cslt_supported,
    triton_ok,
)
from dass.infer.dispatch import clear_decisions, decide, tuning_log
from dass.infer.graphs import clear_graphs
from dass.infer.mlp_fusion import fuse_gate_up, graph_mlp
from dass.infer.nm24_linear import NM24Linear
from dass.io.nm_codec import detect_orientation, is_nm
from dass.io.sparse_format import parse_entry

__all__ = [
    "AccelerationError",
    "AccelerateConfig",
    "NM24Linear",
    "accelerate",
    "check_device",
    "clear_graphs",
    "clear_decisions",
    "tuning_log",
    "cslt_supported",
    "cslt_search",
]


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


def _orientation(name: str, W: torch.Tensor, mats, strict: bool, skipped: dict[str, str]) -> str | None:
    """The 2:4 orientation of ``W`` (from the manifest, or detected), None to leave it alone."""
    if mats is None:
        return detect_orientation(W.detach(), 2, 4)
    pname = f"{name}.weight"
    entry = mats.get(pname)
    if entry is None:
        return None
    if "rows" in entry or "expert" in entry:
        skipped[name] = "partial-tensor manifest entry (fused or expert weight): kept dense"
        return None
    nmo = parse_entry(entry)
    if nmo is None or nmo[:2] != (2, 4):
        skipped[name] = f"pattern {entry.get('pattern')!r} is not 2:4: kept dense"
        return None
    orientation = nmo[2] or detect_orientation(W.detach(), 2, 4)
    if orientation is None or not is_nm(W.detach(), 2, 4, orientation):
        msg = f"{pname}: manifest says 2:4 ({nmo[2]}) but the weights are not 2:4 along that dimension"
        if strict:
            raise AccelerationError(msg)
        skipped[name] = msg
        return None
    return orientation


def _check_model_device(model: nn.Module) -> None:
    if check_device().type == "cpu":  # Triton's interpreter (dass.infer.device.interpreting)
        return
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    for d in devices:
        if d.type != "cuda":
            raise AccelerationError(f"the model has tensors on {d}: move it to the GPU (model.cuda()) before accelerate()")
        check_device(d)


def accelerate(
    model: nn.Module,
    manifest: Mapping[str, Any] | None = None,
    *,
    min_tokens: int | None = None,
    config: AccelerateConfig | None = None,
    strict: bool = True,
    tune_tokens: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Swap every 2:4 ``nn.Linear`` of ``model`` (in place) for an :class:`NM24Linear`.

    ``manifest`` (the ``dass.json`` dict, or its ``"matrices"``) names the 2:4 matrices and
    their orientation; without it every Linear weight is checked group by group and
    accelerated when it is 2:4 along its input (preferred) or output dimension. Weights
    must be fp16/bf16 on a CUDA GPU of compute capability >= 8.0, otherwise
    :class:`AccelerationError`. Matrices that cannot be accelerated (other patterns,
    fp32, partial-tensor manifest entries) stay dense and are listed under ``"skipped"``.
    ``min_tokens`` sets the static rule's token count from which cuSPARSELt is used. With
    ``strict``, a manifest entry whose weights are not 2:4 in the stated orientation raises
    :class:`AccelerationError`.

    GLU MLPs (found by :func:`dass.arch.glu_children`) whose gate and up were both replaced
    get them stacked into one module, ``mlp.dass_gate_up``, with the activation fused
    (``config.fuse_gate_up``), and are replayed from CUDA graphs (``config.graph_mlp``).

    ``tune_tokens``: token counts whose paths are measured now rather than on first use
    (then, with ``config.keep_dense``, dense copies that no tuned count chose are freed).

    Returns ``{"replaced": {name: orientation}, "skipped": {name: reason},
    "fused_gate_up": [mlp names], "graphed_mlps": [...], "fused_qkv": [attention names],
    "tuned": {...}, "dense_kept": [...]}``. With ``config.fuse_qkv`` (off by default) an
    attention's 2:4 q, k and v are stacked into one product (:mod:`dass.infer.attn_fusion`).
    """
    config = config or AccelerateConfig()
    if min_tokens is not None:
        config.triton_max_tokens = dict(config.triton_max_tokens, input=int(min_tokens) - 1)
    _check_model_device(model)
    mats = _matrices(manifest)
    glus = {name: kids for name, mod in model.named_modules() if (kids := glu_children(mod)) is not None}
    qkvs = {name: kids for name, mod in model.named_modules() if (kids := qkv_children(mod)) is not None}
    replaced: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        W = mod.weight
        orientation = _orientation(name, W, mats, strict, skipped)
        if orientation is None:
            continue
        if W.dtype not in (torch.float16, torch.bfloat16):
            skipped[name] = f"dtype {W.dtype} not accelerated (cast the model to bf16/fp16): kept dense"
            continue
        N, K = W.shape
        if N % 64 or K % 64:
            skipped[name] = f"shape {[N, K]} is not a multiple of 64: kept dense"
            continue
        if orientation == "output" and not triton_ok():
            skipped[name] = "output orientation needs triton, which is not installed: kept dense"
            continue
        _set_child(model, name, NM24Linear(W, mod.bias, orientation, config))
        replaced[name] = orientation
    fused: list[str] = []
    graphed: list[str] = []
    for name, kids in glus.items():
        mlp = model.get_submodule(name) if name else model
        if config.fuse_gate_up and fuse_gate_up(mlp, kids, config):
            fused.append(name)
        if not (config.graphs and config.graph_mlp):
            continue
        first = getattr(mlp, "dass_gate_up", None) or getattr(mlp, kids.gate)
        down = getattr(mlp, kids.down)
        kids_now = [first, down] + ([] if hasattr(mlp, "dass_gate_up") else [getattr(mlp, kids.up)])
        if any(isinstance(k, NM24Linear) for k in kids_now) and graph_mlp(mlp, first.in_features, down.out_features, config):
            graphed.append(name)
    fused_qkv = [name for name, kids in qkvs.items()
                 if config.fuse_qkv and _fuse_qkv(model.get_submodule(name) if name else model, kids, config)]
    tuned, kept = _pretune(model, tune_tokens, config)
    return {"replaced": replaced, "skipped": skipped, "fused_gate_up": fused, "graphed_mlps": graphed,
            "fused_qkv": fused_qkv, "tuned": tuned, "dense_kept": kept}


def _fuse_qkv(attn: nn.Module, names: tuple[str, str, str], config: AccelerateConfig) -> bool:
    """Stack an attention's three 2:4 projections into one ``NM24Linear`` (all three
    replaced, one orientation and dtype, biases on all or none)."""
    mods = [getattr(attn, n, None) for n in names]
    if not all(isinstance(m, NM24Linear) for m in mods):
        return False
    m0 = mods[0]
    if (any(m.orientation != m0.orientation or m.in_features != m0.in_features or m.weight_dtype != m0.weight_dtype
            for m in mods) or len({m.bias is None for m in mods}) != 1):
        return False
    with torch.no_grad():
        bias = None if m0.bias is None else torch.cat([m.bias for m in mods])
        fused = NM24Linear(torch.cat([m.dense_weight() for m in mods]), bias, m0.orientation, config)
    return stack_qkv(attn, names, fused)


def _pretune(model: nn.Module, tune_tokens: Iterable[int] | None, config: AccelerateConfig):
    """Measure the paths of ``tune_tokens`` now; free dense copies nobody chose."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, NM24Linear)}
    tuned: dict[str, dict[int, str]] = {}
    if tune_tokens:
        for n, m in mods.items():
            tuned[n] = {int(T): decide(m, int(T)).path for T in tune_tokens}
        if config.keep_dense:
            for n, m in mods.items():
                if "dense" not in tuned[n].values():
                    m.drop_dense()
    return tuned, [n for n, m in mods.items() if m.dense is not None]
