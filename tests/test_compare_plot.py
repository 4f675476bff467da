"""The compare plot says what was compared: model, patterns, calibration, evaluation."""

import pytest

from dass.evaluation.compare import bar_labels, plot, plot_title

ROWS = [
    {"method": "dense", "pattern": None, "ppl": 20.5},
    {"method": "dass", "pattern": "2:4", "ppl": 60.1},
    {"method": "wanda", "pattern": "2:4", "ppl": 80.2},
    {"method": "dass", "pattern": "4:8", "ppl": 40.3},
]
META = {
    "model": "default",
    "scope": "mlp",
    "calibration": {"source": "default", "nsamples": 16, "seqlen": 512, "seed": 0},
    "evaluation": {"ppl": "default", "seqlen": 512, "tokens": 16384, "zeroshot": [], "limit": None},
}


def test_plot_is_titled_with_model_patterns_calibration_and_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    title = plot(ROWS, tmp_path / "p.png", META)
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert title == plot_title(ROWS, META)
    for fact in ("SmolLM2-135M-Instruct", "2:4, 4:8", "scope mlp", "16 x 512 tokens", "embedded Wikipedia text",
                 "seed 0", "first 16,384 tokens of held-out embedded Wikipedia text", "512-token windows"):
        assert fact in title, fact


def test_title_for_a_local_model_and_all_evaluation_tokens():
    meta = {**META, "model": "/data/ckpt/llama-7b", "calibration": {**META["calibration"], "source": "/tmp/c4.jsonl"},
            "evaluation": {**META["evaluation"], "tokens": None, "seqlen": 2048, "ppl": "wikitext2"}}
    title = plot_title(ROWS[:2], meta)
    assert "llama-7b" in title and "c4.jsonl" in title and "all tokens of wikitext2 in 2048-token windows" in title
    assert "4:8" not in title


def test_bar_labels_name_the_dense_row_once():
    assert bar_labels(ROWS) == ["dense", "dass\n2:4", "wanda\n2:4", "dass\n4:8"]
    assert bar_labels([{"method": "dense", "pattern": None, "ppl": None}]) == []
