"""The adapter's name tables: the only architecture-specific strings in the project.

Kept apart from the code that walks a model so that supporting a new architecture whose
names differ means extending these tables (and :data:`MLP_FORMS`) in one place.
"""

from __future__ import annotations

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
