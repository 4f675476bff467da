"""``dass-obs``: DaSS's output-dimension groups and neuron weights with OBS weight updates."""

import pytest
import torch
import torch.nn.functional as F

import dass
from dass.methods import available_methods, get_method
from dass.methods.base import MethodError
from dass.core.obs import obs_prune_output_groups
from dass.core.patterns import nm_violations, parse_pattern
from dass.core.sparsegpt import inverse_cholesky
from tiny import calib, tiny_model, feature_stats


def stats(x, hessian=True, keep=0):
    return feature_stats(x, hessian, keep)


@pytest.fixture
def block():
    """A GLU block on strongly correlated inputs, where reconstruction matters."""
    torch.manual_seed(0)
    d, D, T = 32, 64, 1024
    x = torch.randn(T, 6) @ torch.randn(6, d) + 0.2 * torch.randn(T, d)
    gate, up, down = torch.randn(D, d) / d**0.5, torch.randn(D, d) / d**0.5, torch.randn(d, D) / D**0.5
    up *= torch.linspace(0.2, 2.0, D).reshape(-1, 1)  # neurons of different activity
    return gate, up, down, x


def fwd(g, u, d, x):
    return (F.silu(x @ g.t()) * (x @ u.t())) @ d.t()


def rel_err(res, gate, up, down, x):
    ws = [r.weight if r.weight is not None else w * r.mask for r, w in zip(res, (gate, up, down))]
    y = fwd(gate, up, down, x)
    return float((fwd(*ws, x) - y).pow(2).sum() / y.pow(2).sum())


def run(method, block, spec, **opts):
    gate, up, down, x = block
    m = get_method(method, **opts)
    h = F.silu(x @ gate.t()) * (x @ up.t())
    return m.prune_glu(gate, up, down, stats(x, keep=m.sample_tokens), stats(h), parse_pattern(spec), act=F.silu)


def test_registered():
    assert "dass-obs" in available_methods()
    m = get_method("dass-obs")
    assert m.needs_hessian and m.requires_glu and m.sample_tokens == 0
    assert m.orientation("gate") == m.orientation("up") == "output" and m.orientation("down") == "input"
    assert get_method("dass-obs", weights="taylor").sample_tokens > 0
    for bad in ({"masks": "later"}, {"weights": "x"}, {"down": "x"}, {"alpha": -1}, {"masks": "fixed", "weights": "taylor"}):
        with pytest.raises(MethodError):
            get_method("dass-obs", **bad)


@pytest.mark.parametrize("spec", ["2:4", "4:8", "0.5"])
@pytest.mark.parametrize("opts", [{}, {"weights": "taylor"}, {"masks": "fixed"}])
def test_reconstructs_better_than_dass(block, spec, opts):
    gate, up, down, x = block
    err_obs = rel_err(run("dass-obs", block, spec, **opts), *block)
    err_dass = rel_err(run("dass", block, spec, alpha=opts.get("alpha", 1.0)), *block)
    assert err_obs < 0.8 * err_dass


@pytest.mark.parametrize("spec", ["2:4", "4:8"])
def test_sweep_beats_fixed_masks(block, spec):
    """Choosing each column's rows on the updated weights reconstructs better than fixing
    DaSS's masks before the update."""
    assert rel_err(run("dass-obs", block, spec), *block) < rel_err(run("dass-obs", block, spec, masks="fixed"), *block)


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4", "0.5"])
@pytest.mark.parametrize("opts", [{}, {"masks": "fixed"}, {"down": "dass"}])
def test_patterns_orientation_and_exact_sparsity(block, spec, opts):
    gate, up, down, x = block
    p = parse_pattern(spec)
    rg, ru, rd = run("dass-obs", block, spec, **opts)
    for r, w, orient in ((rg, gate, "output"), (ru, up, "output"), (rd, down, "input")):
        assert r.weight.shape == w.shape and r.mask.shape == w.shape and r.mask.dtype == torch.bool
        assert torch.all(r.weight[~r.mask] == 0)
        assert not torch.allclose(r.weight[r.mask], w[r.mask])  # kept weights were updated
        if p.is_nm:
            assert r.orientation == orient
            assert nm_violations(r.weight, p.n, p.m, orient) == 0
            kept = r.mask if orient == "input" else r.mask.t()
            assert torch.all(kept.reshape(kept.shape[0], -1, p.m).sum(-1) == p.n)
        else:
            assert r.orientation is None
            assert int((~r.mask).sum()) == int(w.numel() * p.sparsity)
    if not p.is_nm:  # DaSS's unstructured comparison group for gate/up: each input column
        for r in (rg, ru):
            assert torch.all((~r.mask).sum(0) == int(gate.shape[0] * p.sparsity))


def test_fixed_masks_are_dass_masks(block):
    gate, up, down, x = block
    rg, ru, rd = run("dass-obs", block, "2:4", masks="fixed", alpha=0.5, down="dass")
    fg, fu, fd = run("dass", block, "2:4", alpha=0.5)
    assert torch.equal(rg.mask, fg.mask) and torch.equal(ru.mask, fu.mask) and torch.equal(rd.mask, fd.mask)


def reference_sweep(W, H, n, m, r, percdamp=0.01):
    """Written-out column sweep without blocks or lazy updates: at column j, prune the m - n
    rows of lowest r_i * w_ij^2 in every group of m consecutive rows, then move the error
    of the column onto all later columns with the upper Cholesky factor of H^-1."""
    W = W.clone().double()
    U, _, _ = inverse_cholesky(H.double(), percdamp)
    rows, cols = W.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for j in range(cols):
        for g in range(0, rows, m):
            order = sorted(range(g, g + m), key=lambda i: r[i].item() * W[i, j].item() ** 2)
            for i in order[: m - n]:
                keep[i, j] = False
        err = torch.where(keep[:, j], torch.zeros(rows, dtype=W.dtype), W[:, j]) / U[j, j]
        W[:, j:] -= err.reshape(-1, 1) * U[j, j:].reshape(1, -1)
    W[~keep] = 0
    return W, keep


def test_solver_matches_written_out_sweep(block):
    gate, up, down, x = block
    r = torch.rand(gate.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
    H = stats(x).hessian()
    res = obs_prune_output_groups(gate, H, parse_pattern("2:4"), r, blocksize=8)
    W, keep = reference_sweep(gate, H, 2, 4, r)
    assert torch.equal(res.mask, keep)
    torch.testing.assert_close(res.weight.double(), W, rtol=1e-4, atol=1e-5)


def test_row_weights_decide_which_rows_keep_their_weights(block):
    gate, up, down, x = block
    r = torch.ones(gate.shape[0])
    r[::4] = 1e6  # the first row of every group of 4 is precious
    res = obs_prune_output_groups(gate, stats(x).hessian(), parse_pattern("2:4"), r)
    assert res.mask[::4].all()
    assert not res.mask[1::4].all()


def test_stacked_matrices_keep_their_own_sparsity(block):
    gate, up, down, x = block
    stacked = torch.cat([gate, up * 100])  # up's weights dwarf gate's
    res = obs_prune_output_groups(stacked, stats(x).hessian(), parse_pattern("0.5"), row_groups=2)
    mg, mu = res.mask.split(gate.shape[0])
    assert torch.all((~mg).sum(0) == gate.shape[0] // 2) and torch.all((~mu).sum(0) == gate.shape[0] // 2)


@pytest.mark.parametrize("arch", ["llama", "mixtral", "phi3"])
@pytest.mark.parametrize("opts", [{}, {"weights": "taylor", "masks": "sweep"}])
def test_end_to_end(arch, opts):
    model = tiny_model(arch)
    report = dass.prune(model, "dass-obs", "2:4", calibration=calib(6, 24), batch_size=3, progress=False, **opts)
    assert report.method == "dass-obs"
    assert report.matrices
    assert any(m.method == "dass-obs" for m in report.matrices)
    for m in report.matrices:
        assert m.sparsity == pytest.approx(0.5, abs=1e-9)
        if m.method == "dass-obs":  # (an expert that got no token falls back to magnitude)
            assert m.orientation == ("output" if m.role in ("gate", "up") else "input")
            assert "damp" in m.info
    for name, w in model.named_parameters():
        assert torch.isfinite(w).all(), name
