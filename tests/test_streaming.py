"""Streaming a checkpoint from disk: same weights as in memory, bounded memory, resumable."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dass
from dass.io.checkpoint import CheckpointError, verify_checkpoint
from dass.run.resume import ResumeError
from dass.run.streaming import StreamingError, parameters_on_meta, prune_checkpoint
from tiny import calib, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}


def _save(model, path, shard="40KB", shards=3):
    model.save_pretrained(path, max_shard_size=shard)
    assert len(list(Path(path).glob("*.safetensors"))) >= shards  # several shards
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    "arch,method,scope",
    [
        ("llama", "dass", "mlp"),
        ("llama", "sparsegpt", "all"),
        ("gemma3", "dass", "mlp"),  # tied embeddings, sliding/global layers
        ("phi3", "wanda", "mlp"),  # fused gate_up_proj
        ("olmo2", "sparsegpt", "mlp"),
    ],
)
def test_streaming_equals_in_memory(tmp_path, arch, method, scope):
    src = _save(tiny_model(arch, num_hidden_layers=3), tmp_path / "src")
    ids = calib(6, 24)
    rep = prune_checkpoint(src, tmp_path / "out", method, "2:4", scope, ids, batch_size=4, progress=False)
    ref = _load(src)
    rep_ref = dass.prune(ref, method, "2:4", scope, calibration=ids, batch_size=4, progress=False)
    got = _load(tmp_path / "out")  # plain transformers loading
    want = ref.state_dict()
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert [m.__dict__ for m in rep.matrices] == [m.__dict__ for m in rep_ref.matrices]
    assert verify_checkpoint(tmp_path / "out").ok
    manifest = json.loads((tmp_path / "out" / "dass.json").read_text())
    assert manifest["streaming"] is True and len(manifest["matrices"]) == len(rep.matrices)
    assert not (tmp_path / "out.partial").exists()
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_output_is_not_overwritten(tmp_path):
    src = _save(tiny_model("llama"), tmp_path / "src")
    ids = calib(4, 16)
    prune_checkpoint(src, tmp_path / "out", "wanda", "2:4", "mlp", ids, progress=False)
    before = (tmp_path / "out" / "model.safetensors.index.json").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        prune_checkpoint(src, tmp_path / "out", "dass", "2:4", "mlp", ids, progress=False)
    assert (tmp_path / "out" / "model.safetensors.index.json").read_bytes() == before
    prune_checkpoint(src, tmp_path / "out", "dass", "4:8", "mlp", ids, progress=False, overwrite=True)
    assert json.loads((tmp_path / "out" / "dass.json").read_text())["pattern"] == "4:8"


def test_magnitude_streams_without_calibration(tmp_path):
    src = _save(tiny_model("qwen2"), tmp_path / "src")
    rep = prune_checkpoint(src, tmp_path / "out", "magnitude", "0.5", "all", None, progress=False)
    ref = _load(src)
    dass.prune(ref, "magnitude", "0.5", "all", calibration=None, progress=False)
    got = _load(tmp_path / "out").state_dict()
    assert all(torch.equal(v, got[k]) for k, v in ref.state_dict().items())
    assert rep.sparsity == pytest.approx(0.5)


def test_bf16_output_dtype(tmp_path):
    src = _save(tiny_model("llama"), tmp_path / "src")
    prune_checkpoint(src, tmp_path / "out", "dass", "2:4", "mlp", calib(4, 16), dtype=torch.bfloat16, progress=False)
    model = _load(tmp_path / "out")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_converted_checkpoints_are_refused(tmp_path):
    """transformers 5 stores Mixtral's fused experts per expert and converts on load."""
    src = _save(tiny_model("mixtral"), tmp_path / "src", shards=1)
    with pytest.raises(StreamingError, match="in memory"):
        prune_checkpoint(src, tmp_path / "out", "dass", "2:4", "mlp", calib(4, 16), progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ resume

RUN = textwrap.dedent(
    """
    import os, sys
    from dass.run.streaming import prune_checkpoint
    from tiny import calib
    src, out, method, die = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def crash(layer):  # a simulated crash after that layer's shard is written, before the state
        if layer == die:
            os._exit(17)

    prune_checkpoint(src, out, method, "2:4", "mlp", calib(6, 24), batch_size=4, progress=False, checkpoint_seconds=0,
                     after_layer=crash)
    """
)


def _run(args, die_after: int):
    """A streaming run in a child process that dies after layer ``die_after``."""
    return subprocess.run([sys.executable, "-c", RUN, *map(str, args), str(die_after)], env=ENV,
                          capture_output=True, text=True, timeout=300)


def _stream(src, out, method, **kw):
    return prune_checkpoint(src, out, method, "2:4", "mlp", calib(6, 24), batch_size=4, progress=False,
                            checkpoint_seconds=0, **kw)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.name != "dass.json"}


def test_kill_and_resume_is_byte_identical(tmp_path):
    method = "sparsegpt"  # weights updated too: any difference in the resumed state would show
    src = _save(tiny_model("llama", num_hidden_layers=4), tmp_path / "src")
    died = _run([src, tmp_path / "resumed", method], die_after=2)
    assert died.returncode == 17, died.stderr
    partial = tmp_path / "resumed.partial"
    assert partial.is_dir() and not (tmp_path / "resumed").exists()
    state = json.loads((partial / ".dass-resume" / "state.json").read_text())
    assert state["next_layer"] == 2  # layer 2's shard was written, its state was not
    rep = _stream(src, tmp_path / "resumed", method)
    assert "resumed at layer 2 of 4" in rep.notes
    _stream(src, tmp_path / "whole", method)
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        assert a[name] == b[name], name
    ma = json.loads((tmp_path / "whole" / "dass.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "dass.json").read_text())
    assert ma["matrices"] == mb["matrices"]
    assert not partial.exists()


def test_resume_refuses_other_settings(tmp_path):
    src = _save(tiny_model("llama", num_hidden_layers=3), tmp_path / "src")
    died = _run([src, tmp_path / "out", "dass"], die_after=1)
    assert died.returncode == 17
    with pytest.raises(ResumeError, match="different settings"):
        _stream(src, tmp_path / "out", "wanda")
    rep = _stream(src, tmp_path / "out", "wanda", resume=False)
    assert not any("resumed" in n for n in rep.notes)
    assert (tmp_path / "out" / "dass.json").is_file()


# ------------------------------------------------------------------------ memory

RSS = textwrap.dedent(
    """
    import json, sys, torch
    import dass, transformers
    from transformers import LlamaForCausalLM  # imports are a fixed cost: before the baseline
    from dass.run.memory import RSSSampler, rss_bytes
    from dass.run.streaming import prune_checkpoint
    torch.set_num_threads(2)
    ids = torch.randint(0, 8000, (4, 32), generator=torch.Generator().manual_seed(0))
    base = rss_bytes()
    # sampled, not ru_maxrss: a child started by vfork+exec inherits its parent's peak RSS
    with RSSSampler(0.005) as rss:
        prune_checkpoint(sys.argv[1], sys.argv[2], "wanda", "2:4", "mlp", ids, batch_size=4, progress=False)
    print(json.dumps({"base": base, "peak": rss.peak}))
    """
)


def _random_checkpoint(path: Path, layers: int) -> tuple[int, int]:
    """A sharded Llama checkpoint (d 512, D 2048, 17 MB per layer, 64 MB shards) written
    tensor by tensor, never as a whole model; returns (total bytes, bytes of one layer)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, max_position_embeddings=256)
    with parameters_on_meta():
        skeleton = LlamaForCausalLM(cfg)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, total, layer_bytes = {}, {}, 0, 0, 0
    names = [(n, p.shape) for n, p in skeleton.named_parameters()]
    for idx, (name, shape) in enumerate(names):
        t = torch.randn(shape, generator=g) * 0.05 if len(shape) > 1 else torch.ones(shape)
        shard[name] = t
        size += t.numel() * 4
        total += t.numel() * 4
        if name.startswith("model.layers.0."):
            layer_bytes += t.numel() * 4
        if size > 64e6 or idx == len(names) - 1:
            fname = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size = {}, 0
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total, layer_bytes


# glibc's malloc raises its mmap threshold after the first large free and then serves
# tensors from heaps and per-thread arenas that it returns to the OS when it likes: the same
# 4-layer run peaked 34 MB or 82 MB above its baseline (anonymous memory) from one run to the
# next, enough to fail a 3-layer bound by chance (CI did). A fixed threshold puts every
# tensor over 1 MB in its own mapping that is unmapped on free, so the RSS follows the live
# tensors (same runs: 27-31 MB and 35 MB for 4 and 20 layers, three times each).
RSS_ENV = {**ENV, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _streaming_rss_growth(src: Path, out: Path) -> int:
    res = subprocess.run([sys.executable, "-c", RSS, str(src), str(out)], env=RSS_ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    return m["peak"] - m["base"]


def test_streaming_peak_rss_does_not_grow_with_the_model(tmp_path):
    """Streaming a 20-layer checkpoint (~370 MB) needs about the same peak RSS as streaming a
    4-layer one of the same width: the 16 extra layers (270 MB) may add at most 3 layers' worth.
    Comparing two sizes cancels the machine-dependent constant (the first use of the CPU
    kernels, allocator arenas, embeddings and head), which an absolute bound does not."""
    small_total, layer_bytes = _random_checkpoint(tmp_path / "small", 4)
    big_total, _ = _random_checkpoint(tmp_path / "big", 20)
    assert big_total > 350e6 and big_total - small_total > 15 * layer_bytes
    small = _streaming_rss_growth(tmp_path / "small", tmp_path / "out-small")
    big = _streaming_rss_growth(tmp_path / "big", tmp_path / "out-big")
    print(f"model {small_total / 1e6:.0f} MB -> RSS grew {small / 1e6:.0f} MB; "
          f"model {big_total / 1e6:.0f} MB -> RSS grew {big / 1e6:.0f} MB; layer {layer_bytes / 1e6:.0f} MB")
    assert big < 0.5 * big_total
    assert big - small < 3 * layer_bytes
