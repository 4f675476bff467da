"""Planning a decoder layer: which matrices to prune, as GLU blocks or plain linear
targets, and which activations to observe to score them (:func:`plan_layer`,
:func:`plan_model`).
"""

from __future__ import annotations

import torch
from torch import nn

from dass.arch.modules import ArchitectureError, _activation, _child, _in_features, _is_conv1d, _is_linear, decoder_layers
from dass.arch.names import ATTN_NAMES, FUSED_GLU, GLU_TRIPLES, MLP_NAMES, ROUTER_NAMES, SHARED_QKV, WHAT_DASS_LOOKS_FOR
from dass.arch.targets import Block, ExpertsCapture, GLUBlock, InputCapture, LayerPlan, LinearTarget, MatrixRef


def _find_glu(mlp: nn.Module, prefix: str, plan: LayerPlan) -> bool:
    """Add the GLU blocks found under ``mlp`` to ``plan``; True if any."""
    start = len(plan.glu)
    found = _find_glu_blocks(mlp, prefix, plan)
    act = _activation(mlp)
    for block in plan.glu[start:]:
        if block.act is None:
            block.act = act
    return found


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


