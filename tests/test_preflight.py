"""Pre-flight: every mistake a run would trip on later is refused before the model loads,
with one line (``dass: error: ...``), exit status 2, no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tiny_ckpt import cli, dass, one_line_error, save_model, save_text

CALIB = ["--nsamples", "2", "--seqlen", "32", "--quiet", "--method", "wanda"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    save_model(root / "model")
    save_text(root / "text.txt")
    return root


def _model_copy(ws: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ws / "model", tmp_path / "m"))


def _listing(folder: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(folder)): sorted(os.listdir(p)) for p in [folder, *folder.rglob("*")] if p.is_dir()}


def refused(run, tmp_path: Path, *argv, **kw) -> str:
    """The one error line of ``dass ARGV``; the folder ``tmp_path`` is unchanged."""
    before = _listing(tmp_path)
    line = one_line_error(run(*argv, **kw))
    assert _listing(tmp_path) == before, "something was left behind"
    return line


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ dass prune


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_gpu(ws, tmp_path):
    line = refused(cli, tmp_path, "prune", ws / "model", "-o", tmp_path / "o", "--calibration", ws / "text.txt", "--device", "cuda", *CALIB)
    assert "no CUDA GPU is available" in line


def test_unknown_device_child_process(ws, tmp_path):
    line = refused(dass, tmp_path, "prune", ws / "model", "-o", tmp_path / "o", "--calibration", ws / "text.txt", "--device", "tpu", *CALIB)
    assert "--device tpu" in line


@pytest.mark.parametrize("damage", ["truncated", "header byte", "trailing bytes"])
def test_damaged_safetensors(ws, tmp_path, damage):
    m = _model_copy(ws, tmp_path)
    f = m / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:-1000])
    elif damage == "header byte":
        _flip(f, 9)  # '{"' -> '{\x02'
    else:
        f.write_bytes(f.read_bytes() + b"\0" * 8)
    for extra in ([], ["--stream"]):
        line = refused(cli, tmp_path, "prune", m, "-o", tmp_path / "o", "--calibration", ws / "text.txt", *CALIB, *extra)
        assert "model.safetensors" in line and ("truncated" in line or "corrupt" in line or "trailing" in line)


def test_damaged_safetensors_child_process(ws, tmp_path):
    m = _model_copy(ws, tmp_path)
    (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000])
    assert "truncated" in refused(dass, tmp_path, "eval", m, "--ppl", ws / "text.txt", "--eval-seqlen", "32", "--quiet")


def test_garbage_config_under_stream_child_process(ws, tmp_path):
    m = _model_copy(ws, tmp_path)
    (m / "config.json").write_text("this is not json {")
    line = refused(dass, tmp_path, "prune", m, "-o", tmp_path / "o", "--stream", "--calibration", ws / "text.txt", *CALIB)
    assert "config.json is not valid JSON" in line


@pytest.mark.parametrize("config", [[1, 2], {"model_type": "no-such-model"}, {"hidden_size": 3}])
def test_configs_that_are_not_model_configs(ws, tmp_path, config):
    m = _model_copy(ws, tmp_path)
    (m / "config.json").write_text(json.dumps(config))
    line = refused(cli, tmp_path, "prune", m, "-o", tmp_path / "o", "--stream", "--calibration", ws / "text.txt", *CALIB)
    assert "config.json" in line


def test_not_a_model_folder(ws, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hello")
    for extra in ([], ["--stream"]):
        line = refused(cli, tmp_path, "prune", tmp_path / "docs", "-o", tmp_path / "o", "--calibration", ws / "text.txt", *CALIB, *extra)
        assert "not a model folder" in line


def test_pickle_weights_child_process(ws, tmp_path):
    from tiny import tiny_model

    m = tmp_path / "pickled"
    m.mkdir()
    model = tiny_model("llama")
    model.config.save_pretrained(m)
    torch.save(model.state_dict(), m / "pytorch_model.bin")  # what older tools and hubs hold
    shutil.copy(ws / "model" / "tokenizer.json", m)
    shutil.copy(ws / "model" / "tokenizer_config.json", m)
    assert (m / "pytorch_model.bin").is_file()
    line = refused(dass, tmp_path, "prune", m, "-o", tmp_path / "o", "--calibration", ws / "text.txt", *CALIB)
    assert "pickle" in line and "pytorch_model.bin" in line
    assert "pickle" in refused(cli, tmp_path, "prune", m, "-o", tmp_path / "o", "--stream", "--calibration", ws / "text.txt", *CALIB)
    assert "pickle" in refused(cli, tmp_path, "eval", m, "--ppl", ws / "text.txt", "--eval-seqlen", "32", "--quiet")


def test_seqlen_beyond_the_models_positions(ws, tmp_path):
    line = refused(cli, tmp_path, "prune", ws / "model", "-o", tmp_path / "o", "--calibration", ws / "text.txt",
                   "--method", "wanda", "--seqlen", "512", "--quiet")
    assert "--seqlen 512 exceeds the model's 256 positions" in line
    save_model(tmp_path / "gpt2", "gpt2")  # learned positions: an IndexError deep in the forward before
    line = refused(cli, tmp_path, "prune", tmp_path / "gpt2", "-o", tmp_path / "o", "--calibration", ws / "text.txt", "--method", "wanda", "--quiet")
    assert "--seqlen 2048 exceeds the model's 64 positions (n_positions" in line


@pytest.mark.parametrize("problem", ["not utf-8", "too short", "a folder", "empty", "bad jsonl"])
def test_calibration_text(ws, tmp_path, problem):
    text = tmp_path / ("c.jsonl" if problem == "bad jsonl" else "c.txt")
    if problem == "not utf-8":
        text.write_bytes(b"\xff\xfe w1 w2" * 100)
    elif problem == "too short":
        text.write_text("w1 w2 w3 w4 w5")
    elif problem == "a folder":
        text.mkdir()
    elif problem == "empty":
        text.write_text("\n")
    else:
        text.write_text('{"text": "w1"}\nnot json\n')
    line = refused(cli, tmp_path, "prune", ws / "model", "-o", tmp_path / "o", "--calibration", text, *CALIB)
    want = {"not utf-8": "not UTF-8", "too short": "has 5 tokens; need at least 33", "a folder": "is a folder",
            "empty": "is empty", "bad jsonl": "not valid JSON"}[problem]
    assert want in line


def test_output_cannot_be_written(ws, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = refused(cli, tmp_path, "prune", ws / "model", "-o", tmp_path / "afile" / "o", "--calibration", ws / "text.txt", *CALIB)
    assert "is not a folder" in line
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        line = refused(cli, tmp_path, "prune", ws / "model", "-o", tmp_path / "ro" / "o", "--calibration", ws / "text.txt", *CALIB)
        assert "not writable" in line


def test_counts(ws, tmp_path):
    base = ["prune", ws / "model", "-o", tmp_path / "o", "--calibration", ws / "text.txt", "--quiet"]
    assert "--nsamples must be at least 1" in refused(cli, tmp_path, *base, "--nsamples", "0")
    assert "--seqlen must be at least 1" in refused(cli, tmp_path, *base, "--seqlen", "0")
    assert "--batch-size must be at least 1" in refused(cli, tmp_path, *base, "--batch-size", "0")


# ------------------------------------------------------------------ dass eval, verify, compress


def test_eval_seqlen_zero_child_process(ws, tmp_path):
    line = refused(dass, tmp_path, "eval", ws / "model", "--ppl", ws / "text.txt", "--eval-seqlen", "0", "--quiet")
    assert "--eval-seqlen must be at least 1" in line


def test_eval_windows_and_outputs(ws, tmp_path):
    base = ["eval", ws / "model", "--ppl", ws / "text.txt", "--quiet"]
    assert "exceeds the model's 256 positions" in refused(cli, tmp_path, *base)  # the 2048 default
    assert "less than one --eval-seqlen window" in refused(cli, tmp_path, *base, "--eval-seqlen", "64", "--eval-tokens", "10")
    assert "--device tpu" in refused(cli, tmp_path, *base, "--eval-seqlen", "64", "--device", "tpu")
    (tmp_path / "f").write_text("x")
    assert "is not a folder" in refused(cli, tmp_path, *base, "--eval-seqlen", "64", "--json", tmp_path / "f" / "r.json")
    assert "has 6" in refused(cli, tmp_path, "eval", ws / "model", "--ppl", _short(tmp_path), "--eval-seqlen", "64", "--quiet")


def _short(tmp_path: Path) -> Path:
    p = tmp_path / "short.txt"
    p.write_text("w1 w2 w3 w4 w5 w6")
    return p


@pytest.fixture(scope="module")
def pruned(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "p"
    assert cli("prune", ws / "model", "-o", out, "--method", "magnitude", "--quiet").returncode == 0
    return out


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: [1, 2], "a JSON list, not an object"),
        (lambda m: {**m, "format": 7}, "not a dass manifest"),
        (lambda m: {**m, "matrices": [1]}, "'matrices' is not an object"),
        (lambda m: _entry(m, name=None), "has no 'name'"),
        (lambda m: _entry(m, shape="big"), "'shape' of two integers"),
        (lambda m: _entry(m, sparsity="half"), "'sparsity' between 0 and 1"),
        (lambda m: _entry(m, nonzeros=-3), "'nonzeros' that is not a non-negative integer"),
        (lambda m: {**m, "files": {"x": 1}}, "file entry 'x'"),
        (None, "is not valid JSON"),
    ],
)
def test_malformed_manifests(pruned, tmp_path, edit, needle):
    ckpt = Path(shutil.copytree(pruned, tmp_path / "c"))
    manifest = json.loads((ckpt / "dass.json").read_text())
    (ckpt / "dass.json").write_text("{ nope" if edit is None else json.dumps(edit(manifest)))
    assert needle in refused(dass if needle == "is not valid JSON" else cli, tmp_path, "verify", ckpt)
    assert needle in refused(cli, tmp_path, "compress", ckpt, "-o", tmp_path / "z")


def _entry(manifest: dict, **changes) -> dict:
    key = next(iter(manifest["matrices"]))
    entry = {k: v for k, v in manifest["matrices"][key].items() if changes.get(k, 0) is not None}
    entry.update({k: v for k, v in changes.items() if v is not None})
    manifest["matrices"][key] = entry
    return manifest


def test_verify_and_compress_of_a_non_checkpoint(ws, tmp_path):
    assert "no dass.json" in refused(cli, tmp_path, "verify", ws / "model")
    assert "not a folder" in refused(cli, tmp_path, "verify", ws / "text.txt")
    assert "no dass.json" in refused(cli, tmp_path, "compress", ws / "model")


def test_compress_output_rules(pruned, tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("mine")
    assert "not a dass output" in refused(cli, tmp_path, "compress", pruned, "-o", tmp_path / "user", "--overwrite")
    assert "contains the source model" in refused(cli, tmp_path, "compress", pruned, "-o", pruned.parent, "--overwrite")
