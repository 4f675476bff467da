import pytest
import torch

from dass.core.patterns import (
    PatternError,
    nm_violations,
    parse_pattern,
    select_mask,
    select_nm,
    select_unstructured,
    sparsity_of,
)


@pytest.mark.parametrize(
    "spec,kind,n,m,sp",
    [
        ("2:4", "nm", 2, 4, 0.5),
        ("4:8", "nm", 4, 8, 0.5),
        ("1:4", "nm", 1, 4, 0.75),
        ("6:8", "nm", 6, 8, 0.25),
        (" 3 : 5 ", "nm", 3, 5, 0.4),
        ("unstructured:0.5", "unstructured", 0, 0, 0.5),
        ("0.7", "unstructured", 0, 0, 0.7),
        ("50%", "unstructured", 0, 0, 0.5),
        (0.0, "unstructured", 0, 0, 0.0),
    ],
)
def test_parse_valid(spec, kind, n, m, sp):
    p = parse_pattern(spec)
    assert (p.kind, p.n, p.m) == (kind, n, m)
    assert p.sparsity == pytest.approx(sp)
    assert parse_pattern(str(p)) == p


@pytest.mark.parametrize("spec", ["5:4", "0:4", "4:4", "1.2", "-0.1", "1", "unstructured:1.0", "abc", "2:x", "nan"])
def test_parse_invalid(spec):
    with pytest.raises(PatternError):
        parse_pattern(spec)


def test_check_shape_divisibility():
    p = parse_pattern("2:4")
    p.check_shape((8, 12), "input")
    with pytest.raises(PatternError, match="not divisible by M=4"):
        p.check_shape((8, 10), "input")
    with pytest.raises(PatternError, match="dimension 0"):
        p.check_shape((10, 8), "output")


def test_nm_input_orientation_exact():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.1]])
    mask = select_nm(s, 2, 4, "input")
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]


def test_nm_output_orientation_exact():
    s = torch.tensor([[4.0, 1.0], [1.0, 2.0], [3.0, 5.0], [2.0, 0.0]])
    mask = select_nm(s, 2, 4, "output")
    assert mask.tolist() == [[True, False], [False, True], [True, True], [False, False]]


def test_nm_ties_prune_lowest_index_first():
    s = torch.ones(1, 4)
    assert select_nm(s, 2, 4, "input").tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (6, 8), (3, 5)])
@pytest.mark.parametrize("orientation", ["input", "output"])
def test_every_group_holds_exactly_n(n, m, orientation):
    torch.manual_seed(0)
    s = torch.rand(m * 6, m * 5)
    mask = select_nm(s, n, m, orientation)
    w = mask if orientation == "input" else mask.t()
    counts = w.reshape(w.shape[0], -1, m).sum(-1)
    assert torch.all(counts == n)
    assert nm_violations(torch.where(mask, s, torch.zeros_like(s)), n, m, orientation) == 0
    # and the kept entries are the n largest of each group
    g = (s if orientation == "input" else s.t()).reshape(-1, m)
    kept = torch.where(w.reshape(-1, m), g, torch.full_like(g, -1))
    top = g.topk(n, dim=1).values.sort(1).values
    assert torch.equal(kept.sort(1).values[:, m - n :], top)


def test_unstructured_groups_exact():
    s = torch.tensor([[1.0, 9.0, 3.0], [8.0, 2.0, 7.0]])
    assert select_unstructured(s, 0.5, "matrix").tolist() == [[False, True, False], [True, False, True]]
    # row: int(3 * 0.5) = 1 pruned per row
    assert select_unstructured(s, 0.5, "row").tolist() == [[False, True, True], [True, False, True]]
    # column: int(2 * 0.5) = 1 pruned per column
    assert select_unstructured(s, 0.5, "column").tolist() == [[False, True, False], [True, False, True]]


@pytest.mark.parametrize("group", ["matrix", "row", "column"])
@pytest.mark.parametrize("sp", [0.0, 0.25, 0.5, 0.9])
def test_unstructured_fraction_exact(group, sp):
    torch.manual_seed(1)
    s = torch.rand(16, 40)
    mask = select_unstructured(s, sp, group)
    if group == "matrix":
        assert (~mask).sum() == int(640 * sp)
    elif group == "row":
        assert torch.all((~mask).sum(1) == int(40 * sp))
    else:
        assert torch.all((~mask).sum(0) == int(16 * sp))
    # nothing pruned is larger than anything kept within a group
    if sp > 0 and group == "row":
        assert torch.all(torch.where(~mask, s, -torch.inf).max(1).values <= torch.where(mask, s, torch.inf).min(1).values)


def test_select_mask_dispatch_and_sparsity_of():
    s = torch.rand(8, 8)
    m = select_mask(s, parse_pattern("2:4"), group="row", orientation="output")
    assert torch.equal(m, select_nm(s, 2, 4, "output"))
    assert sparsity_of(torch.where(m, s, 0)) == 0.5
