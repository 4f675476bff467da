"""The architecture adapter: where a model keeps its decoder layers, GLU blocks and
attention projections.

This is the one place that knows module names. It finds, for each decoder layer, the GLU
block(s) (``gate_proj``/``up_proj``/``down_proj``; Phi-3's fused ``gate_up_proj``;
Mixtral-style experts either as a ModuleList of ``w1``/``w3``/``w2`` modules or as fused 3D
``gate_up_proj``/``down_proj`` tensors) and the attention projections, and says which
activations must be observed to score them. Routers stay dense. A new architecture whose
names differ is supported by extending the name tables (:mod:`dass.arch.names`). GPT-2-style
``Conv1D`` projections (weights stored ``[in, out]``) are plain linears to the rest of dass:
their :class:`MatrixRef` returns the transposed view, ``[out, in]`` like ``nn.Linear``.

The package: :mod:`~dass.arch.names` (the name tables), :mod:`~dass.arch.targets` (what a
layer plan holds), :mod:`~dass.arch.modules` (finding a model's parts by name) and
:mod:`~dass.arch.plan` (planning a layer). Every name is importable from ``dass.arch``.
"""

from __future__ import annotations

from dass.arch.modules import (
    ArchitectureError,
    GLUChildren,
    MLPBranch,
    all_decoder_linears,
    attention_module,
    decoder_layers,
    glu_children,
    qkv_children,
    mlp_branch,
    mlp_module,
    transposed_weights,
)
from dass.arch.names import (
    ATTN_NAMES,
    FUSED_GLU,
    GLU_TRIPLES,
    LAYER_LIST_PATHS,
    MLP_FORMS,
    MLP_NAMES,
    ROUTER_NAMES,
    SHARED_QKV,
    WHAT_DASS_LOOKS_FOR,
)
from dass.arch.plan import plan_layer, plan_model
from dass.arch.targets import (
    Block,
    ExpertsCapture,
    GLUBlock,
    InputCapture,
    LayerPlan,
    LinearTarget,
    MatrixRef,
    Role,
)

__all__ = [
    "ATTN_NAMES",
    "ArchitectureError",
    "Block",
    "ExpertsCapture",
    "FUSED_GLU",
    "GLUBlock",
    "GLUChildren",
    "GLU_TRIPLES",
    "InputCapture",
    "LAYER_LIST_PATHS",
    "LayerPlan",
    "LinearTarget",
    "MLPBranch",
    "MLP_FORMS",
    "MLP_NAMES",
    "MatrixRef",
    "ROUTER_NAMES",
    "Role",
    "SHARED_QKV",
    "WHAT_DASS_LOOKS_FOR",
    "all_decoder_linears",
    "attention_module",
    "decoder_layers",
    "glu_children",
    "qkv_children",
    "mlp_branch",
    "mlp_module",
    "plan_layer",
    "plan_model",
    "transposed_weights",
]
