"""Each method's masks against a direct, written-out computation of docs/method.md."""

import itertools
import math

import pytest
import torch

from dass.methods import available_methods, get_method
from dass.methods.base import MethodError
from dass.core.patterns import nm_violations, parse_pattern
from dass.core.sparsegpt import SolverError, inverse_cholesky, sparsegpt_prune
from dass.core.stats import FeatureStats
from tiny import feature_stats


def stats_of(x: torch.Tensor, hessian: bool = False) -> FeatureStats:
    return feature_stats(x, hessian)


def direct_nm(score, n, m, along_rows):
    """Loop over every group; keep the n largest (python sorted)."""
    rows, cols = score.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    if along_rows:  # groups of m consecutive input columns in one row
        for r in range(rows):
            for g in range(0, cols, m):
                idx = sorted(range(g, g + m), key=lambda j: -score[r, j].item())[:n]
                for j in idx:
                    keep[r, j] = True
    else:  # groups of m consecutive output rows in one column
        for c in range(cols):
            for g in range(0, rows, m):
                idx = sorted(range(g, g + m), key=lambda i: -score[i, c].item())[:n]
                for i in idx:
                    keep[i, c] = True
    return keep


def direct_unstructured(score, sparsity, group):
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if group == "matrix":
        flat = sorted(itertools.product(range(rows), range(cols)), key=lambda ij: score[ij].item())
        for ij in flat[: int(rows * cols * sparsity)]:
            keep[ij] = False
    elif group == "row":
        for r in range(rows):
            for j in sorted(range(cols), key=lambda j: score[r, j].item())[: int(cols * sparsity)]:
                keep[r, j] = False
    else:
        for c in range(cols):
            for i in sorted(range(rows), key=lambda i: score[i, c].item())[: int(rows * sparsity)]:
                keep[i, c] = False
    return keep


@pytest.fixture
def glu():
    torch.manual_seed(0)
    d, D, T = 8, 16, 40
    x = torch.randn(T, d) * torch.linspace(0.2, 3, d)  # features of different scale
    gate, up, down = torch.randn(D, d), torch.randn(D, d), torch.randn(d, D)
    h = torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())
    return gate, up, down, x, h


def n_j(x):
    return torch.tensor([math.sqrt(sum(float(v) ** 2 for v in x[:, j])) for j in range(x.shape[1])])


@pytest.mark.parametrize("spec", ["2:4", "1:4", "0.5", "0.25"])
def test_magnitude(glu, spec):
    gate, *_ = glu
    p = parse_pattern(spec)
    res = get_method("magnitude").prune_linear(gate, None, p)
    expect = direct_nm(gate.abs(), p.n, p.m, True) if p.is_nm else direct_unstructured(gate.abs(), p.sparsity, "matrix")
    assert torch.equal(res.mask, expect)
    assert res.orientation == ("input" if p.is_nm else None)


@pytest.mark.parametrize("spec", ["2:4", "4:8", "0.5"])
def test_wanda(glu, spec):
    _, _, down, _, h = glu
    p = parse_pattern(spec)
    norms = n_j(h)
    score = torch.tensor([[abs(down[k, j].item()) * norms[j].item() for j in range(down.shape[1])] for k in range(down.shape[0])])
    res = get_method("wanda").prune_linear(down, stats_of(h), p)
    expect = direct_nm(score, p.n, p.m, True) if p.is_nm else direct_unstructured(score, p.sparsity, "row")
    assert torch.equal(res.mask, expect)


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4", "0.5"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_dass_glu_block(glu, spec, alpha):
    gate, up, down, x, h = glu
    p = parse_pattern(spec)
    a = n_j(h)  # a_i = ||H[:, i]||
    method = get_method("dass", alpha=alpha)
    rg, ru, rd = method.prune_glu(gate, up, down, stats_of(x), stats_of(h), p)
    for W, res in ((gate, rg), (up, ru)):
        score = torch.tensor([[abs(W[i, j].item()) * a[i].item() ** alpha for j in range(W.shape[1])] for i in range(W.shape[0])])
        expect = direct_nm(score, p.n, p.m, False) if p.is_nm else direct_unstructured(score, p.sparsity, "column")
        assert torch.equal(res.mask, expect)
        assert res.orientation == ("output" if p.is_nm else None)
    score = torch.tensor([[abs(down[k, i].item()) * a[i].item() for i in range(down.shape[1])] for k in range(down.shape[0])])
    expect = direct_nm(score, p.n, p.m, True) if p.is_nm else direct_unstructured(score, p.sparsity, "row")
    assert torch.equal(rd.mask, expect)
    # DaSS's down mask is exactly Wanda's
    assert torch.equal(rd.mask, get_method("wanda").prune_linear(down, stats_of(h), p).mask)


def test_dass_differs_from_wanda_on_gate(glu):
    gate, up, down, x, h = glu
    p = parse_pattern("2:4")
    rg, _, _ = get_method("dass").prune_glu(gate, up, down, stats_of(x), stats_of(h), p)
    assert not torch.equal(rg.mask, get_method("wanda").prune_linear(gate, stats_of(x), p).mask)


def test_registry_and_bad_options():
    assert set(available_methods()) >= {"magnitude", "wanda", "sparsegpt", "dass"}
    with pytest.raises(MethodError, match="unknown method"):
        get_method("obs")
    with pytest.raises(MethodError):
        get_method("dass", alpha=-1)
    with pytest.raises(MethodError):
        get_method("wanda", alpha=1)


# ------------------------------------------------------------------------ SparseGPT


def reference_fasterprune(W, H, sparsity, prunen, prunem, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt SparseGPT.fasterprune (prunen = weights *pruned* per group).

    One deliberate change: the reference thresholds unstructured blocks with ``<=`` the
    k-th smallest value, which prunes k+1 weights per block; dass prunes exactly k, so the
    reference here uses ``<``.
    """
    W = W.clone().float()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += torch.eye(H.shape[0]) * damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    mask = None
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp < thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.fixture
def correlated():
    torch.manual_seed(0)
    d, out, T = 32, 16, 256
    base = torch.randn(T, 8)
    x = base @ torch.randn(8, d) + 0.1 * torch.randn(T, d)  # strongly correlated inputs
    x[:, 5] = 0  # one dead input
    w = torch.randn(out, d)
    return w, x


@pytest.mark.parametrize("spec,prunen,prunem", [("2:4", 2, 4), ("4:8", 4, 8), ("0.5", 0, 0)])
def test_sparsegpt_matches_reference(correlated, spec, prunen, prunem):
    w, x = correlated
    s = stats_of(x, hessian=True)
    p = parse_pattern(spec)
    ours = sparsegpt_prune(w, s.hessian(), p, blocksize=16)
    ref = reference_fasterprune(w, 2 / x.shape[0] * x.t() @ x, p.sparsity, prunen, prunem, blocksize=16)
    torch.testing.assert_close(ours.weight, ref, rtol=1e-4, atol=1e-5)
    assert ours.dead_inputs == 1
    assert torch.all(ours.weight[:, 5] == 0)


@pytest.mark.parametrize("spec", ["2:4", "4:8", "0.5"])
def test_sparsegpt_reconstructs_better_than_wanda(correlated, spec):
    w, x = correlated
    p = parse_pattern(spec)
    res = get_method("sparsegpt").prune_linear(w, stats_of(x, hessian=True), p)
    wanda = get_method("wanda").prune_linear(w, stats_of(x), p)
    err_sgpt = torch.linalg.norm(x @ w.t() - x @ res.weight.t())
    err_wanda = torch.linalg.norm(x @ w.t() - x @ (w * wanda.mask).t())
    assert err_sgpt < 0.8 * err_wanda
    kept = res.mask & (w != 0)
    kept[:, 5] = False
    assert not torch.allclose(res.weight[kept], w[kept])  # surviving weights were updated
    assert torch.all(res.weight[~res.mask] == 0)
    if p.is_nm:
        assert nm_violations(res.weight, p.n, p.m, "input") == 0
        assert torch.all(res.mask.reshape(w.shape[0], -1, p.m).sum(-1) == p.n)
    else:
        assert (~res.mask).sum() == int(w.numel() * 0.5)


def test_sparsegpt_given_mask_is_respected(correlated):
    w, x = correlated
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    res = sparsegpt_prune(w, stats_of(x, hessian=True).hessian(), parse_pattern("0.5"), mask=mask)
    assert torch.equal(res.mask, mask)
    assert torch.all(res.weight[~mask] == 0)


def test_cholesky_fallback_raises_dampening():
    h = torch.diag(torch.tensor([3.0, -0.5, -0.5, -0.5]))  # indefinite: fails until the dampening dominates
    upper, damp, retries = inverse_cholesky(h, 0.01)
    assert retries > 0 and damp > 0.01
    assert torch.isfinite(upper).all()
    with pytest.raises(SolverError):
        inverse_cholesky(-torch.eye(3), 0.01, max_retries=2)
