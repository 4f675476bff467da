"""dass.infer.decode_loop: the fast greedy loop (static cache, eager prefill, compiled 1-token
step, no host sync) gives ``generate()``'s greedy tokens, compiles once per batch size, and
runs accelerated 2:4 models in one graph (their custom operators) with the dense model's
tokens.

On the CPU the step is compiled with ``aot_eager`` (the traced graph run with eager's
kernels), so tokens and logits are promised bit for bit; what only a GPU shows (Inductor's
kernels, cudagraph trees recording once and replaying) is not checked here. Dense models are
fp32; the accelerated ones bf16, the only dtypes ``accelerate()`` replaces.
"""

import copy

import pytest
import torch

from dass.infer.decode_loop import FastGreedy


def _llama(vocab: int = 128, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _ids(B: int, P: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab, (B, P), generator=torch.Generator().manual_seed(seed + B))


@torch.no_grad()
def _generate(model, ids: torch.Tensor, n: int, scores: bool = False):
    """HF generate(), greedy, static cache, exactly n new tokens (what the loop must equal)."""
    from transformers import StaticCache

    from dass.infer.generate import _cache_kw

    kw = {_cache_kw(model): StaticCache(config=model.config, max_cache_len=ids.shape[1] + n + 4)}
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                         pad_token_id=0, output_scores=scores, return_dict_in_generate=True, **kw)
    toks = out.sequences[:, ids.shape[1]:]
    return (toks, torch.stack(list(out.scores)).float()) if scores else toks


def _counter():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("B", [1, 2])
def test_fast_loop_gives_generate_greedy_tokens(B):
    m = _llama()
    ids = _ids(B, 5, 128)
    want = _generate(m, ids, 10)
    cnt = _counter()
    fg = FastGreedy(m, max_len=32, backend=cnt)
    got = fg.generate(ids, 10)
    again = fg.generate(ids, 10)  # the kept cache, reset: the same tokens, no new compile
    assert got.shape == (B, 10) and got.dtype == torch.long
    assert torch.equal(got, want) and torch.equal(again, want)
    assert cnt.frame_count == 1
    assert torch.equal(fg.generate(ids, 1), want[:, :1])  # one token: the prefill only


def test_one_compile_per_batch_size_reused_across_calls():
    m = _llama()
    cnt = _counter()
    fg = FastGreedy(m, max_len=32, backend=cnt)
    for B in (1, 2, 1, 2):
        fg.generate(_ids(B, 4, 128), 4)
    assert cnt.frame_count == 2 and sorted(fg.caches) == [1, 2]


def test_end_of_sequence_is_banned_as_min_new_tokens_does():
    """generate(min_new_tokens=n) never picks EOS; neither does the loop. A vocabulary of 8
    makes EOS (id 2) the argmax often, so the check means something: without the ban the
    loop does pick it."""
    m = _llama(vocab=8)
    ids = _ids(2, 3, 8, seed=0)
    want = _generate(m, ids, 16)
    got = FastGreedy(m, max_len=24).generate(ids, 16)
    free = FastGreedy(m, max_len=24, ban_eos=False).generate(ids, 16)
    assert torch.equal(got, want) and not (want == 2).any()
    assert (free == 2).any()


def test_scores_are_generates_output_scores():
    m = _llama()
    ids = _ids(1, 6, 128)
    want, want_scores = _generate(m, ids, 6, scores=True)
    got, scores = FastGreedy(m, max_len=16).generate(ids, 6, scores=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(scores, want_scores)


def test_eager_step_is_the_same_loop():
    m = _llama()
    ids = _ids(2, 4, 128)
    fg = FastGreedy(m, max_len=16, backend="eager")
    assert not fg.compile and "eager decode step" in fg.name()
    assert torch.equal(fg.generate(ids, 6), _generate(m, ids, 6))


def test_cache_too_short_is_refused():
    with pytest.raises(ValueError, match="exceed the static cache"):
        FastGreedy(_llama(), max_len=8).generate(_ids(1, 5, 128), 4)


# ----------------------------------------------------------------------------- 2:4 models
@pytest.fixture
def cpu_modules(monkeypatch):
    """Let NM24Linear and accelerate() accept CPU tensors (their reference path)."""
    import dass.infer.device as device
    import dass.infer.nm24_linear as nl

    monkeypatch.setattr(device, "interpreting", lambda: True)
    monkeypatch.setattr(nl, "interpreting", lambda: True)
    torch.manual_seed(0)


def _pruned_pair():
    """A 2:4-pruned tiny Llama (bf16) and its accelerated copy (every scope)."""
    from tiny import tiny_model

    from dass.infer.accelerate import accelerate
    from dass.infer.generate import prune_24
    from dass.infer.nm24_linear import NM24Linear

    m = tiny_model("llama", hidden_size=64, intermediate_size=128, num_key_value_heads=4)  # multiples of 64
    prune_24(m, "all", "wanda")
    dense = m.to(torch.bfloat16)
    acc = copy.deepcopy(dense)
    rep = accelerate(acc)
    n = sum(isinstance(x, NM24Linear) for x in acc.modules())
    assert n and rep["fused_gate_up"]
    return dense, acc, n


def test_accelerated_model_runs_the_fast_loop_in_one_graph(cpu_modules):
    from torch._dynamo.utils import counters

    dense, acc, n = _pruned_pair()
    breaks = sum(counters["graph_break"].values())
    for B in (1, 2):
        ids = _ids(B, 4, 128)
        want = FastGreedy(dense, max_len=16).generate(ids, 6)
        cnt = _counter()
        fg = FastGreedy(acc, max_len=16, backend=cnt)
        got = fg.generate(ids, 6)
        assert torch.equal(got, want), (got.tolist(), want.tolist())
        assert cnt.frame_count == 1 and fg.prepared[B]["modules"] == n
        ops = [nd for nd in cnt.graphs[0].graph.nodes if nd.op == "call_function" and "dass.nm24_linear" in str(nd.target)]
        assert len(ops) == n  # every 2:4 module is one opaque operator inside the step's graph
    assert sum(counters["graph_break"].values()) == breaks


def test_measure_fast_mode_gives_eager_generate_tokens(cpu_modules):
    """``dass generate``'s fast mode on the accelerated model: generate()'s eager tokens, no
    graph breaks, and the loop named in the row."""
    from dass.infer.generate import measure, release_state, reset_compiled

    _, acc, _ = _pruned_pair()
    ids = _ids(2, 4, 128)
    eager = measure(acc, ids, 4, "eager", reps=1)
    state: dict = {}
    fast = measure(acc, ids, 4, "fast", reps=1, state=state)
    release_state(state)
    reset_compiled(acc)
    assert fast["tokens"] == eager["tokens"]
    assert fast["compiled"] and fast["graph_breaks"] == 0
    assert "fast loop" in fast["loop"] and "torch.compile" in fast["loop"] and "fullgraph=True" in fast["loop"]
    assert state == {}


def test_nested_layers_option_same_tokens_and_undone(cpu_modules):
    """Experimental per-layer compile region: on the dense model one traced layer reused by
    every layer; the same tokens dense and accelerated (whose layers this torch inlines
    instead: no shorter compile there, checked only for its tokens); reset() restores the
    layers' own forward."""
    m = _llama(layers=3)
    ids = _ids(1, 4, 128)
    cnt = _counter()
    fg = FastGreedy(m, max_len=16, backend=cnt, nested_layers=True)
    assert torch.equal(fg.generate(ids, 5), _generate(m, ids, 5))
    g = cnt.graphs[0].graph
    calls = [nd for nd in g.nodes if "invoke_subgraph" in str(nd.target)]
    bodies = {nd.target for nd in g.nodes if nd.op == "get_attr" and "subgraph" in str(nd.target)}
    assert len(calls) == 3 and len(bodies) == 1
    fg.reset()
    assert all("forward" not in vars(layer) for layer in m.model.layers)

    dense, acc, _ = _pruned_pair()
    want = FastGreedy(dense, max_len=16).generate(ids, 5)
    fa = FastGreedy(acc, max_len=16, nested_layers=True)
    assert torch.equal(fa.generate(ids, 5), want)
    fa.reset()
    assert all("forward" not in vars(layer) for layer in acc.model.layers)
