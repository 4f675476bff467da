"""Nothing silently wrong: ``dass verify`` catches every change to what dass wrote, names it,
and still reads checkpoints whose manifests predate the content hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dass.io.checkpoint import COMPRESSED_FILE, verify_checkpoint
from dass.io.hashing import hash_file
from dass.io.manifest import SELF_HASH, manifest_digest
from tiny_ckpt import cli, one_line_error, save_model, save_text

GATE = "model.layers.0.mlp.gate_proj.weight"
ATTN = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Pruned checkpoints to copy and damage: 2:4 (also compressed) and unstructured 0.5."""
    root = tmp_path_factory.mktemp("v")
    save_model(root / "model")
    save_text(root / "text.txt")
    common = ["--calibration", root / "text.txt", "--nsamples", 4, "--seqlen", 32, "--quiet", "--method", "wanda"]
    for name, pattern in (("nm", "2:4"), ("unstructured", "0.5")):
        assert cli("prune", root / "model", "--output", root / name, "--pattern", pattern, *common).returncode == 0
    assert cli("compress", root / "nm", "--output", root / "compressed").returncode == 0
    return root


def _copy(pruned: Path, name: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(pruned / name, dst)
    return dst


def _edit(ckpt: Path, name: str, fn, file: str = "model.safetensors") -> None:
    sd = load_file(ckpt / file)
    sd[name] = fn(sd[name].clone())
    save_file(sd, ckpt / file, metadata={"format": "pt"})


def _problems(ckpt: Path) -> str:
    res = verify_checkpoint(ckpt)
    assert not res.ok
    return "\n".join(res.problems)


def _nth_kept(w: torch.Tensor, n: int = 0) -> tuple[int, int]:
    idx = (w != 0).nonzero()[n]
    return int(idx[0]), int(idx[1])


def test_untouched_checkpoints_verify_with_content(pruned):
    for name in ("nm", "unstructured", "compressed"):
        res = verify_checkpoint(pruned / name)
        assert res.ok and res.checked == 6 and not res.notes, (name, res.problems, res.notes)
        manifest = json.loads((pruned / name / "dass.json").read_text())
        assert manifest[SELF_HASH] == manifest_digest(manifest)
        assert all(e["nonzeros"] == e["shape"][0] * e["shape"][1] // 2 for e in manifest["matrices"].values())
        for file, entry in manifest["files"].items():
            assert hash_file(pruned / name / file) == entry  # sha256sum gives the same digest


@pytest.mark.parametrize("damage", ["nan", "scaled", "zeroed", "attention", "revived"])
def test_changed_weights_are_named(pruned, tmp_path, damage):
    ckpt = _copy(pruned, "nm", tmp_path / "c")
    if damage == "nan":
        _edit(ckpt, GATE, lambda w: w.index_put_((torch.tensor(_nth_kept(w)[0]), torch.tensor(_nth_kept(w)[1])), torch.tensor(float("nan"))))
    elif damage == "scaled":
        _edit(ckpt, GATE, lambda w: w.mul_(-1000))
    elif damage == "zeroed":
        _edit(ckpt, GATE, lambda w: w.zero_())
    elif damage == "attention":
        _edit(ckpt, ATTN, lambda w: w.add_(0.01))
    else:  # one pruned weight back, the pattern still holds elsewhere
        _edit(ckpt, GATE, lambda w: w.index_put_((torch.tensor(0), torch.tensor(int((w[0] == 0).nonzero()[0]))), torch.tensor(0.5)))
    text = _problems(ckpt)
    assert "model.safetensors: content differs" in text
    assert (ATTN if damage == "attention" else GATE) in text
    if damage == "nan":
        assert "NaN or infinite" in text
    if damage in ("zeroed", "revived"):
        assert "nonzero weights, the manifest records" in text


def test_one_revived_weight_fails_even_with_the_hashes_redone(pruned, tmp_path):
    """The exact nonzero count is checked on its own: one weight revived in an unstructured
    matrix (a fraction far below any tolerance), with the file hashes recomputed as a
    careless tool would, still fails."""
    ckpt = _copy(pruned, "unstructured", tmp_path / "c")
    _edit(ckpt, GATE, lambda w: w.index_put_((torch.tensor(0), torch.tensor(int((w[0] == 0).nonzero()[0]))), torch.tensor(0.5)))
    manifest = json.loads((ckpt / "dass.json").read_text())
    manifest["files"]["model.safetensors"] = hash_file(ckpt / "model.safetensors")
    manifest[SELF_HASH] = manifest_digest(manifest)
    (ckpt / "dass.json").write_text(json.dumps(manifest))
    res = verify_checkpoint(ckpt)
    assert f"{GATE}: {64 * 32 // 2 + 1} nonzero weights, the manifest records {64 * 32 // 2}" in res.problems
    assert all(p.startswith(GATE) for p in res.problems)  # nothing else: the hashes were redone


@pytest.mark.parametrize("edit", ["sparsity", "deleted entry", "deleted file hash"])
def test_edited_manifest(pruned, tmp_path, edit):
    ckpt = _copy(pruned, "nm", tmp_path / "c")
    manifest = json.loads((ckpt / "dass.json").read_text())
    if edit == "sparsity":
        manifest["matrices"][GATE]["sparsity"] = 0.25
    elif edit == "deleted entry":
        del manifest["matrices"][GATE]
    else:
        del manifest["files"]["config.json"]
    (ckpt / "dass.json").write_text(json.dumps(manifest, indent=2))
    assert "dass.json: edited after dass wrote it" in _problems(ckpt)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_compressed_values_byte_flipped(pruned, tmp_path):
    ckpt = _copy(pruned, "compressed", tmp_path / "c")
    path = ckpt / COMPRESSED_FILE
    key = GATE + ".nm_values"
    n = int.from_bytes(path.read_bytes()[:8], "little")
    begin = json.loads(path.read_bytes()[8 : 8 + n])[key]["data_offsets"][0]
    _flip(path, 8 + n + begin + 2)
    text = _problems(ckpt)
    assert f"{COMPRESSED_FILE}: content differs" in text and key in text


def test_compressed_header_byte_flipped(pruned, tmp_path):
    ckpt = _copy(pruned, "compressed", tmp_path / "c")
    _flip(ckpt / COMPRESSED_FILE, 9)  # inside the JSON header: no longer valid JSON
    text = _problems(ckpt)
    assert COMPRESSED_FILE in text and "corrupt safetensors header" in text
    res = cli("verify", ckpt)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "FAILED" in res.stderr
    line = one_line_error(cli("eval", ckpt, "--ppl", pruned / "text.txt", "--eval-seqlen", 32, "--quiet"))
    assert "corrupt safetensors header" in line


def test_deleted_shard_of_a_streamed_checkpoint(pruned, tmp_path):
    out = tmp_path / "s"
    assert cli("prune", pruned / "model", "--output", out, "--stream", "--method", "magnitude", "--quiet").returncode == 0
    assert verify_checkpoint(out).ok
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert f"{shard.name}: missing" in _problems(out)


def test_old_manifest_without_hashes_still_verifies(pruned, tmp_path):
    ckpt = _copy(pruned, "nm", tmp_path / "c")
    manifest = json.loads((ckpt / "dass.json").read_text())
    for key in ("files", SELF_HASH):
        manifest.pop(key)
    for entry in manifest["matrices"].values():
        entry.pop("nonzeros")
    (ckpt / "dass.json").write_text(json.dumps(manifest, indent=2))
    res = cli("verify", ckpt)
    assert res.returncode == 0 and "OK, 6 pruned matrices" in res.stdout
    assert "note: no content hashes recorded" in res.stderr
    _edit(ckpt, GATE, lambda w: w.masked_fill_(w == 0, 1e-3))  # denser: still caught, as before
    assert cli("verify", ckpt).returncode == 1


def test_cli_names_what_changed(pruned, tmp_path):
    ckpt = _copy(pruned, "nm", tmp_path / "c")
    _edit(ckpt, ATTN, lambda w: w.mul_(2))
    res = cli("verify", ckpt)
    assert res.returncode == 1
    assert f"model.safetensors: content differs from what dass wrote (tensors changed: {ATTN})" in res.stderr
    assert "FAILED, 1 problem(s)" in res.stderr


def test_compress_refuses_a_changed_checkpoint(pruned, tmp_path):
    ckpt = _copy(pruned, "nm", tmp_path / "c")
    _edit(ckpt, ATTN, lambda w: w.mul_(2))
    line = one_line_error(cli("compress", ckpt, "--output", tmp_path / "z"))
    assert "changed since dass wrote it (model.safetensors)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
