"""An accelerated model under ``torch.compile(fullgraph=True)``: the 2:4 modules are custom
operators (dass.infer.ops), so Dynamo traces the whole model as one graph and the compiled
model gives the eager model's output.

On a machine without a GPU and without triton the modules run their reference path
(decompress in torch, then ``F.linear``); ``interpreting`` is patched so they can be built on
the CPU at all (what ``TRITON_INTERPRET=1`` allows where triton is installed). The backend is
``aot_eager``: it runs the traced graph with the same kernels as eager, so the output is
promised bit for bit; Inductor would fuse and round differently.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu_modules(monkeypatch):
    """Let NM24Linear and accelerate() accept CPU tensors (their reference path)."""
    import dass.infer.device as device
    import dass.infer.nm24_linear as nl

    monkeypatch.setattr(device, "interpreting", lambda: True)
    monkeypatch.setattr(nl, "interpreting", lambda: True)
    torch.manual_seed(0)


def _model(scope="all"):
    from tiny import tiny_model

    from dass.infer.generate import prune_24

    # shapes that are multiples of 64 (accelerate() keeps others dense)
    m = tiny_model("llama", hidden_size=64, intermediate_size=128, num_key_value_heads=4)
    prune_24(m, scope, "wanda")
    return m.to(torch.bfloat16)


def _accelerated(scope="all"):
    from dass.infer.accelerate import accelerate
    from dass.infer.nm24_linear import NM24Linear

    m = _model(scope)
    rep = accelerate(m)
    n = sum(isinstance(x, NM24Linear) for x in m.modules())
    return m, rep, n


def _op_calls(gm) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and "dass.nm24_linear" in str(node.target))


def test_accelerated_model_compiles_fullgraph_and_matches_eager(cpu_modules):
    from torch._dynamo.testing import CompileCounterWithBackend

    from dass.infer.ops import prepare_compile

    m, rep, n = _accelerated("all")
    assert n == 2 * (4 + 2) and rep["fused_gate_up"]  # q,k,v,o + stacked gate/up + down, per layer
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    prep = prepare_compile(m, [10])
    assert prep["modules"] == n and sum(prep["paths"][10].values()) == n
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        want = m(ids).logits
        got = torch.compile(m, fullgraph=True, backend=counter)(ids).logits
    assert counter.frame_count == 1  # one graph: no breaks (fullgraph=True would raise on one)
    assert _op_calls(counter.graphs[0]) == n  # every 2:4 module is one opaque operator
    assert torch.equal(got, want)


def test_operator_fake_and_real_agree(cpu_modules):
    """torch.library's own checks of the operator: schema, fake (meta) implementation against
    the real one, and its use under the AOT dispatcher."""
    from dass.infer.nm24_linear import NM24Linear
    from dass.infer.ops import register

    W = torch.randn(64, 128)
    from dass.infer.generate import _magnitude24

    _magnitude24(W, "input")
    lin = NM24Linear(W.to(torch.bfloat16), None, "input")
    h = register(lin)
    x = torch.randn(3, 7, 128).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.dass.nm24_linear, (x, h, 64))
    y = torch.ops.dass.nm24_linear(x, h, 64)
    assert y.shape == (3, 7, 64) and torch.equal(y, lin(x))


def test_copied_module_gets_its_own_handle(cpu_modules):
    """A deepcopy carries the handle attribute along; prepare_compile gives the copy its own,
    so a compiled copy never runs the original's weights."""
    from dass.infer.nm24_linear import NM24Linear
    from dass.infer.ops import module_of, prepare_compile

    m, _, _ = _accelerated("mlp")
    prepare_compile(m)
    c = copy.deepcopy(m)
    prepare_compile(c)
    for a, b in zip(m.modules(), c.modules()):
        if isinstance(a, NM24Linear):
            assert a._dass_handle != b._dass_handle and module_of(b._dass_handle) is b


def test_eager_calls_do_not_use_the_operator(cpu_modules, monkeypatch):
    """Outside compilation the modules keep their eager path (no operator dispatch per call)."""
    import dass.infer.ops as ops

    m, _, _ = _accelerated("all")
    calls = []
    monkeypatch.setattr(ops, "module_of", lambda h: calls.append(h))
    with torch.no_grad():
        m(torch.randint(0, 128, (1, 4)))
    assert calls == []


def test_compiled_generate_loop_gives_eager_tokens(cpu_modules):
    """``dass generate``'s compiled loop (HF generate(), static cache, compiled decoding
    steps) on the accelerated model: the greedy tokens of the eager loop."""
    from dass.infer.generate import measure, reset_compiled

    m, _, _ = _accelerated("all")
    ids = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(1))
    eager = measure(m, ids, 4, "eager", reps=1)
    compiled = measure(m, ids, 4, "compiled", reps=1)
    reset_compiled(m)
    assert compiled["compiled"] and compiled["graph_breaks"] == 0, compiled["loop"]
    assert compiled["tokens"] == eager["tokens"]


@pytest.mark.slow
def test_compile_through_the_interpreter():
    """With triton installed: the Triton paths (2:4 kernels, the stacked gate/up's GLU operator,
    which runs the product and the Triton activation kernel here) through Triton's
    interpreter, compiled with fullgraph=True, equal to eager."""
    pytest.importorskip("triton")
    code = (
        "import torch, sys\n"
        "from torch._dynamo.testing import CompileCounterWithBackend\n"
        "from test_compile_ops import _accelerated\n"
        "from dass.infer.ops import prepare_compile\n"
        "torch.manual_seed(0)\n"
        "m, rep, n = _accelerated('all')\n"
        "assert all(getattr(x, '_dass_fused_act', None) == 'silu' for x in m.modules() if hasattr(x, 'dass_gate_up'))\n"
        "ids = torch.randint(0, 128, (2, 3))\n"
        "prepare_compile(m, [6])\n"
        "cnt = CompileCounterWithBackend('aot_eager')\n"
        "with torch.no_grad():\n"
        "    want = m(ids).logits\n"
        "    got = torch.compile(m, fullgraph=True, backend=cnt)(ids).logits\n"
        "ops = [str(nd.target).split('.')[1] for nd in cnt.graphs[0].graph.nodes if str(nd.target).startswith('dass.')]\n"
        "print(cnt.frame_count, ops.count('nm24_linear'), ops.count('nm24_glu'), n,"
        " torch.equal(got, want))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    frames, lin, glu, n, same = res.stdout.split()[-5:]
    assert (frames, glu, same) == ("1", "2", "True") and int(lin) + int(glu) == int(n)
