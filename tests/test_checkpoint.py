"""Manifest, atomic save and verification of pruned checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dass
from dass.io.checkpoint import (
    CheckpointError,
    atomic_directory,
    build_manifest,
    read_manifest,
    save_pruned,
    verify_checkpoint,
)
from tiny import calib, tiny_model


def pruned(arch="llama", method="dass", pattern="2:4"):
    model = tiny_model(arch)
    report = dass.prune(model, method, pattern, calibration=calib(), progress=False)
    return model, report


def test_manifest_matches_weights(tmp_path):
    model, report = pruned()
    manifest = build_manifest(report, calibration={"source": "ids", "nsamples": 6})
    out = save_pruned(model, None, tmp_path / "ckpt", manifest)
    m = read_manifest(out)
    assert m["method"] == "dass" and m["pattern"] == "2:4" and m["options"] == {"alpha": 0.5}
    assert {"dass", "torch", "transformers"} <= set(m["versions"])
    sd = load_file(out / "model.safetensors")
    for key, e in m["matrices"].items():
        w = sd[e["name"]]
        assert list(w.shape) == e["shape"]
        assert float((w == 0).float().mean()) == pytest.approx(e["sparsity"])
        assert e["orientation"] == ("output" if e["role"] in ("gate", "up") else "input")
    res = verify_checkpoint(out)
    assert res.ok and res.checked == 6


@pytest.mark.parametrize("arch", ["phi3", "mixtral"])
def test_verify_fused_and_expert_matrices(tmp_path, arch):
    model, report = pruned(arch)
    out = save_pruned(model, None, tmp_path / "c", build_manifest(report))
    res = verify_checkpoint(out)
    assert res.ok, res.problems
    assert res.checked == len(report.matrices)


def _corrupt(path, name, fn):
    sd = load_file(path / "model.safetensors")
    sd[name] = fn(sd[name].clone())
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_verify_catches_denser_matrix(tmp_path):
    model, report = pruned()
    out = save_pruned(model, None, tmp_path / "c", build_manifest(report))

    def densify(w):
        w[w == 0] = 0.01  # every weight back
        return w

    _corrupt(out, "model.layers.1.mlp.up_proj.weight", densify)
    res = verify_checkpoint(out)
    assert not res.ok
    assert any("up_proj" in p and "output dimension" in p for p in res.problems)


def test_verify_catches_single_group_violation(tmp_path):
    model, report = pruned(method="wanda")
    out = save_pruned(model, None, tmp_path / "c", build_manifest(report))

    def one_more(w):
        row = w[0, :4]
        row[row == 0] = 1.0  # one group of the first row now holds 4 nonzeros
        return w

    _corrupt(out, "model.layers.0.mlp.down_proj.weight", one_more)
    res = verify_checkpoint(out)
    assert len(res.problems) >= 1 and any("1 group(s)" in p for p in res.problems)


def test_verify_without_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="no dass.json"):
        verify_checkpoint(tmp_path)


def test_refuses_existing_output_and_overwrites_only_dass_outputs(tmp_path):
    model, report = pruned()
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        save_pruned(model, None, out, build_manifest(report))
    with pytest.raises(CheckpointError, match="not a dass output"):  # a user's folder, whatever the flag
        save_pruned(model, None, out, build_manifest(report), overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    save_pruned(model, None, out, build_manifest(report), overwrite=True)  # empty: replaced
    first = read_manifest(out)
    save_pruned(model, None, out, build_manifest(report), overwrite=True)  # dass's own: replaced
    assert read_manifest(out)["created"] >= first["created"] and verify_checkpoint(out).ok
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary, no lock file left


def test_interrupted_save_leaves_no_directory(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_reload_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, report = pruned()
    out = save_pruned(model, None, tmp_path / "c", build_manifest(report))
    again = AutoModelForCausalLM.from_pretrained(out)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    ids = calib()[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)
    assert json.loads((out / "dass.json").read_text())["format"] == "dass/1"


@pytest.mark.parametrize("arch,method,pattern", [("llama", "dass", "2:4"), ("llama", "wanda", "4:8"), ("phi3", "dass", "2:4")])
def test_compressed_checkpoint_round_trip(tmp_path, arch, method, pattern):
    from dass.io.checkpoint import compress_checkpoint, is_compressed, load_pruned_model

    model, report = pruned(arch, method, pattern)
    out = save_pruned(model, None, tmp_path / "dense", build_manifest(report))
    comp = compress_checkpoint(out, tmp_path / "small")
    assert is_compressed(comp) and not (comp / "model.safetensors").exists()
    info = read_manifest(comp)["compressed"]
    if arch == "llama":  # 16-bit-free fp32 tiny model: values (N/M) + 1 bit per weight
        assert info["pruned_ratio"] <= pattern_ratio(pattern)
    again = load_pruned_model(comp)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert verify_checkpoint(comp).ok


def pattern_ratio(pattern):
    n, m = map(int, pattern.split(":"))
    return n / m + 1 / 32 + 1e-9  # fp32 values kept + one mask bit per weight


def test_compressed_checkpoint_refuses_corruption(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dass.io.checkpoint import COMPRESSED_FILE, compress_checkpoint, load_pruned_model

    model, report = pruned()
    comp = compress_checkpoint(save_pruned(model, None, tmp_path / "d", build_manifest(report)), tmp_path / "c")
    path = comp / COMPRESSED_FILE
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".nm_mask"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] ^= 0b1  # one bit of one mask flipped: a group no longer keeps exactly N
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=key.rsplit(".", 1)[0].split(".weight")[0]):
        load_pruned_model(comp)
