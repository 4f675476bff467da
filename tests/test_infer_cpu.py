"""dass.infer pieces that run without a GPU: the tuning cache, the decode-step graph wrapper
(with a stand-in capture), ``dass bench --dry-run``, the dispatcher's log wording, and (with
triton installed) accelerate() and generate() through Triton's interpreter."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from dass.infer.dispatch import _reason
from dass.infer.tuning_cache import TuningCache

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    return {**os.environ, **extra,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def test_tuning_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    a = TuningCache(path, signature="gpu A")
    assert a.get("k") is None
    a.put("k", {"path": "triton", "config": {"BLOCK": 64}})
    # another process (a fresh object) sees it; another environment does not
    assert TuningCache(path, signature="gpu A").get("k") == {"path": "triton", "config": {"BLOCK": 64}}
    assert TuningCache(path, signature="gpu B").get("k") is None
    b = TuningCache(path, signature="gpu B")
    b.put("k", {"path": "dense"})
    assert TuningCache(path, signature="gpu A").get("k")["path"] == "triton"  # merged, not overwritten
    assert set(json.loads(path.read_text())) == {"gpu A", "gpu B"}


def test_tuning_cache_ignores_a_damaged_file(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    c = TuningCache(path, signature="x")
    assert c.get("k") is None
    c.put("k", 1)
    assert TuningCache(path, signature="x").get("k") == 1


def test_reason_says_when_dense_is_faster():
    msg = _reason("triton", {"triton": 0.030, "decompress": 0.050}, 0.025, keep_dense=False, dense_mb=90)
    assert "0.83x" in msg and "slower than dense" in msg and "keep_dense=True" in msg and "+90 MB" in msg
    msg = _reason("triton", {"triton": 0.019}, 0.025, keep_dense=False, dense_mb=90)
    assert "1.32x" in msg and "slower" not in msg
    msg = _reason("dense", {"triton": 0.030, "dense": 0.025}, 0.025, keep_dense=True, dense_mb=90)
    assert msg.startswith("dense copy fastest") and "triton" in msg and "0.83x" in msg


def _greedy(model, ids, n, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **kw)


def test_decode_graph_plumbing_gives_the_same_tokens():
    """DecodeGraphs with a capture that re-runs the step: static buffers, the widened
    attention mask and the key of a step must give exactly the tokens of plain generate()."""
    import inspect

    from transformers import StaticCache

    from dass.infer.decode_graphs import DecodeGraphs

    model = tiny_model("llama")
    ids = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    ref = _greedy(model, ids, 10)
    dg = DecodeGraphs(model, capture=lambda fn: fn)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = StaticCache(config=model.config, max_cache_len=32)
    for _ in range(2):  # the second run reuses the cache (reset) and the captured step
        cache.reset()
        got = _greedy(model, ids, 10, **{kw: cache}, disable_compile=True)
        assert torch.equal(got, ref)
    assert dg.replays == 2 * 9 and len(dg.entries) == 1, (dg.replays, dg.log)
    # prefill and non-static caches run the model itself
    assert torch.equal(_greedy(model, ids, 4), ref[:, :9])
    assert dg.replays == 2 * 9
    dg.remove()
    assert "forward" not in vars(model)


def test_bench_dry_run_uses_tiny_shapes(tmp_path):
    """``dass bench --dry-run`` is described as tiny shapes on CPU: it must not build the 7B,
    13B or 70B shapes (it once ran them and took minutes)."""
    out = tmp_path / "dry.json"
    res = subprocess.run([sys.executable, "-m", "dass", "bench", "--dry-run", "--what", "matrix,mlp,e2e",
                          "--e2e-layers", "1", "--e2e-prefill", "16", "--out", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["shapes"] and all(d <= 1024 and D <= 1024 for _, d, D in data["shapes"])
    assert max(data["tokens"]) <= 64
    assert {r["shape"] for r in data["matrix"]} == {"256x704"} and data["mlp"]
    assert data["e2e"]["hidden"] <= 1024 and data["errors"] == []


def test_generate_refuses_cleanly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "dass", "generate", "--synthetic", "tiny"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("dass generate: error:") and "CUDA GPU" in res.stderr


INTERPRETED = textwrap.dedent(
    """
    import copy, json, sys, torch
    import transformers as tf
    from test_accelerate import rel_err
    from dass.arch import glu_children
    from dass.infer.accelerate import AccelerateConfig, NM24Linear, accelerate
    from dass.infer.generate import prune_24

    out = {}
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    prune_24(model, "mlp", "dass")
    exact = copy.deepcopy(model).double()
    ref = copy.deepcopy(model).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    rep = accelerate(model, config=AccelerateConfig(keep_dense=True), tune_tokens=[1, 9])
    mlp = model.model.layers[0].mlp
    out["replaced"] = sorted(set(rep["replaced"].values()))
    # off the GPU the tuned counts take the static path (triton), so no dense copy is kept
    out["dense_kept"] = rep["dense_kept"]
    out["fused"] = len(rep["fused_gate_up"])
    out["stacked"] = isinstance(getattr(mlp, "dass_gate_up", None), NM24Linear) and glu_children(mlp) is None
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = exact(ids).logits
        out["err_accelerated"] = rel_err(model(ids).logits, want)
        out["err_dense_bf16"] = rel_err(ref(ids).logits, want)
    # every path of one module (dense copy kept), against the exact product
    lin = NM24Linear(mlp.dass_gate_up.dense_weight(), None, "output", AccelerateConfig(keep_dense=True))
    W = lin.dense_weight().double()
    errs = {}
    for path in lin.candidates(4):
        for T in (1, 4, 33):
            x = torch.randn(T, lin.in_features).to(torch.bfloat16)
            errs[f"{path} T={T}"] = rel_err(lin.run_path(x, path), x.double() @ W.T)
    out["path_errs"] = errs
    out["static"] = lin.decision(4).source
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_accelerate_in_the_interpreter():
    """accelerate() on a small LLaMA through Triton's interpreter: gate/up stacked, every path
    of a module right, and the model's logits as close to exact as the dense bf16 model's."""
    pytest.importorskip("triton")
    res = subprocess.run([sys.executable, "-c", INTERPRETED], env=_env(TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["replaced"] == ["input", "output"] and out["fused"] == 2 and out["stacked"]
    assert out["dense_kept"] == []
    assert out["err_accelerated"] < 2 * out["err_dense_bf16"] + 1e-3, out
    assert set(k.split()[0] for k in out["path_errs"]) == {"triton", "decompress", "dense"}
    assert all(v < 1e-2 for v in out["path_errs"].values()), out["path_errs"]
    assert out["static"] == "static"  # no measurement off the GPU


@pytest.mark.slow
def test_generate_in_the_interpreter(tmp_path):
    """``dass generate --synthetic tiny`` end to end on the CPU through Triton's interpreter:
    dense and accelerated runs in the graphs and eager modes (named: the default modes also
    compile, which the interpreter makes too slow here), the same greedy tokens."""
    pytest.importorskip("triton")
    out = tmp_path / "gen.json"
    res = subprocess.run([sys.executable, "-m", "dass", "generate", "--synthetic", "tiny", "--layers", "1",
                          "--device", "cpu", "--batches", "2", "--new-tokens", "3", "--prompt-len", "4",
                          "--reps", "1", "--modes", "graphs,eager", "--out", str(out)],
                         env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {(r["mode"], r["batch"]) for r in data["table"]} == {("graphs", 2), ("eager", 2)}
    assert all(r["same_tokens"] == 1.0 for r in data["table"]), data["table"]
    assert data["skipped"] == []
