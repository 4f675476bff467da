"""``dass --alpha auto`` is safe by construction (issue 15): it keeps the paper's alpha
unless a candidate beats it on two disjoint halves of the kept rows by more than they
disagree and is not worse by the guard; it measures errors where the next layer reads the
block; the summary says what it chose; on a model with massive activations it is no worse
than alpha 0.5."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dass
from dass.core.alpha import (
    BlockView,
    RowErrors,
    candidate_row_errors,
    dass_glu_masks,
    decide_alpha,
    reduce_rows,
    select_alpha,
)
from dass.core.alpha_report import alpha_summary
from dass.core.patterns import parse_pattern
from dass.methods import get_method
from dass.methods.base import MethodError
from dass.run.layer import block_view
from tiny import calib, feature_stats, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from alpha_models import build_model, kl_to_dense, log_probs  # noqa: E402


def rows(errors: dict[float, list[float]], scale: list[float]) -> RowErrors:
    return RowErrors({a: torch.tensor(e) for a, e in errors.items()}, torch.tensor(scale), "test")


def test_a_clear_gain_on_both_halves_is_taken():
    # rows alternate between the halves; 1.0 halves the error on every row
    r = rows({0.5: [1.0, 1.0, 2.0, 2.0], 1.0: [0.5, 0.5, 1.0, 1.0]}, [10.0, 10.0, 10.0, 10.0])
    d = decide_alpha(r)
    assert d.alpha == 1.0 and d.reason == "gain"
    assert d.gain == pytest.approx(0.5) and d.noise == pytest.approx(0.0)


def test_weak_evidence_falls_back_to_the_paper_alpha():
    # 1.0 is better on all rows together, but the halves disagree about it by more than the gain
    r = rows({0.5: [1.0, 1.0, 1.0, 1.0], 1.0: [0.5, 0.97, 0.5, 0.97]}, [1.0] * 4)
    d = decide_alpha(r)
    assert d.proposed == 1.0
    assert d.alpha == 0.5 and d.reason == "weak evidence"
    assert 0 < d.gain < d.noise
    # a gain below MIN_GAIN is weak too, even where both halves agree
    r = rows({0.5: [1.0] * 4, 1.0: [0.995] * 4}, [1.0] * 4)
    assert decide_alpha(r).alpha == 0.5


def test_the_guard_keeps_a_candidate_that_wrecks_the_massive_rows_out():
    # row 0 is massive (scale 100): 2.0 is better per token on the small rows but loses most
    # of the massive row; "token" alone would take it, the "total" guard does not
    r = rows({0.5: [1.0, 1.0, 0.5, 0.5, 0.5, 0.5], 2.0: [30.0, 30.0, 0.1, 0.1, 0.1, 0.1]},
             [100.0, 100.0, 1.0, 1.0, 1.0, 1.0])
    assert reduce_rows(r.errors[2.0], r.scale, "token") < reduce_rows(r.errors[0.5], r.scale, "token")
    d = decide_alpha(r)
    assert d.proposed == 2.0 and d.alpha == 0.5 and d.reason == "guard"
    assert decide_alpha(r, guard=None).alpha == 2.0
    alpha, info = select_alpha(r, "min")
    assert alpha == 2.0 and "alpha_decision" not in info


def test_the_best_eligible_candidate_wins():
    # rows: light, light, heavy, heavy (each half has one of each)
    r = rows({0.5: [1.0, 1.0, 1.0, 1.0], 1.0: [0.6, 0.6, 0.6, 0.6], 2.0: [0.05, 0.05, 5.0, 5.0]}, [1.0, 1.0, 10.0, 10.0])
    d = decide_alpha(r)  # 2.0 has the lowest per-token error but is worse on the heavy rows
    assert d.proposed == 2.0 and d.alpha == 1.0 and d.reason == "gain"
    with pytest.raises(ValueError):
        decide_alpha(r, default=3.0)


@pytest.fixture
def glu():
    torch.manual_seed(0)
    d, D, T = 16, 32, 256
    x = torch.randn(T, d) * torch.linspace(0.3, 2, d)
    gate, up = torch.randn(D, d), torch.randn(D, d) * torch.linspace(0.1, 3, D).reshape(-1, 1)
    down = torch.randn(d, D)
    return gate, up, down, x


@pytest.mark.parametrize("with_post", [False, True])
def test_row_errors_at_the_next_layer_input_by_hand(glu, with_post):
    gate, up, down, x = glu
    p = parse_pattern("2:4")
    h = F.silu(x @ gate.t()) * (x @ up.t())
    a = feature_stats(h).norm
    dm = get_method("wanda").prune_linear(down, feature_stats(h), p).mask
    resid = torch.randn(x.shape[0], down.shape[0]) * 3
    norm = torch.nn.RMSNorm(down.shape[0])
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 4, down.shape[0]))
    post = (lambda t: norm(t)) if with_post else None
    got = candidate_row_errors(gate, up, down, dm, a, x, p, (0.5, 2.0), F.silu, view=BlockView(resid, post))
    ident = post or (lambda t: t)
    y = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    z = resid + ident(y)
    for alpha in (0.5, 2.0):
        mg, mu = dass_glu_masks(gate, up, a, p, alpha)
        yp = (F.silu(x @ (gate * mg).t()) * (x @ (up * mu).t())) @ (down * dm).t()
        want = (resid + ident(yp) - z).pow(2).sum(1)
        assert torch.allclose(got.errors[alpha], want.detach(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(got.scale, z.pow(2).sum(1).detach(), rtol=1e-5)
    assert got.measured_at.startswith("next layer input")


def test_block_view_gathers_the_kept_rows_of_every_batch():
    torch.manual_seed(0)
    batches = [torch.randn(3, 10, 6) for _ in range(4)]  # 4 batches of 3 windows of 10 tokens
    x = feature_stats(torch.cat([b.reshape(-1, 6) for b in batches]), keep=16)
    resid = [b * 2 + 1 for b in batches]
    view = block_view(x, resid, None)
    flat = torch.cat([r.reshape(-1, 6) for r in resid])
    assert torch.equal(view.residual, flat[torch.cat(x.sample_index)])
    assert torch.allclose(view.residual, x.sample() * 2 + 1)
    assert view.post is None
    assert block_view(x, resid[:2], None) is None  # rows that do not match (an expert's subset)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_the_pipeline_measures_at_the_next_layer_and_the_summary_says_so(arch):
    model = tiny_model(arch)
    report = dass.prune(model, "dass", "2:4", calibration=calib(6, 24), batch_size=3, progress=False, alpha="auto")
    gates = [m for m in report.matrices if m.role == "gate"]
    where = "next layer input (post-norm)" if arch == "gemma2" else "next layer input"
    assert all(m.info["alpha_measured_at"] == where for m in gates)
    assert all(m.info["alpha_decision"]["reason"] in ("gain", "default is best", "weak evidence", "guard") for m in gates)
    text = report.summary()
    listed = text.splitlines()[1].split(": ")[1].split()
    assert [float(v.rstrip("*!")) for v in listed] == [m.info["alpha"] for m in gates]
    # the old choice stays available for ablations
    model = tiny_model(arch)
    old = dass.prune(model, "dass", "2:4", calibration=calib(6, 24), batch_size=3, progress=False, alpha="auto",
                     alpha_select="min", alpha_measure="mlp")
    assert all(m.info["alpha_measured_at"] == "MLP output" for m in old.matrices if m.role == "gate")


def test_summary_lines_and_warnings():
    def info(alpha, errs, reason="gain"):
        return {"alpha": alpha, "alpha_errors": {str(a): e for a, e in errs.items()},
                "alpha_guard_errors": {str(a): e for a, e in errs.items()},
                "alpha_decision": {"reason": reason}, "alpha_measured_at": "next layer input"}

    plain = [info(1.0, {0.5: 1.0, 1.0: 0.95, 2.0: 0.97}), info(0.5, {0.5: 1.0, 1.0: 0.99, 2.0: 1.1}, "weak evidence")]
    lines = alpha_summary(plain)
    assert lines[0] == "alpha auto per block: 1 0.5*"
    assert "1 block(s) kept the paper's 0.5" in lines[1] and "next layer input" in lines[1]
    assert not any(line.startswith("warning") for line in lines)
    far = [info(2.0, {0.5: 1.0, 1.0: 1.0, 2.0: 0.5}), info(0.5, {0.5: 1.0, 1.0: 0.9, 2.0: 1.5})]
    warn = [line for line in alpha_summary(far) if line.startswith("warning")]
    assert any("below the best fixed alpha" in w for w in warn)
    assert alpha_summary([{"alpha": 0.5}]) == []  # a fixed alpha: nothing to say
    with pytest.raises(MethodError):
        get_method("dass", alpha="auto", alpha_select="best")
    with pytest.raises(MethodError):
        get_method("dass", alpha=1.0, alpha_guard="total")


# --------------------------------------------------------------------------------------
# a model built with massive activations (benchmarks/alpha_models.py)
# --------------------------------------------------------------------------------------

SINKS = (0, 1, 2)


def _tokens(n: int, length: int, seed: int) -> torch.Tensor:
    """Random tokens with the sink tokens at 8% of the positions (like punctuation)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (n, length), generator=g)
    sink = torch.rand(n, length, generator=g) < 0.08
    ids[sink] = torch.randint(0, 3, (int(sink.sum()),), generator=g)
    return ids


@pytest.fixture(scope="module")
def massive():
    torch.manual_seed(0)
    model = build_model("qwen2", vocab_size=512, sink_tokens=SINKS, layers=4, hidden=64, intermediate=256)
    cal, held = _tokens(16, 128, 1), _tokens(8, 128, 2)
    return model, cal, held, list(log_probs(model, held, 128, 4))


def test_the_built_model_has_massive_activations(massive):
    model, _, held, _ = massive
    with torch.no_grad():
        hs = model(held, output_hidden_states=True, use_cache=False).hidden_states[3]
    norms = hs.norm(dim=-1)
    sink = torch.isin(held, torch.tensor(SINKS))
    assert float(norms[sink].median() / norms[~sink].median()) > 20  # a few tokens carry huge states
    assert float(hs.abs().amax(dim=(0, 1)).max() / hs.abs().median()) > 200  # in a few channels


@pytest.mark.parametrize("spec", ["2:4", "4:8"])
def test_auto_is_no_worse_than_the_paper_alpha_on_a_model_with_massive_activations(massive, spec):
    """The product's promise, measured on held-out tokens: the KL divergence of the pruned
    model's next-token distribution from the dense model's, auto (rescale on and off)
    against alpha 0.5 without any rescale."""
    model, cal, held, dense = massive
    torch.set_num_threads(1)

    def kl(**opts) -> float:
        m = copy.deepcopy(model)
        dass.prune(m, "dass", spec, calibration=cal, batch_size=4, progress=False, **opts)
        return kl_to_dense(m, dense, held, 128, 4)

    paper = kl(alpha=0.5)
    assert kl(alpha="auto", rescale="none") <= paper
    assert kl(alpha="auto") <= paper
