import pytest
import torch

from dass.core.stats import FeatureStats


def test_batches_equal_concatenation():
    torch.manual_seed(0)
    xs = [torch.randn(3, 7, 5), torch.randn(2, 7, 5), torch.randn(1, 4, 5)]
    acc = FeatureStats(5, with_hessian=True)
    for x in xs:
        acc.add(x.to(torch.bfloat16).float())  # any dtype in; accumulation is fp32
    full = torch.cat([x.to(torch.bfloat16).float().reshape(-1, 5) for x in xs])
    assert acc.tokens == full.shape[0]
    torch.testing.assert_close(acc.sqsum.float(), (full**2).sum(0))
    torch.testing.assert_close(acc.norm, full.norm(dim=0))
    torch.testing.assert_close(acc.xtx.float(), full.t() @ full)
    torch.testing.assert_close(acc.hessian(), 2 / full.shape[0] * full.t() @ full)


def test_merge_equals_single_accumulator():
    torch.manual_seed(1)
    a, b, both = FeatureStats(4, with_hessian=True), FeatureStats(4, with_hessian=True), FeatureStats(4, with_hessian=True)
    x1, x2 = torch.randn(10, 4), torch.randn(6, 4)
    a.add(x1), b.add(x2), both.add(x1), both.add(x2)
    a.merge(b)
    assert a.tokens == both.tokens == 16
    torch.testing.assert_close(a.sqsum, both.sqsum)
    torch.testing.assert_close(a.xtx, both.xtx)


def test_accumulates_in_fp32_from_half():
    acc = FeatureStats(2)
    acc.add(torch.full((4096, 2), 3.0, dtype=torch.float16))  # 9 * 4096 overflows fp16
    assert acc.norm.dtype == torch.float32
    assert acc.sqsum.tolist() == [9.0 * 4096] * 2


def test_totals_do_not_depend_on_the_batch_split():
    """The same batches grouped differently (as ranks would) give bit-identical totals:
    what lets a distributed run choose exactly the masks of a single process."""
    torch.manual_seed(2)
    batches = list((torch.randn(96, 6) * torch.logspace(-2, 2, 6)).split(8))
    one, many = FeatureStats(6, with_hessian=True), FeatureStats(6, with_hessian=True)
    for b in batches:
        one.add(b)
    parts = [FeatureStats(6, with_hessian=True) for _ in range(3)]
    for p, idx in zip(parts, ([7, 11, 3, 0], [1, 9, 2], [10, 4, 8, 5, 6])):  # other order, other grouping
        for i in idx:
            p.add(batches[i])
    for p in parts:
        many.merge(p)
    assert torch.equal(one.sqsum, many.sqsum)
    assert torch.equal(one.hessian(), many.hessian())
    assert torch.equal(one.norm, many.norm)


def _expected_sample(x: torch.Tensor, cap: int) -> torch.Tensor:
    """Written out: the rows whose number is a multiple of the smallest stride 7 * 2^k
    that keeps at most ``cap`` of them."""
    stride = 7
    while len(range(0, x.shape[0], stride)) > cap:
        stride *= 2
    return x[0::stride]


def test_sample_is_spread_over_all_tokens_and_capped():
    x = torch.randn(5000, 3)
    acc = FeatureStats(3, max_samples=40)
    for chunk in x.split(64):
        acc.add(chunk)
    s = acc.sample()
    want = _expected_sample(x, 40)
    assert torch.equal(s, want)
    assert 20 < s.shape[0] <= 40
    assert acc.sample_index[-1][-1] > 5000 - 2 * acc.sample_stride  # reaches the last batches
    assert FeatureStats(3).sample() is None


@pytest.mark.parametrize("sizes", [[5000], [1, 999, 4000], [7] * 700 + [100], [333] * 15 + [5]])
def test_sample_does_not_depend_on_batching(sizes):
    x = torch.randn(sum(sizes), 3)
    acc = FeatureStats(3, max_samples=64)
    for chunk in x.split(sizes):
        acc.add(chunk)
    assert torch.equal(acc.sample(), _expected_sample(x, 64))


def test_sample_of_merged_accumulators_is_capped():
    a, b = FeatureStats(3, max_samples=10), FeatureStats(3, max_samples=10)
    a.add(torch.randn(200, 3))
    b.add(torch.randn(300, 3))
    a.merge(b)
    assert 0 < a.sample().shape[0] <= 10 and a.tokens == 500
