"""The console script end to end on a tiny random model saved to a temporary directory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dass.cli import main
from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved like any local checkpoint, and a
    text file to calibrate and evaluate on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    words = [f"w{i}" for i in range(120)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, 120, (6000,), generator=g))
    (root / "text.txt").write_text(text)
    return root


def run(*argv):
    return main([str(a) for a in argv])


def test_prune_verify_reload_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    common = ["--calibration", tiny_dir / "text.txt", "--nsamples", 4, "--seqlen", 32, "--quiet"]
    assert run("prune", tiny_dir / "model", "--method", "dass", "--pattern", "2:4", "--output", out, *common) == 0
    manifest = json.loads((out / "dass.json").read_text())
    assert manifest["method"] == "dass" and manifest["calibration"]["nsamples"] == 4
    assert run("verify", out) == 0
    assert "OK, 6 pruned matrices" in capsys.readouterr().out
    # plain transformers, no dass involved
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r});"
        "w = m.model.layers[0].mlp.gate_proj.weight; print(float((w == 0).float().mean()))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(0.5)
    js = tmp_path / "eval.json"
    assert run("eval", out, "--ppl", tiny_dir / "text.txt", "--eval-seqlen", 64, "--json", js, "--quiet") == 0
    ppl = json.loads(js.read_text())["perplexity"]["ppl"]
    assert ppl > 1 and ppl == ppl
    # the input model's files were not touched
    assert not (tiny_dir / "model" / "dass.json").exists()


def test_verify_fails_on_denser_matrix(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "p"
    run("prune", tiny_dir / "model", "--method", "wanda", "--pattern", "4:8", "--output", out,
        "--calibration", tiny_dir / "text.txt", "--nsamples", 2, "--seqlen", 32, "--quiet")
    sd = load_file(out / "model.safetensors")
    w = sd["model.layers.1.mlp.down_proj.weight"]
    w[w == 0] = 1e-3
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert run("verify", out) == 1
    err = capsys.readouterr().err
    assert "down_proj" in err and "FAILED" in err


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--method", "nope"], "unknown method"),
        (["--pattern", "5:4"], "impossible N:M pattern"),
        (["--pattern", "1.2"], "must be in [0, 1)"),
        (["--calibration", "/no/such/file.txt"], "file.txt"),
        (["--alpha", "1", "--method", "wanda"], "--alpha applies to dass and dass-obs only, not to wanda"),
        (["--alpha", "big"], "alpha must be a number"),
        (["--alpha", "auto", "--method", "dass-obs"], "dass-obs: alpha must be a number"),
        (["--rescale", "down", "--method", "dass-obs"], "--rescale applies to dass and wanda only"),
        (["--rescale", "half"], "rescale must be one of none, down, all"),
        (["--method", "dass:alpha=auto,bogus=1"], "dass: unknown option 'bogus'"),
        (["--reconstruct", "steps=-1"], "reconstruct: steps must be >= 0"),
    ],
)
def test_bad_arguments_one_line_no_traceback(tiny_dir, tmp_path, extra, needle):
    argv = ["prune", str(tiny_dir / "model"), "--output", str(tmp_path / "o"), "--nsamples", "2", "--seqlen", "32",
            "--calibration", str(tiny_dir / "text.txt"), "--quiet", *extra]
    res = subprocess.run([sys.executable, "-m", "dass", *argv], capture_output=True, text=True)
    assert res.returncode == 2
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("dass: error:") and needle in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_and_existing_output(tiny_dir, tmp_path, capsys):
    assert run("prune", tmp_path / "nothing-here", "--output", tmp_path / "o", "--quiet") == 2
    assert "dass: error:" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert run("prune", tiny_dir / "model", "--output", tmp_path / "exists", "--quiet") == 2
    assert "already exists" in capsys.readouterr().err


def test_non_glu_model_under_dass(tmp_path, capsys, tiny_dir):
    from transformers import PhiConfig, PhiForCausalLM, AutoTokenizer

    cfg = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
    PhiForCausalLM(cfg).save_pretrained(tmp_path / "phi")
    AutoTokenizer.from_pretrained(tiny_dir / "model").save_pretrained(tmp_path / "phi")
    code = run("prune", tmp_path / "phi", "--method", "dass", "--output", tmp_path / "o",
               "--calibration", tiny_dir / "text.txt", "--nsamples", 2, "--seqlen", 32, "--quiet")
    assert code == 2
    err = capsys.readouterr().err
    assert "GLU" in err and "gate_proj/up_proj/down_proj" in err
    assert not (tmp_path / "o").exists()


def test_prune_auto_rescale_options_reach_the_manifest(tiny_dir, tmp_path):
    common = ["--calibration", tiny_dir / "text.txt", "--nsamples", 4, "--seqlen", 32, "--quiet"]
    opts = {}
    for tag, extra in (("auto", []), ("plain", ["--rescale", "none"]), ("fixed-all", ["--alpha", "1", "--rescale", "all"])):
        out = tmp_path / tag
        alpha = [] if tag == "fixed-all" else ["--alpha", "auto"]
        assert run("prune", tiny_dir / "model", "--pattern", "2:4", "--output", out, *alpha, *extra, *common) == 0
        opts[tag] = json.loads((out / "dass.json").read_text())["options"]
    assert opts["auto"]["alpha"] == "auto" and opts["auto"]["rescale"] == "down"  # auto's default
    assert opts["plain"]["alpha"] == "auto" and opts["plain"]["rescale"] == "none"  # not auto's default: recorded
    assert opts["fixed-all"]["alpha"] == 1.0 and opts["fixed-all"]["rescale"] == "all"


def test_compare_writes_table_json_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    # --alpha applies to the DaSS rows only (wanda and magnitude take no alpha)
    code = run("compare", tiny_dir / "model", "--methods", "dense,dass,wanda,magnitude", "--patterns", "2:4,0.5", "--alpha", "1",
               "--calibration", tiny_dir / "text.txt", "--nsamples", 4, "--seqlen", 32,
               "--ppl", tiny_dir / "text.txt", "--eval-seqlen", 64, "--out", out, "--quiet")
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [(r["method"], r["pattern"]) for r in rows] == [
        ("dense", None), ("dass", "2:4"), ("dass", "unstructured:0.5"), ("wanda", "2:4"),
        ("wanda", "unstructured:0.5"), ("magnitude", "2:4"), ("magnitude", "unstructured:0.5")]
    assert rows[0]["sparsity_pruned"] == 0
    # what the last bits of a result depend on is recorded beside it
    meta = data["meta"]
    assert meta["cpu"] and set(meta["versions"]) == {"dass", "torch", "transformers"}
    assert meta["versions"]["torch"] == torch.__version__ and meta["torch_threads"] == torch.get_num_threads()
    for r in rows[1:]:
        assert r["sparsity_pruned"] == pytest.approx(0.5)
        assert 0.3 < r["sparsity_decoder"] < 0.5  # attention stays dense under scope mlp
        assert r["ppl"] > 1
    assert "| dass | 2:4 |" in (out / "results.md").read_text()
    assert (out / "perplexity.png").stat().st_size > 1000
    assert "| method | pattern |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_accelerate_refuses_cleanly_without_gpu(tiny_dir, tmp_path):
    out = tmp_path / "p"
    assert run("prune", tiny_dir / "model", "--method", "wanda", "--output", out, "--calibration",
               tiny_dir / "text.txt", "--nsamples", 2, "--seqlen", 32, "--quiet") == 0
    res = subprocess.run([sys.executable, "-m", "dass", "eval", str(out), "--accelerate", "--device", "cpu",
                          "--ppl", str(tiny_dir / "text.txt"), "--quiet"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("dass: error:") and "GPU" in res.stderr


def test_compress_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert run("prune", tiny_dir / "model", "--method", "dass", "--output", out, "--calibration",
               tiny_dir / "text.txt", "--nsamples", 2, "--seqlen", 32, "--quiet", "--compress") == 0
    assert (out / "model.dass-nm.safetensors").exists() and not (out / "model.safetensors").exists()
    assert run("verify", out) == 0
    js = tmp_path / "e.json"
    assert run("eval", out, "--ppl", tiny_dir / "text.txt", "--eval-seqlen", 64, "--json", js, "--quiet") == 0
    assert json.loads(js.read_text())["perplexity"]["ppl"] > 1


def test_prune_stream_equals_in_memory(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    common = ["--method", "sparsegpt", "--pattern", "2:4", "--calibration", tiny_dir / "text.txt",
              "--nsamples", 4, "--seqlen", 32, "--quiet", "--device", "cpu"]
    assert run("prune", tiny_dir / "model", "--output", tmp_path / "mem", *common) == 0
    assert run("prune", tiny_dir / "model", "--output", tmp_path / "str", "--stream", *common) == 0
    assert run("verify", tmp_path / "str") == 0
    mem = load_file(tmp_path / "mem" / "model.safetensors")
    streamed = {}
    for f in (tmp_path / "str").glob("*.safetensors"):
        streamed.update(load_file(f))
    for k, v in mem.items():
        if k in streamed:
            assert torch.equal(v, streamed[k]), k
    assert {k for k in mem if "layers" in k} <= set(streamed)


def test_torchrun_two_processes(tiny_dir, tmp_path):
    """The documented launcher: torchrun -m dass prune, gloo on CPU; rank 0 writes. Equal
    bits need equal thread counts: the workers and the reference run with one thread."""
    from safetensors.torch import load_file

    common = ["--method", "dass", "--pattern", "2:4", "--calibration", str(tiny_dir / "text.txt"),
              "--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--quiet", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run("prune", tiny_dir / "model", "--output", tmp_path / "one", *common) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_port()), "-m", "dass", "prune", str(tiny_dir / "model"), "--output", str(tmp_path / "two"),
                          *common], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((tmp_path / "two" / "dass.json").read_text())["world_size"] == 2


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compare_reconstructed_row_and_prune_reconstruct(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    code = run("compare", tiny_dir / "model", "--methods", "dense,wanda,wanda+reconstruct", "--patterns", "2:4",
               "--reconstruct", "steps=30,lr=0.01,batch_tokens=64", "--calibration", tiny_dir / "text.txt",
               "--nsamples", 4, "--seqlen", 32, "--ppl", tiny_dir / "text.txt", "--eval-seqlen", 64, "--out", out, "--quiet")
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "wanda", "wanda+reconstruct"]
    assert rows[1]["reconstruct"] is None and rows[2]["reconstruct"]["steps"] == 30
    blocks = rows[2]["report"]["blocks"]
    assert blocks and all(b["loss_after"] < b["loss_before"] for b in blocks)
    # dass prune --reconstruct records the settings and the blocks in the manifest
    p = tmp_path / "p"
    assert run("prune", tiny_dir / "model", "--method", "wanda", "--output", p, "--reconstruct", "steps=10",
               "--calibration", tiny_dir / "text.txt", "--nsamples", 4, "--seqlen", 32, "--quiet") == 0
    manifest = json.loads((p / "dass.json").read_text())
    assert manifest["reconstruct"]["steps"] == 10 and len(manifest["blocks"]) == 2
    assert run("verify", p) == 0
