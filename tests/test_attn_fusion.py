"""dass.infer.attn_fusion: attention's q, k, v replaced by slices of one stacked product.

Checked on the CPU with a plain ``nn.Linear`` as the stacked product (the mechanism does not
depend on what computes it; on a GPU it is a 2:4 ``NM24Linear``): the model's outputs stay
those of the three separate projections, in every call order, in eager mode and compiled
with ``fullgraph=True`` (aot_eager), and greedy decoding in dass' fast loop gives the same
tokens. fp32 and a relative tolerance: one stacked matmul need not round like three.
"""

import copy

import pytest
import torch
import torch.nn as nn

from dass.arch import attention_module, decoder_layers, qkv_children
from dass.infer.attn_fusion import QKVPart, stack_qkv


def _llama(layers: int = 2, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, attention_bias=bias)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _stacked(attn: nn.Module, names) -> nn.Linear:
    mods = [getattr(attn, n) for n in names]
    lin = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=mods[0].bias is not None)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([m.weight for m in mods]))
        if lin.bias is not None:
            lin.bias.copy_(torch.cat([m.bias for m in mods]))
    return lin


def _fuse_all(model) -> int:
    n = 0
    for layer in decoder_layers(model)[1]:
        attn = attention_module(layer)[1]
        names = qkv_children(attn)
        assert names == ("q_proj", "k_proj", "v_proj")
        n += stack_qkv(attn, names, _stacked(attn, names))
    return n


def _close(a, b, tol=1e-5):
    return ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.parametrize("bias", [False, True])
def test_stacked_model_gives_the_same_logits(bias):
    ref = _llama(bias=bias)
    model = copy.deepcopy(ref)
    assert _fuse_all(model) == 2
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QKVPart) and isinstance(attn.dass_qkv, nn.Linear)
    assert qkv_children(attn) is None  # the parts are not linears: not stacked twice
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _close(model(ids).logits, ref(ids).logits)
    st = attn.q_proj.stack
    assert st.kept is None  # nothing kept after a forward
    # the stacked weights are the model's parameters now (state dict, .to(), .half() see them)
    assert "model.layers.0.self_attn.dass_qkv.weight" in model.state_dict()


def test_any_call_order_and_other_inputs_are_right():
    ref = _llama(layers=1)
    attn_ref = ref.model.layers[0].self_attn
    model = copy.deepcopy(ref)
    _fuse_all(model)
    attn = model.model.layers[0].self_attn
    x, z = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        for order in ([2, 0, 1], [1, 2, 0], [0, 2, 1], [0, 0, 1, 2]):
            for i in order:
                n = ("q_proj", "k_proj", "v_proj")[i]
                assert _close(getattr(attn, n)(x), getattr(attn_ref, n)(x)), (order, n)
        attn.q_proj(x)  # q of x kept; k of another tensor must not take x's share
        assert _close(attn.k_proj(z), attn_ref.k_proj(z))
        assert _close(attn.v_proj(x), attn_ref.v_proj(x))


def test_a_wrong_stack_is_refused_and_nothing_changes():
    model = _llama(layers=1)
    attn = model.model.layers[0].self_attn
    bad = _stacked(attn, ("q_proj", "k_proj", "v_proj"))
    with torch.no_grad():
        bad.weight.mul_(-1)
    assert not stack_qkv(attn, ("q_proj", "k_proj", "v_proj"), bad)
    assert isinstance(attn.q_proj, nn.Linear) and not hasattr(attn, "dass_qkv")


def test_compiles_in_one_graph_with_the_same_logits():
    from torch._dynamo.testing import CompileCounterWithBackend

    ref = _llama()
    model = copy.deepcopy(ref)
    _fuse_all(model)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(model, backend=cnt, fullgraph=True)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, again, want = fn(ids).logits, fn(ids).logits, ref(ids).logits
    assert _close(got, want) and torch.equal(got, again)
    assert cnt.frame_count == 1


def test_fast_loop_tokens_unchanged():
    from dass.infer.decode_loop import FastGreedy

    ref = _llama()
    model = copy.deepcopy(ref)
    _fuse_all(model)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    want = FastGreedy(ref, max_len=24).generate(ids, 8)
    torch._dynamo.reset()
    got = FastGreedy(model, max_len=24).generate(ids, 8)
    assert torch.equal(got, want)
