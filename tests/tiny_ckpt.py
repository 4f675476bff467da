"""Tiny checkpoints on disk, as a user has them (model + tokenizer + a text file), and the
``dass`` command line: in a child process (:func:`dass`, what a user runs, about 10 s of
imports on a busy 2-core machine) or in this process (:func:`cli`, the same ``main`` with
its output captured, for the many cases that need no second process)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}
WORDS = [f"w{i}" for i in range(120)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def gpt2_model(seed: int = 0, **extra):
    """A tiny GPT-2 (Conv1D projections, learned positions) from a config."""
    import transformers as tf

    cfg = tf.GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64,
                           "bos_token_id": 1, "eos_token_id": 2, **extra})
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def save_model(path: Path, arch: str = "llama", seed: int = 0, shard: str | None = None, **extra) -> Path:
    """A tiny model and its tokenizer saved to ``path`` (sharded when ``shard`` is given)."""
    model = gpt2_model(seed, **extra) if arch == "gpt2" else tiny_model(arch, seed=seed, **extra)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    tokenizer().save_pretrained(path)
    return path


def save_text(path: Path, words: int = 6000) -> Path:
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=g)))
    return path


def dass(*argv, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m dass ARGV`` in a child process."""
    return subprocess.run([sys.executable, "-m", "dass", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env={**ENV, **(env or {})}, timeout=timeout)


def cli(*argv, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``dass ARGV`` through :func:`dass.cli.main` in this process; an exception that is
    not a user error propagates (it would be a traceback for the user)."""
    from dass.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The single ``dass: error:`` line of a refused command (asserting it is one, exit 2)."""
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dass: error: "), res.stderr[-2000:]
    return lines[0]
