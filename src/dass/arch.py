"""The architecture adapter: where a model keeps its decoder layers, GLU blocks and
attention projections.

This is the one place that knows module names. It finds, for each decoder layer, the GLU
block(s) (``gate_proj``/``up_proj``/``down_proj``; Phi-3's fused ``gate_up_proj``;
Mixtral-style experts either as a ModuleList of ``w1``/``w3``/``w2`` modules or as fused 3D
``gate_up_proj``/``down_proj`` tensors) and the attention projections, and says which
activations must be observed to score them. Routers stay dense. A new architecture whose
names differ is supported by extending the name tables below. GPT-2-style ``Conv1D``
projections (weights stored ``[in, out]``) are plain linears to the rest of dass: their
:class:`MatrixRef` returns the transposed view, ``[out, in]`` like ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from dass.errors import UserValueError


class ArchitectureError(UserValueError):
    """The model's structure is not one the adapter can walk (or not a GLU under DaSS)."""


# Name tables: the only architecture-specific strings in the project.
LAYER_LIST_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "layers",
)
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")
ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
GLU_TRIPLES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
FUSED_GLU = ("gate_up_proj", "down_proj")
SHARED_QKV = ("q_proj", "k_proj", "v_proj")
ROUTER_NAMES = ("gate", "router")
WHAT_DASS_LOOKS_FOR = (
    "gate_proj/up_proj/down_proj or w1/w3/w2 linears, a fused gate_up_proj + down_proj, "
    "or MoE experts with those weights"
)

Role = Literal["gate", "up", "down", "attn", "linear"]


@dataclass
class MatrixRef:
    """One prunable 2D weight: a parameter, optionally one expert of a 3D parameter and/or
    a block of rows of a fused weight. :meth:`get` returns a view, so in-place writes
    update the model."""

    name: str  # parameter name as in the state dict (without expert/rows)
    module: nn.Module
    role: Role
    attr: str = "weight"
    expert: int | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False  # stored [in, out] (Conv1D): get() returns the [out, in] view

    def parameter(self) -> torch.Tensor:
        """The whole parameter this matrix is (part of)."""
        return getattr(self.module, self.attr)

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (shaped like :meth:`parameter`) that is this matrix."""
        w = tensor
        if self.expert is not None:
            w = w[self.expert]
        if self.rows is not None:
            w = w[self.rows[0] : self.rows[1]]
        return w.t() if self.transposed else w

    def get(self) -> torch.Tensor:
        return self.view_of(self.parameter())

    @property
    def key(self) -> str:
        """A unique, readable identifier (``name[expert][rows]``)."""
        key = self.name
        if self.expert is not None:
            key += f"[{self.expert}]"
        if self.rows is not None:
            key += f"[{self.rows[0]}:{self.rows[1]}]"
        return key

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.get().shape)  # type: ignore[return-value]


@dataclass
class GLUBlock:
    gate: MatrixRef
    up: MatrixRef
    down: MatrixRef
    x_key: str  # statistics of the block input
    h_key: str  # statistics of the intermediate activations (down's input)
    expert: int | None = None
    act: Callable[[torch.Tensor], torch.Tensor] | None = None  # gate activation (SiLU, GELU)


@dataclass
class LinearTarget:
    ref: MatrixRef
    x_key: str


@dataclass
class InputCapture:
    """Observe input[0] of ``module`` (an nn.Linear) into statistics ``key``."""

    key: str
    module: nn.Module
    features: int


@dataclass
class ExpertsCapture:
    """Observe a fused-experts module (3D ``gate_up_proj``/``down_proj``): for each expert,
    the tokens routed to it and its intermediate activations, computed from its weights."""

    module: nn.Module
    prefix: str
    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def x_key(self, e: int) -> str:
        return f"{self.prefix}[{e}].x"

    def gate_up(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s gate and up weights ``[I, d]`` (views of the fused 3D tensor)."""
        gu = getattr(self.module, "gate_up_proj")[e]
        inter = gu.shape[0] // 2
        return gu[:inter], gu[inter:]

    @staticmethod
    def routed(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [tokens, d], top-k expert indices [tokens, k])`` of a fused-experts call
        ``(hidden_states, top_k_index, top_k_weights)``."""
        hs = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hs = hs.reshape(-1, hs.shape[-1])
        return hs, idx.reshape(hs.shape[0], -1)

    def h_key(self, e: int) -> str:
        return f"{self.prefix}[{e}].h"


@dataclass
class Block:
    """A submodule of a decoder layer whose pruned weights can be refitted as one unit:
    the MLP (GLU, plain or mixture of experts) or the attention. ``token_wise``: each
    token's output depends on that token's input alone (MLPs), so any set of calibration
    rows can be fed to it; otherwise (attention) whole sequences must be."""

    name: str  # "mlp" or "attention"
    module: nn.Module
    prefix: str
    token_wise: bool


@dataclass
class LayerPlan:
    """What to observe and prune in one decoder layer."""

    index: int
    prefix: str
    layer: nn.Module
    glu: list[GLUBlock] = field(default_factory=list)
    linears: list[LinearTarget] = field(default_factory=list)
    inputs: list[InputCapture] = field(default_factory=list)
    experts: list[ExpertsCapture] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    attention_pruned: bool = False

    def matrices(self) -> list[MatrixRef]:
        out: list[MatrixRef] = []
        for b in self.glu:
            out += [b.gate, b.up, b.down]
        out += [t.ref for t in self.linears]
        return out

    def feature_sizes(self) -> dict[str, int]:
        """Statistics key -> number of features."""
        sizes = {c.key: c.features for c in self.inputs}
        for cap in self.experts:
            gu = getattr(cap.module, "gate_up_proj")
            dn = getattr(cap.module, "down_proj")
            for e in range(cap.num_experts):
                sizes[cap.x_key(e)] = gu.shape[-1]
                sizes[cap.h_key(e)] = dn.shape[-1]
        return sizes


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


def _find_glu(mlp: nn.Module, prefix: str, plan: LayerPlan) -> bool:
    """Add the GLU blocks found under ``mlp`` to ``plan``; True if any."""
    start = len(plan.glu)
    found = _find_glu_blocks(mlp, prefix, plan)
    act = _activation(mlp)
    for block in plan.glu[start:]:
        if block.act is None:
            block.act = act
    return found


# Decoder-layer class -> (norm applied to h before the MLP or None, norm applied to the
# MLP output or None). The layer computes ``h + post(mlp(pre(h)))`` where ``h`` is the
# residual stream after attention. Read off each class's forward in transformers 5.x;
# the run checks the form against a full layer pass on the first layer it prunes.
MLP_FORMS: dict[str, tuple[str | None, str | None]] = {
    "LlamaDecoderLayer": ("post_attention_layernorm", None),
    "MistralDecoderLayer": ("post_attention_layernorm", None),
    "Qwen2DecoderLayer": ("post_attention_layernorm", None),
    "Qwen3DecoderLayer": ("post_attention_layernorm", None),
    "GemmaDecoderLayer": ("post_attention_layernorm", None),
    "Phi3DecoderLayer": ("post_attention_layernorm", None),  # + resid_mlp_dropout (identity in eval)
    "MixtralDecoderLayer": ("post_attention_layernorm", None),
    "Gemma2DecoderLayer": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "Gemma3DecoderLayer": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "Olmo2DecoderLayer": (None, "post_feedforward_layernorm"),
}


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


def _find_glu_blocks(mlp: nn.Module, prefix: str, plan: LayerPlan) -> bool:
    found = False
    for g, u, d in GLU_TRIPLES:
        gate, up, down = (getattr(mlp, n, None) for n in (g, u, d))
        if _is_linear(gate) and _is_linear(up) and _is_linear(down):
            x_key, h_key = f"{prefix}.{g}.in", f"{prefix}.{d}.in"
            plan.glu.append(
                GLUBlock(
                    MatrixRef(f"{prefix}.{g}.weight", gate, "gate"),
                    MatrixRef(f"{prefix}.{u}.weight", up, "up"),
                    MatrixRef(f"{prefix}.{d}.weight", down, "down"),
                    x_key,
                    h_key,
                )
            )
            plan.inputs += [InputCapture(x_key, gate, gate.in_features), InputCapture(h_key, down, down.in_features)]
            return True
    fused, down = (getattr(mlp, n, None) for n in FUSED_GLU)
    if _is_linear(fused) and _is_linear(down):
        inter = fused.out_features // 2
        x_key, h_key = f"{prefix}.gate_up_proj.in", f"{prefix}.down_proj.in"
        name = f"{prefix}.gate_up_proj.weight"
        plan.glu.append(
            GLUBlock(
                MatrixRef(name, fused, "gate", rows=(0, inter)),
                MatrixRef(name, fused, "up", rows=(inter, 2 * inter)),
                MatrixRef(f"{prefix}.down_proj.weight", down, "down"),
                x_key,
                h_key,
            )
        )
        plan.inputs += [InputCapture(x_key, fused, fused.in_features), InputCapture(h_key, down, down.in_features)]
        return True
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, nn.ModuleList):
        for e, expert in enumerate(experts):
            sub = LayerPlan(plan.index, plan.prefix, plan.layer)
            if _find_glu(expert, f"{prefix}.experts.{e}", sub):
                for b in sub.glu:
                    b.expert = e
                plan.glu += sub.glu
                plan.inputs += sub.inputs
                found = True
    elif isinstance(experts, nn.Module):
        gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3:
            cap = ExpertsCapture(experts, f"{prefix}.experts", gu.shape[0], getattr(experts, "act_fn"))
            inter = dn.shape[-1]
            for e in range(cap.num_experts):
                plan.glu.append(
                    GLUBlock(
                        MatrixRef(f"{prefix}.experts.gate_up_proj", experts, "gate", "gate_up_proj", e, (0, inter)),
                        MatrixRef(f"{prefix}.experts.gate_up_proj", experts, "up", "gate_up_proj", e, (inter, 2 * inter)),
                        MatrixRef(f"{prefix}.experts.down_proj", experts, "down", "down_proj", e),
                        cap.x_key(e),
                        cap.h_key(e),
                        expert=e,
                        act=cap.act_fn,
                    )
                )
            plan.experts.append(cap)
            found = True
    for shared in ("shared_expert", "shared_experts", "shared_mlp"):
        sub_mlp = getattr(mlp, shared, None)
        if isinstance(sub_mlp, nn.Module):
            found = _find_glu(sub_mlp, f"{prefix}.{shared}", plan) or found
    return found


def _add_linears(module: nn.Module, prefix: str, plan: LayerPlan, skip: tuple[str, ...] = ()) -> None:
    """Every nn.Linear under ``module`` as a plain target; q/k/v share one input."""
    shared_added = False
    for name, lin in module.named_modules():
        if not (_is_linear(lin) or _is_conv1d(lin)) or not name or name.split(".")[-1] in skip:
            continue
        full = f"{prefix}.{name}"
        leaf = name.split(".")[-1]
        if leaf in SHARED_QKV and "." not in name:
            key = f"{prefix}.qkv.in"
            if not shared_added:
                plan.inputs.append(InputCapture(key, lin, _in_features(lin)))
                shared_added = True
        else:
            key = f"{full}.in"
            plan.inputs.append(InputCapture(key, lin, _in_features(lin)))
        role = "attn" if "attn" in prefix else "linear"
        plan.linears.append(LinearTarget(MatrixRef(f"{full}.weight", lin, role, transposed=_is_conv1d(lin)), key))


def plan_layer(layer: nn.Module, index: int, prefix: str, scope: str, require_glu: bool) -> LayerPlan:
    """Find what to prune in one decoder layer under ``scope`` (``mlp`` or ``all``)."""
    plan = LayerPlan(index, prefix, layer)
    mlp_hit = _child(layer, MLP_NAMES)
    if mlp_hit is None:
        raise ArchitectureError(
            f"{prefix} ({type(layer).__name__}) has no MLP submodule; looked for: {', '.join(MLP_NAMES)}"
        )
    mlp_name, mlp = mlp_hit
    plan.blocks.append(Block("mlp", mlp, f"{prefix}.{mlp_name}", token_wise=True))
    if not _find_glu(mlp, f"{prefix}.{mlp_name}", plan):
        if require_glu:
            probe = LayerPlan(index, prefix, layer)
            _add_linears(mlp, f"{prefix}.{mlp_name}", probe, skip=ROUTER_NAMES)
            advice = (
                "Use --method wanda, sparsegpt or magnitude for this model."
                if probe.linears
                else "Its MLP has no nn.Linear or Conv1D weight that another method could prune either."
            )
            raise ArchitectureError(
                f"DaSS needs a gated (GLU) MLP, but {prefix}.{mlp_name} ({type(mlp).__name__}) has none; "
                f"looked for {WHAT_DASS_LOOKS_FOR}. {advice}"
            )
        _add_linears(mlp, f"{prefix}.{mlp_name}", plan, skip=ROUTER_NAMES)
    if scope == "all":
        attn_hit = _child(layer, ATTN_NAMES)
        if attn_hit is None:
            raise ArchitectureError(f"{prefix} has no attention submodule; looked for: {', '.join(ATTN_NAMES)}")
        _add_linears(attn_hit[1], f"{prefix}.{attn_hit[0]}", plan)
        plan.blocks.insert(0, Block("attention", attn_hit[1], f"{prefix}.{attn_hit[0]}", token_wise=False))
        plan.attention_pruned = True
    elif scope != "mlp":
        raise ArchitectureError(f"unknown scope {scope!r}: use 'mlp' or 'all'")
    if not plan.matrices():
        raise ArchitectureError(f"found nothing to prune in {prefix}")
    return plan


def plan_model(model: nn.Module, scope: str = "mlp", require_glu: bool = False) -> list[LayerPlan]:
    """Plans for every decoder layer (validates the whole model before anything changes)."""
    path, layers = decoder_layers(model)
    return [plan_layer(layer, i, f"{path}.{i}", scope, require_glu) for i, layer in enumerate(layers)]


def all_decoder_linears(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every 2D linear weight (and 3D expert weight) inside the decoder layers, for
    whole-decoder sparsity figures."""
    path, layers = decoder_layers(model)
    out = []
    for name, p in layers.named_parameters():
        if p.dim() >= 2 and "norm" not in name and "embed" not in name:
            out.append((f"{path}.{name}", p))
    return out
