"""Finding a model's parts by name: the decoder layers, a layer's MLP and attention
children, a GLU MLP's gate/up/down linears and activation, the MLP branch's norms, and
which weights are GPT-2-style ``Conv1D`` (stored ``[in, out]``).

These lookups are what inference code and the run use without planning a layer; the
names come from :mod:`dass.arch.names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dass.arch.names import ATTN_NAMES, GLU_TRIPLES, LAYER_LIST_PATHS, MLP_FORMS, MLP_NAMES, SHARED_QKV
from dass.errors import UserValueError


class ArchitectureError(UserValueError):
    """The model's structure is not one the adapter can walk (or not a GLU under DaSS)."""


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers and their dotted path (e.g. ``model.layers``)."""
    for path in LAYER_LIST_PATHS:
        mod = _get_path(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    raise ArchitectureError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for a ModuleList at "
        + ", ".join(LAYER_LIST_PATHS)
    )


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        sub = getattr(module, n, None)
        if isinstance(sub, nn.Module):
            return n, sub
    return None


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without it
        return None
    return Conv1D


def _is_conv1d(m: object) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    conv = _conv1d_type()
    return conv is not None and isinstance(m, conv)


def _in_features(m: nn.Module) -> int:
    return m.weight.shape[0] if _is_conv1d(m) else m.in_features


def transposed_weights(model: nn.Module) -> set[str]:
    """Names of the weights stored ``[in, out]`` (Conv1D), whose manifest entries say so."""
    return {f"{name}.weight" for name, m in model.named_modules() if _is_conv1d(m)}


@dataclass(frozen=True)
class MLPBranch:
    """A decoder layer's MLP branch ``h + post(mlp(pre(h)))``: ``pre``/``post`` are norms or None."""

    pre: nn.Module | None
    mlp: nn.Module
    post: nn.Module | None


def mlp_branch(layer: nn.Module) -> MLPBranch | None:
    """The MLP branch of ``layer`` if its class's form is known (:data:`MLP_FORMS`)."""
    form = MLP_FORMS.get(type(layer).__name__)
    hit = _child(layer, MLP_NAMES)
    if form is None or hit is None:
        return None
    mods = [getattr(layer, n, None) if n else None for n in form]
    if any(n and not isinstance(m, nn.Module) for n, m in zip(form, mods)):
        return None
    return MLPBranch(mods[0], hit[1], mods[1])


@dataclass(frozen=True)
class GLUChildren:
    """A GLU MLP module's gate, up and down linears (by attribute name) and its activation:
    what inference code needs to fuse or graph the block without knowing module names."""

    gate: str
    up: str
    down: str
    act: Callable[[torch.Tensor], torch.Tensor] | None


def glu_children(mlp: nn.Module) -> GLUChildren | None:
    """The gate/up/down linears of ``mlp`` if it is a GLU MLP with separate projections
    (LLaMA, Mistral, Qwen, Gemma: ``gate_proj``/``up_proj``/``down_proj``; Mixtral experts:
    ``w1``/``w3``/``w2``), else None."""
    for g, u, d in GLU_TRIPLES:
        if all(_is_linear(getattr(mlp, n, None)) for n in (g, u, d)):
            return GLUChildren(g, u, d, _activation(mlp))
    return None


def qkv_children(attn: nn.Module) -> tuple[str, str, str] | None:
    """The attribute names of ``attn``'s query, key and value linears when it has three
    separate ones that its forward calls in that order on the same input (LLaMA, Mistral,
    Qwen, Gemma: ``q_proj``/``k_proj``/``v_proj``), else None."""
    if all(_is_linear(getattr(attn, n, None)) for n in SHARED_QKV):
        return SHARED_QKV
    return None


def mlp_module(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The MLP child of a decoder layer and its attribute name, if it has one."""
    return _child(layer, MLP_NAMES)


def attention_module(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The attention child of a decoder layer and its attribute name, if it has one."""
    return _child(layer, ATTN_NAMES)


def _activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    for name in ("act_fn", "activation_fn", "act"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def all_decoder_linears(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every 2D linear weight (and 3D expert weight) inside the decoder layers, for
    whole-decoder sparsity figures."""
    path, layers = decoder_layers(model)
    out = []
    for name, p in layers.named_parameters():
        if p.dim() >= 2 and "norm" not in name and "embed" not in name:
            out.append((f"{path}.{name}", p))
    return out
