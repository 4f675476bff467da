"""``dass --alpha auto``: alpha chosen per GLU block by the block's reconstruction error on
kept calibration rows; a fixed alpha stays exactly the paper's method."""

import pytest
import torch
import torch.nn.functional as F

import dass
from dass.core.alpha import DEFAULT_CANDIDATES, alpha_errors, choose_alpha
from dass.methods import get_method
from dass.methods.base import MethodError
from dass.core.patterns import nm_violations, parse_pattern, select_mask
from tiny import calib, tiny_model, feature_stats


def stats(x, keep=0):
    return feature_stats(x, keep=keep)


def block_error(gate, up, down, x, mg, mu, md, criterion="token"):
    """Written-out relative error of the pruned block's output on rows ``x``: per row, then
    averaged ("token"), or summed over all rows ("total")."""
    y = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    yp = (F.silu(x @ (gate * mg).t()) * (x @ (up * mu).t())) @ (down * md).t()
    if criterion == "total":
        return float(((yp - y) ** 2).sum() / (y**2).sum())
    per_row = [float(((yp[t] - y[t]) ** 2).sum() / (y[t] ** 2).sum()) for t in range(y.shape[0])]
    return sum(per_row) / len(per_row)


@pytest.fixture
def glu():
    torch.manual_seed(0)
    d, D, T = 16, 32, 400
    x = torch.randn(T, d) * torch.linspace(0.3, 2, d)
    gate, up = torch.randn(D, d), torch.randn(D, d) * torch.linspace(0.1, 3, D).reshape(-1, 1)  # busy and quiet neurons
    down = torch.randn(d, D)
    return gate, up, down, x


def test_fixed_alpha_is_the_paper_method(glu):
    gate, up, down, x = glu
    h = F.silu(x @ gate.t()) * (x @ up.t())
    m = get_method("dass", alpha=0.5)
    assert m.sample_tokens == 0 and m.options() == {"alpha": 0.5}  # nothing extra kept or recorded
    a = torch.sqrt((h.double() ** 2).sum(0)).float()
    for spec in ("2:4", "4:8", "0.5"):
        p = parse_pattern(spec)
        rg, ru, rd = m.prune_glu(gate, up, down, stats(x), stats(h), p)
        for W, r in ((gate, rg), (up, ru)):
            expect = select_mask(W.abs() * a.reshape(-1, 1) ** 0.5, p, group="column", orientation="output")
            assert torch.equal(r.mask, expect)
            assert r.info == {}
        assert torch.equal(rd.mask, get_method("wanda").prune_linear(down, stats(h), p).mask)


@pytest.mark.parametrize("criterion", ["token", "total"])
@pytest.mark.parametrize("spec", ["2:4", "4:8", "0.5"])
def test_auto_picks_the_candidate_with_the_lowest_error(glu, spec, criterion):
    gate, up, down, x = glu
    h = F.silu(x @ gate.t()) * (x @ up.t())
    p = parse_pattern(spec)
    # alpha_select="min": the plain lowest-error choice ("safe", the default, is tested in test_alpha_safety.py)
    m = get_method("dass", alpha="auto", sample_tokens=40, alpha_criterion=criterion, alpha_select="min")
    sx = stats(x, keep=m.sample_tokens)
    rows = sx.sample()
    assert 20 <= rows.shape[0] <= 40 and rows.shape[1] == x.shape[1]
    rg, ru, rd = m.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu)
    # brute force: the fixed-alpha method's masks for every candidate, scored on the kept rows
    errs = {}
    for a in DEFAULT_CANDIDATES:
        fg, fu, fd = get_method("dass", alpha=a).prune_glu(gate, up, down, stats(x), stats(h), p)
        errs[a] = block_error(gate, up, down, rows, fg.mask, fu.mask, fd.mask, criterion)
    best = min(errs, key=errs.get)
    assert rg.info["alpha"] == ru.info["alpha"] == rd.info["alpha"] == best
    assert rg.info["alpha_rows"] == rows.shape[0]
    for a in DEFAULT_CANDIDATES:
        assert rg.info["alpha_errors"][str(float(a))] == pytest.approx(errs[a], rel=1e-4)
    # the masks are exactly the fixed-alpha DaSS masks of the chosen value
    fg, fu, fd = get_method("dass", alpha=best).prune_glu(gate, up, down, stats(x), stats(h), p)
    assert torch.equal(rg.mask, fg.mask) and torch.equal(ru.mask, fu.mask) and torch.equal(rd.mask, fd.mask)
    assert rg.orientation == ("output" if p.is_nm else None)


def hand_made_block(noise, w_busy, w_quiet, down_busy, T=512, seed=0):
    """Groups of 4 neurons: rows 0, 1 'busy' (small weights all of one sign on inputs that
    move together, so a large activation norm), rows 2, 3 'quiet' (larger weights of
    alternating sign that cancel). ``noise`` sets how much the quiet neurons still fire;
    ``down_busy`` is the weight of the busy neurons in W_down."""
    g = torch.Generator().manual_seed(seed)
    d = 4
    x = torch.randn(T, 1, generator=g) + noise * torch.randn(T, d, generator=g)
    busy = torch.full((d,), w_busy)
    quiet = w_quiet * torch.tensor([1.0, -1.0, 1.0, -1.0])
    rows = torch.stack([busy, busy, quiet, -quiet] * 2)  # D = 8
    down = torch.ones(3, 1) * torch.tensor([down_busy, down_busy, 1.0, 1.0] * 2)
    return rows.clone(), rows.clone(), down, x


def _auto(gate, up, down, x, criterion="token"):
    h = F.silu(x @ gate.t()) * (x @ up.t())
    m = get_method("dass", alpha="auto", sample_tokens=64, alpha_criterion=criterion)
    return m.prune_glu(gate, up, down, stats(x, keep=64), stats(h), parse_pattern("2:4"), act=F.silu)


def test_auto_chooses_zero_when_busy_neurons_do_not_matter():
    # the busy neurons feed nothing (zero W_down columns): any alpha > 0 keeps their
    # weights and drops the neurons that matter; alpha = 0 (magnitude) reconstructs exactly
    rg, ru, _ = _auto(*hand_made_block(noise=0.5, w_busy=0.9, w_quiet=1.0, down_busy=0.0))
    assert rg.info["alpha"] == 0.0
    assert rg.info["alpha_errors"]["0.0"] == pytest.approx(0.0, abs=1e-12)
    assert all(e > 0.5 for a, e in rg.info["alpha_errors"].items() if a != "0.0")


@pytest.mark.parametrize("criterion", ["token", "total"])
def test_auto_chooses_a_large_alpha_when_neuron_norms_differ_little(criterion):
    # busy neurons matter, but their norms exceed the quiet ones' only a little while their
    # weights are 1.5x smaller: only a large alpha ranks (all) the busy rows first
    rg, ru, _ = _auto(*hand_made_block(noise=1.5, w_busy=0.6, w_quiet=0.9, down_busy=1.0), criterion)
    errs = {float(a): e for a, e in rg.info["alpha_errors"].items()}
    assert rg.info["alpha"] == ru.info["alpha"] == 3.0
    assert all(errs[3.0] < 0.75 * e for a, e in errs.items() if a != 3.0)
    if criterion == "total":
        assert errs[3.0] < errs[2.0] < errs[1.0] and errs[3.0] < 0.5 * errs[0.5]


def test_auto_without_kept_rows_falls_back():
    torch.manual_seed(0)
    gate, up, down, x = torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8), torch.randn(20, 4)
    h = F.silu(x @ gate.t()) * (x @ up.t())
    rg, _, _ = get_method("dass", alpha="auto").prune_glu(gate, up, down, stats(x), stats(h), parse_pattern("2:4"))
    assert rg.info["alpha"] == 0.5 and "alpha_auto" in rg.info


def test_relative_error_per_token_and_total_by_hand():
    from dass.core.alpha import relative_error

    dense = torch.tensor([[10.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # a massive token, two small, one silent
    a = torch.tensor([[10.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # the massive token exact, the small ones lost
    b = torch.tensor([[9.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # the massive token off by 1, the silent one by 3
    assert relative_error(a, dense, "total") == pytest.approx(2 / 102)
    assert relative_error(b, dense, "total") == pytest.approx(10 / 102)
    # per token (the silent token has no scale and is left out): (0 + 1 + 1) / 3 vs (0.01 + 0 + 0) / 3
    assert relative_error(a, dense, "token") == pytest.approx(2 / 3)
    assert relative_error(b, dense, "token") == pytest.approx(0.01 / 3)
    assert relative_error(a, dense) == relative_error(a, dense, "token")  # the default
    with pytest.raises(ValueError):
        relative_error(a, dense, "mean")


def test_choose_alpha_ties_go_to_the_first_candidate():
    assert choose_alpha({1.0: 0.2, 0.5: 0.1, 2.0: 0.1}) == 0.5


def test_alpha_errors_dense_masks_are_zero(glu):
    gate, up, down, x = glu
    h = F.silu(x @ gate.t()) * (x @ up.t())
    errs = alpha_errors(gate, up, down, torch.ones_like(down, dtype=torch.bool), stats(h).norm, x,
                        parse_pattern("0.0"), (0.0, 1.0))
    assert errs == {0.0: 0.0, 1.0: 0.0}


def test_bad_options():
    with pytest.raises(MethodError):
        get_method("dass", alpha="often")
    with pytest.raises(MethodError):
        get_method("dass", alpha=1.0, alpha_candidates=[0.5, 1])
    with pytest.raises(MethodError):
        get_method("dass", alpha="auto", alpha_candidates=[-1])
    with pytest.raises(MethodError):
        get_method("dass", alpha="auto", alpha_criterion="median")
    with pytest.raises(MethodError):
        get_method("dass", alpha=0.5, alpha_criterion="total")
    m = get_method("dass", alpha="AUTO", alpha_candidates="0.5, 1 2")
    assert m.options() == {"alpha": "auto", "alpha_candidates": [0.5, 1.0, 2.0], "alpha_criterion": "token",
                           "sample_tokens": 1024, "max_neurons": None, "alpha_select": "safe",
                           "alpha_guard": "total", "alpha_measure": "next",
                           "rescale": "down", "rescale_target": "block", "alpha_rescaled": False}
    assert get_method("dass", alpha="auto", rescale="none").options()["rescale"] == "none"  # recorded: not auto's default


@pytest.mark.parametrize("arch", ["llama", "mixtral", "phi3"])
@pytest.mark.parametrize("spec", ["2:4", "0.5"])
def test_auto_end_to_end(arch, spec):
    model = tiny_model(arch)
    report = dass.prune(model, "dass", spec, calibration=calib(6, 24), batch_size=3, progress=False, alpha="auto")
    assert report.options["alpha"] == "auto"
    p = parse_pattern(spec)
    gates = [m for m in report.matrices if m.role == "gate"]
    assert gates and all(m.info["alpha"] in DEFAULT_CANDIDATES for m in gates)
    for m in report.matrices:
        assert m.sparsity == pytest.approx(0.5, abs=1e-9)
        assert m.orientation == ((("output" if m.role in ("gate", "up") else "input")) if p.is_nm else None)
    if p.is_nm:
        for name, w in model.named_parameters():
            if name.endswith("down_proj.weight") and w.dim() == 2:
                assert nm_violations(w, 2, 4, "input") == 0


def test_neuron_subset_is_whole_evenly_spaced_groups():
    from dass.core.alpha import neuron_subset

    assert neuron_subset(64, parse_pattern("2:4"), 64) is None
    assert neuron_subset(64, parse_pattern("2:4"), None) is None
    idx = neuron_subset(1536, parse_pattern("4:8"), 512)
    assert idx.numel() == 512 and len(set(idx.tolist())) == 512
    starts = idx.reshape(-1, 8)
    assert torch.all(starts[:, 0] % 8 == 0) and torch.all(starts - starts[:, :1] == torch.arange(8))
    assert starts[0, 0] == 0 and starts[-1, 0] >= 1536 - 3 * 8  # spread over the whole range
    assert neuron_subset(100, parse_pattern("0.5"), 30).numel() == 30


def test_subset_errors_are_the_sub_block_errors(glu):
    """For N:M, the sub-block's masks are the full masks restricted to it, so the subset
    estimate is exactly the error of the sub-block under the full-block masks."""
    from dass.core.alpha import dass_glu_masks, neuron_subset

    gate, up, down, x = glu
    h = F.silu(x @ gate.t()) * (x @ up.t())
    p = parse_pattern("2:4")
    a = stats(h).norm
    dm = get_method("wanda").prune_linear(down, stats(h), p).mask
    errs = alpha_errors(gate, up, down, dm, a, x, p, (0.5, 2.0), max_neurons=16)
    idx = neuron_subset(gate.shape[0], p, 16)
    for alpha, e in errs.items():
        mg, mu = dass_glu_masks(gate, up, a, p, alpha)
        want = block_error(gate[idx], up[idx], down[:, idx], x, mg[idx], mu[idx], dm[:, idx])
        assert e == pytest.approx(want, rel=1e-4)
