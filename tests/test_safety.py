"""Nothing lost: --overwrite replaces only dass outputs, one run per output, resume keyed by
the source's content, no leftovers, shared files readable. As a user hits it: the
``python -m dass`` command on tiny checkpoints in temporary folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dass.io import outputs
from dass.io.checkpoint import atomic_directory, verify_checkpoint
from tiny_ckpt import ENV, cli, dass, one_line_error, save_model, save_text

ARGS = ["--method", "wanda", "--nsamples", "4", "--seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A model folder and a calibration text."""
    root = tmp_path_factory.mktemp("ws")
    save_model(root / "model")
    save_text(root / "text.txt")
    return root


def _prune(ws, out, *extra, cwd=None, child=False):
    """``dass prune`` of the workspace's model (in a child process if ``child``)."""
    run = dass if child else cli
    return run("prune", ws / "model", "--output", out, "--calibration", ws / "text.txt", *ARGS, *extra, cwd=cwd)


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ 1. --overwrite


def test_overwrite_refuses_a_user_folder(ws, tmp_path):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "important.txt").write_text("mine")
    line = one_line_error(_prune(ws, user, "--overwrite", child=True))
    assert "not a dass output" in line
    assert (user / "important.txt").read_text() == "mine" and _siblings(tmp_path) == ["userdir"]


def test_overwrite_refuses_a_folder_holding_the_source(ws, tmp_path):
    proj = tmp_path / "proj"
    save_model(proj / "models" / "llama")
    (proj / "notes.txt").write_text("mine")
    res = cli("prune", proj / "models" / "llama", "--output", proj, "--overwrite", "--calibration", ws / "text.txt", *ARGS)
    assert "contains the source model" in one_line_error(res)
    assert (proj / "notes.txt").is_file() and (proj / "models" / "llama" / "model.safetensors").is_file()
    assert "contains the source model" in one_line_error(_prune(ws, ws / "model", "--overwrite", "--stream"))


def test_overwrite_refuses_the_current_directory(ws, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    (here / "a.txt").write_text("mine")
    line = one_line_error(_prune(ws, ".", "--overwrite", cwd=here))
    assert "current directory" in line
    assert _siblings(here) == ["a.txt"] and _siblings(tmp_path) == ["here"]


def test_overwrite_replaces_a_dass_output_but_not_files_added_to_it(ws, tmp_path):
    out = tmp_path / "out"
    assert _prune(ws, out).returncode == 0
    first = json.loads((out / "dass.json").read_text())["created"]
    assert "already exists" in one_line_error(_prune(ws, out, "--pattern", "4:8"))
    (out / "eval.json").write_text("{}")  # the user's file inside the output
    assert "did not write (eval.json)" in one_line_error(_prune(ws, out, "--overwrite"))
    (out / "eval.json").unlink()
    res = _prune(ws, out, "--overwrite", "--pattern", "4:8")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "dass.json").read_text())
    assert manifest["pattern"] == "4:8" and manifest["created"] >= first
    assert verify_checkpoint(out).ok and _siblings(tmp_path) == ["out"]  # nothing aside, no lock


def test_a_file_is_never_replaced(ws, tmp_path):
    (tmp_path / "out").write_text("mine")
    assert "not a folder" in one_line_error(_prune(ws, tmp_path / "out", "--overwrite"))
    assert (tmp_path / "out").read_text() == "mine" and _siblings(tmp_path) == ["out"]


def test_final_rename_rechecks_the_output(tmp_path):
    """An output that appears while a run works is not replaced without overwrite."""
    out = tmp_path / "out"
    with pytest.raises(outputs.OutputError, match="appeared"):
        with atomic_directory(out) as tmp:
            (tmp / "dass.json").write_text("{}")
            out.mkdir()
            (out / "theirs.txt").write_text("x")
    assert _siblings(out) == ["theirs.txt"] and _siblings(tmp_path) == ["out"]


# ------------------------------------------------------------------ 2. one run per output


def _wait_for_holder(lock: Path, proc: subprocess.Popen) -> None:
    """Until ``proc`` holds the lock (it writes its record after taking it)."""
    while not (lock.is_file() and lock.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.002)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_two_runs_on_one_output(ws, tmp_path, mode):
    """The first run is frozen (SIGSTOP) while it holds the output: the second fails at
    once, naming it; the first then finishes and its output verifies."""
    out = tmp_path / "out"
    extra = ["--stream"] if mode == "stream" else []
    argv = [sys.executable, "-m", "dass", "prune", str(ws / "model"), "--output", str(out), "--calibration",
            str(ws / "text.txt"), *ARGS, "--pattern", "2:4", *extra]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_holder(tmp_path / ".out.lock", first)
        first.send_signal(signal.SIGSTOP)
        second = _prune(ws, out, "--pattern", "4:8", *extra)
        line = one_line_error(second)
        assert "being written by another dass run" in line and f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((out / "dass.json").read_text())["pattern"] == "2:4"
    assert verify_checkpoint(out).ok
    assert _siblings(tmp_path) == ["out"]  # no partial, no lock file


def test_a_killed_runs_lock_file_does_not_block(ws, tmp_path):
    (tmp_path / ".out.lock").write_text("pid 999999 on elsewhere: dass prune ...")  # its holder is gone
    assert _prune(ws, tmp_path / "out").returncode == 0
    assert _siblings(tmp_path) == ["out"]


def test_lock_is_exclusive_and_reentrant(tmp_path):
    out = tmp_path / "o"
    with outputs.claim(out):
        with outputs.claim(out):  # the CLI and the library code it calls
            other = outputs.OutputLock(outputs.resolve(out))  # another open file: another run's view
            with pytest.raises(outputs.OutputLockedError, match=f"pid {os.getpid()}"):
                other.acquire()
        assert (tmp_path / ".o.lock").is_file()
    assert not (tmp_path / ".o.lock").exists()
    other.acquire()  # free again
    other.release()
    assert _siblings(tmp_path) == []


# ------------------------------------------------------------------ 3. resume keyed by content

RUN = """
import os, sys
from dass.run.streaming import prune_checkpoint
from tiny import calib

def crash(layer):  # a simulated crash after layer 2's shard is written
    if layer == 2:
        os._exit(17)

prune_checkpoint(sys.argv[1], sys.argv[2], "sparsegpt", "2:4", "mlp", calib(6, 24), batch_size=4, progress=False,
                 checkpoint_seconds=0, after_layer=crash)
"""


def _killed_run(src: Path, out: Path) -> None:
    res = subprocess.run([sys.executable, "-c", RUN, str(src), str(out)], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 17, res.stderr[-2000:]


def _stream(src, out, **kw):
    from dass.run.streaming import prune_checkpoint
    from tiny import calib

    return prune_checkpoint(src, out, "sparsegpt", "2:4", "mlp", calib(6, 24), batch_size=4, progress=False,
                            checkpoint_seconds=0, **kw)


@pytest.mark.parametrize("change", ["another model", "one done layer"])
def test_resume_refuses_a_changed_source(tmp_path, change):
    """Between the kill and the resume the source is replaced by another model of the same
    config (same file sizes), or one weight of a layer already done is changed."""
    from safetensors.torch import load_file, save_file

    from dass.run.resume import ResumeError

    src = save_model(tmp_path / "src", num_hidden_layers=4)
    _killed_run(src, tmp_path / "out")
    sizes = {p.name: p.stat().st_size for p in src.iterdir()}
    if change == "another model":
        save_model(tmp_path / "other", seed=1, num_hidden_layers=4)
        os.replace(tmp_path / "other" / "model.safetensors", src / "model.safetensors")
    else:
        sd = load_file(src / "model.safetensors")
        sd["model.layers.0.self_attn.q_proj.weight"][0, 0] += 1.0
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    assert {p.name: p.stat().st_size for p in src.iterdir()} == sizes
    with pytest.raises(ResumeError, match="different settings.*source weights") as exc:
        _stream(src, tmp_path / "out")
    assert "\n" not in str(exc.value)  # the CLI's one line
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()
    rep = _stream(src, tmp_path / "out", resume=False)  # --no-resume: a clean start
    assert not any("resumed" in n for n in rep.notes) and verify_checkpoint(tmp_path / "out").ok
    assert _siblings(tmp_path) == (["other"] if change == "another model" else []) + ["out", "src"]


# ------------------------------------------------------------------ 6. leftovers and permissions


def test_stale_temporaries_of_killed_runs_are_removed(ws, tmp_path):
    out = tmp_path / "out"
    assert _prune(ws, out).returncode == 0
    (tmp_path / ".out.tmp-1a2b3c4d").mkdir()  # a killed save
    (tmp_path / ".out.tmp-1a2b3c4d" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".out.old-deadbeef").mkdir()  # a killed overwrite after its second rename
    (tmp_path / ".other.tmp-1a2b3c4d").mkdir()  # not this output's: left alone
    (tmp_path / ".out.tmp-keep").mkdir()  # not dass's naming: left alone
    assert _prune(ws, out, "--overwrite").returncode == 0
    assert _siblings(tmp_path) == [".other.tmp-1a2b3c4d", ".out.tmp-keep", "out"]


def test_an_overwrite_killed_between_its_renames_is_restored(ws, tmp_path):
    out = tmp_path / "out"
    assert _prune(ws, out).returncode == 0
    os.replace(out, tmp_path / ".out.old-0badf00d")  # killed after moving the old output aside
    assert "already exists" in one_line_error(_prune(ws, out))  # the old output is back
    assert verify_checkpoint(out).ok and _siblings(tmp_path) == ["out"]


def test_outputs_and_cache_files_are_readable_like_their_folder(tmp_path, monkeypatch):
    import transformers as tf

    from dass.io import models
    from dass.io.data import tokenize_text
    from tiny_ckpt import tokenizer

    out = tmp_path / "ws"
    save_model(out / "model")
    save_text(out / "text.txt")
    assert _prune(out, out / "pruned").returncode == 0
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in (out / "pruned").iterdir()} == {
        p.name: 0o666 & ~mask for p in (out / "pruned").iterdir()}

    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o775)  # a cache shared by a group
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=128))
    monkeypatch.setattr(models, "_load_gguf", lambda d, n, dtype=None: (model, tokenizer()))
    models._convert_gguf(tmp_path / "fake.gguf", cache / "conv")
    assert {p.stat().st_mode & 0o777 for p in (cache / "conv").iterdir()} == {0o664}
    assert (cache / "conv").stat().st_mode & 0o777 == 0o775
    monkeypatch.setenv("DASS_CACHE", str(cache))
    (cache / "tokens").mkdir(mode=0o775)
    (cache / "tokens").chmod(0o775)
    tokenize_text(tokenizer(), "w1 w2 w3", cache=True)
    assert {p.stat().st_mode & 0o777 for p in (cache / "tokens").iterdir()} == {0o664}
