"""``dass --rescale``: least-squares per-output-row factors after masking (dass.core.rescale)."""

import pytest
import torch
import torch.nn.functional as F

import dass
from dass.methods import get_method
from dass.methods.base import MethodError
from dass.core.patterns import nm_violations, parse_pattern
from dass.core.rescale import ls_scale, rescale_glu, rescale_rows
from tiny import calib, tiny_model, feature_stats


def stats(x, keep=0):
    return feature_stats(x, keep=keep)


@pytest.fixture
def glu():
    torch.manual_seed(0)
    d, D, T = 16, 32, 300
    x = torch.randn(T, d) * torch.linspace(0.3, 2, d)
    gate, up = torch.randn(D, d), torch.randn(D, d) * torch.linspace(0.1, 3, D).reshape(-1, 1)
    down = torch.randn(d, D)
    return gate, up, down, x


def test_ls_scale_by_hand():
    target = torch.tensor([[1.0, 2.0, 5.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    approx = torch.tensor([[1.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    # column 0: (1 + 2) / 2; column 1: (2 + 8) / 5; column 2: no signal -> 1
    assert torch.allclose(ls_scale(target, approx), torch.tensor([1.5, 2.0, 1.0]))


def test_rescale_rows_is_the_least_squares_solution():
    torch.manual_seed(1)
    x = torch.randn(50, 8, dtype=torch.float64).float()
    w = torch.randn(6, 8)
    mask = parse_pattern("2:4")
    from dass.core.patterns import select_mask

    m = select_mask(w.abs(), mask, group="row", orientation="input")
    got, s = rescale_rows(w, m, x)
    for j in range(w.shape[0]):
        a = (x @ (w[j] * m[j])).double().reshape(-1, 1)
        b = (x @ w[j]).double().reshape(-1, 1)
        sol = torch.linalg.lstsq(a, b).solution.item()
        assert s[j].item() == pytest.approx(sol, rel=1e-4)
    assert torch.equal(got != 0, m)  # the mask is kept: zeros stay zeros, kept weights stay non-zero
    assert nm_violations(got, 2, 4, "input") == 0
    assert torch.allclose(got, (w * m) * s.reshape(-1, 1))
    # least squares: not worse than the unscaled row on the rows it was fitted on, row by row
    err = ((x @ got.t() - x @ w.t()) ** 2).sum(0)
    err0 = ((x @ (w * m).t() - x @ w.t()) ** 2).sum(0)
    assert torch.all(err <= err0 + 1e-4)


@pytest.mark.parametrize("scope", ["down", "all"])
@pytest.mark.parametrize("target", ["block", "layer"])
def test_rescale_glu_down_against_block_output(glu, scope, target):
    gate, up, down, x = glu
    p = parse_pattern("2:4")
    h = F.silu(x @ gate.t()) * (x @ up.t())
    rg, ru, rd = get_method("dass", alpha=1.0).prune_glu(gate, up, down, stats(x), stats(h), p)
    masks = (rg.mask, ru.mask, rd.mask)
    g2, u2, d2, s = rescale_glu(gate, up, down, masks, x, F.silu, scope=scope, target=target)
    assert set(s) == ({"gate", "up", "down"} if scope == "all" else {"down"})
    if scope == "down":
        assert torch.equal(g2, gate * rg.mask) and torch.equal(u2, up * ru.mask)
    else:
        assert torch.allclose(s["gate"], ls_scale(x @ gate.t(), x @ (gate * rg.mask).t()))
        assert torch.allclose(s["up"], ls_scale(x @ up.t(), x @ (up * ru.mask).t()))
    hp = F.silu(x @ g2.t()) * (x @ u2.t())  # down's input: the (rescaled) pruned gate/up
    want = h @ down.t() if target == "block" else hp @ down.t()
    assert torch.allclose(s["down"], ls_scale(want, hp @ (down * rd.mask).t()))
    for w, m in ((g2, rg.mask), (u2, ru.mask), (d2, rd.mask)):
        assert torch.all(w[~m] == 0)
    assert nm_violations(g2, 2, 4, "output") == 0 and nm_violations(d2, 2, 4, "input") == 0


@pytest.mark.parametrize("alpha", [1.0, "auto"])
@pytest.mark.parametrize("spec", ["2:4", "4:8", "0.5"])
def test_dass_rescale_keeps_masks_and_lowers_the_block_error(glu, alpha, spec):
    gate, up, down, x = glu
    p = parse_pattern(spec)
    h = F.silu(x @ gate.t()) * (x @ up.t())
    plain = get_method("dass", alpha=alpha, rescale="none", **({"sample_tokens": 64} if alpha == "auto" else {}))
    m = get_method("dass", alpha=alpha, rescale="down", sample_tokens=64)
    assert m.sample_tokens == 64
    sx = stats(x, keep=64)
    base = plain.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu)
    res = m.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu)
    for a, b in zip(base, res):
        assert torch.equal(a.mask, b.mask) and a.orientation == b.orientation
    assert res[0].weight is None and res[1].weight is None  # only down is rescaled
    assert torch.all(res[2].weight[~res[2].mask] == 0)
    assert "rescale" in res[2].info
    # on the kept rows it was fitted on, the block output error can only go down
    rows = sx.sample()
    y = (F.silu(rows @ gate.t()) * (rows @ up.t())) @ down.t()
    hp = F.silu(rows @ (gate * base[0].mask).t()) * (rows @ (up * base[1].mask).t())
    e0 = ((hp @ (down * base[2].mask).t() - y) ** 2).sum()
    e1 = ((hp @ res[2].weight.t() - y) ** 2).sum()
    assert e1 < e0


def test_rescale_options_and_validation():
    m = get_method("dass", alpha=2.0, rescale="all")
    assert m.options() == {"alpha": 2.0, "rescale": "all", "rescale_target": "block", "sample_tokens": 1024}
    assert get_method("dass").options() == {"alpha": 0.5} and get_method("dass").sample_tokens == 0
    with pytest.raises(MethodError):
        get_method("dass", rescale="some")
    with pytest.raises(MethodError):
        get_method("dass", rescale="down", rescale_target="model")
    with pytest.raises(MethodError):
        get_method("dass", rescale_target="layer")  # no rescale
    with pytest.raises(MethodError):
        get_method("dass", alpha=1.0, sample_tokens=64)  # rows kept for nothing


def test_rescale_without_kept_rows_leaves_masks_alone(glu):
    gate, up, down, x = glu
    h = F.silu(x @ gate.t()) * (x @ up.t())
    res = get_method("dass", alpha=1.0, rescale="down").prune_glu(gate, up, down, stats(x), stats(h), parse_pattern("2:4"))
    assert all(r.weight is None for r in res) and "not rescaled" in res[2].info["rescale"]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_rescale_end_to_end(arch):
    torch.manual_seed(0)
    ids = calib(6, 24)
    a, b = tiny_model(arch), tiny_model(arch)
    b.load_state_dict(a.state_dict())
    dass.prune(a, "dass", "2:4", calibration=ids, batch_size=3, progress=False, alpha=1.0)
    report = dass.prune(b, "dass", "2:4", calibration=ids, batch_size=3, progress=False, alpha=1.0, rescale="all")
    assert report.options["rescale"] == "all"
    changed = 0
    for (name, wa), (_, wb) in zip(a.named_parameters(), b.named_parameters()):
        if wa.dim() == 2 and ".mlp." in name:
            if ".layers.0." in name:  # later layers see other (rescaled) inputs
                assert torch.equal(wa != 0, wb != 0), name  # same masks as plain DaSS
            changed += int(not torch.equal(wa, wb))
    assert changed > 0
    for m in report.matrices:
        assert m.sparsity == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("scope", ["down", "all"])
def test_auto_alpha_rescaled_judges_candidates_after_the_rescale(glu, scope):
    from dass.core.alpha import DEFAULT_CANDIDATES

    gate, up, down, x = glu
    p = parse_pattern("2:4")
    h = F.silu(x @ gate.t()) * (x @ up.t())
    m = get_method("dass", alpha="auto", rescale=scope, alpha_rescaled=True, sample_tokens=64, alpha_select="min")
    assert m.options()["alpha_rescaled"] is True
    sx = stats(x, keep=64)
    rows = sx.sample()
    rg, ru, rd = m.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu)
    y = (F.silu(rows @ gate.t()) * (rows @ up.t())) @ down.t()
    errs = {}
    for a in DEFAULT_CANDIDATES:  # brute force: fixed alpha + the same rescale, error on the kept rows
        fg, fu, fd = get_method("dass", alpha=a).prune_glu(gate, up, down, stats(x), stats(h), p)
        g2, u2, d2, _ = rescale_glu(gate, up, down, (fg.mask, fu.mask, fd.mask), rows, F.silu, scope=scope)
        yp = (F.silu(rows @ g2.t()) * (rows @ u2.t())) @ d2.t()
        errs[a] = float((((yp - y) ** 2).sum(1) / (y**2).sum(1)).mean())
        assert rg.info["alpha_errors"][str(float(a))] == pytest.approx(errs[a], rel=1e-4)
    assert rg.info["alpha"] == min(errs, key=errs.get)
    # the weights returned are the rescale of the chosen masks
    fg, fu, fd = get_method("dass", alpha=rg.info["alpha"]).prune_glu(gate, up, down, stats(x), stats(h), p)
    g2, u2, d2, _ = rescale_glu(gate, up, down, (fg.mask, fu.mask, fd.mask), rows, F.silu, scope=scope)
    assert torch.allclose(rd.weight, d2)
    if scope == "all":
        assert torch.allclose(rg.weight, g2) and torch.allclose(ru.weight, u2)
    with pytest.raises(MethodError):
        get_method("dass", alpha=1.0, rescale=scope, alpha_rescaled=True)
    with pytest.raises(MethodError):
        get_method("dass", alpha="auto", rescale="none", alpha_rescaled=True)


def test_auto_rescales_down_by_default_and_a_fixed_alpha_never(glu):
    gate, up, down, x = glu
    p = parse_pattern("2:4")
    h = F.silu(x @ gate.t()) * (x @ up.t())
    sx = stats(x, keep=64)
    auto = get_method("dass", alpha="auto", sample_tokens=64)
    assert auto.opts.rescale == "down"
    rg, ru, rd = auto.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu)
    assert rg.weight is None and ru.weight is None and rd.weight is not None
    g2, u2, d2, _ = rescale_glu(gate, up, down, (rg.mask, ru.mask, rd.mask), sx.sample(), F.silu, scope="down")
    assert torch.allclose(rd.weight, d2)
    off = get_method("dass", alpha="auto", sample_tokens=64, rescale="none").prune_glu(gate, up, down, sx, stats(h), p,
                                                                                      act=F.silu)
    assert all(r.weight is None for r in off) and all(torch.equal(a.mask, b.mask) for a, b in zip(off, (rg, ru, rd)))
    fixed = get_method("dass", alpha=1.0)
    assert fixed.opts.rescale == "none" and fixed.sample_tokens == 0
    assert all(r.weight is None for r in fixed.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu))


def test_wanda_rescale_same_masks_rescaled_down(glu):
    """Wanda's optional rescale (for comparing with DaSS's rescaled auto): Wanda's masks, and
    W_down's rows times the factors rescale_glu computes on those masks."""
    gate, up, down, x = glu
    p = parse_pattern("2:4")
    h = F.silu(x @ gate.t()) * (x @ up.t())
    sx = stats(x, keep=64)
    plain = get_method("wanda")
    assert plain.options() == {} and plain.sample_tokens == 0 and not plain.requires_glu
    m = get_method("wanda", rescale="down")
    assert m.requires_glu and m.sample_tokens == 1024
    assert m.options() == {"rescale": "down", "rescale_target": "block", "sample_tokens": 1024}
    base = plain.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu)
    res = m.prune_glu(gate, up, down, sx, stats(h), p, act=F.silu)
    for a, b in zip(base, res):
        assert torch.equal(a.mask, b.mask) and a.orientation == b.orientation == "input"
    _, _, d2, s = rescale_glu(gate, up, down, tuple(r.mask for r in base), sx.sample(), F.silu, scope="down")
    assert res[0].weight is None and res[1].weight is None and torch.allclose(res[2].weight, d2)
    assert res[2].info["rescale"]["max"] == pytest.approx(float(s["down"].max()))
    with pytest.raises(MethodError):
        get_method("wanda", rescale="half")
    with pytest.raises(MethodError):
        get_method("wanda", rescale_target="layer")


def test_wanda_rescale_needs_a_glu_model():
    from transformers import PhiConfig, PhiForCausalLM

    from dass.arch import ArchitectureError

    cfg = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    model = PhiForCausalLM(cfg).eval()
    with pytest.raises(ArchitectureError, match="gate_proj/up_proj/down_proj"):
        dass.prune(model, "wanda", "2:4", calibration=calib(4, 16), progress=False, rescale="down")
    dass.prune(model, "wanda", "2:4", calibration=calib(4, 16), progress=False)  # plain Wanda prunes fc1/fc2


def test_normalised_rescale_fits_unit_outputs_and_ignores_token_scale(glu):
    """For a block whose output is RMS-normalised before the residual (Gemma-2/3), W_down's
    factors are fitted on per-token unit outputs: a per-token scale of the target, which
    the norm undoes, does not change them."""
    gate, up, down, x = glu
    p = parse_pattern("2:4")
    h = F.silu(x @ gate.t()) * (x @ up.t())
    rg, ru, rd = get_method("dass", alpha=1.0).prune_glu(gate, up, down, stats(x), stats(h), p)
    masks = (rg.mask, ru.mask, rd.mask)
    y = h @ down.t()
    hp = F.silu(x @ (gate * rg.mask).t()) * (x @ (up * ru.mask).t())
    approx = hp @ (down * rd.mask).t()
    _, _, d2, s = rescale_glu(gate, up, down, masks, x, F.silu, normalise=True)
    unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(s["down"], ls_scale(unit(y), unit(approx)), rtol=1e-4)
    assert torch.allclose(d2, (down * rd.mask) * s["down"].reshape(-1, 1))
    scaled = y * torch.linspace(0.1, 10, y.shape[0]).reshape(-1, 1)
    _, _, _, s2 = rescale_glu(gate, up, down, masks, x, F.silu, normalise=True, dense_out=scaled)
    assert torch.allclose(s2["down"], s["down"], rtol=1e-4)
    _, _, _, plain = rescale_glu(gate, up, down, masks, x, F.silu, dense_out=scaled)
    assert not torch.allclose(plain["down"], s["down"], rtol=1e-2)
