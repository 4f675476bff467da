"""Tiny randomly initialised models of every supported architecture (no download)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)


def _cfg(cls_name: str, **extra):
    cls = getattr(tf, cls_name)
    return cls(**{**COMMON, **extra})


ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 8, "num_hidden_layers": 3}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def tiny_model(arch: str = "llama", seed: int = 0, **extra) -> torch.nn.Module:
    cfg_name, model_name, defaults = ARCHS[arch]
    cfg = _cfg(cfg_name, **{**defaults, **extra})
    torch.manual_seed(seed)
    model = getattr(tf, model_name)(cfg).eval()
    # transformers' default init is small and mostly linear; widen it so activations differ
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def calib(n: int = 6, length: int = 24, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def feature_stats(x: torch.Tensor, hessian: bool = False, keep: int = 0):
    """FeatureStats of the rows ``x`` (with X^T X when ``hessian``, ``keep`` rows sampled)."""
    from dass.core.stats import FeatureStats

    s = FeatureStats(x.shape[-1], with_hessian=hessian, max_samples=keep)
    s.add(x)
    return s
