"""Activation statistics accumulated in fp32 over any number of batches.

Pure tensor code. One :class:`FeatureStats` describes the inputs of one weight matrix (or
of several that share an input, such as q/k/v or gate/up): the per-feature sum of squares
(Wanda's and DaSS's norms are its square root) and, when SparseGPT needs it, the sum of
outer products ``X^T X``. Sums, not running means, so that batches and ranks merge by
addition.

Each batch's sums are computed in fp32 (as docs/method.md says) and added into fp64 totals. An
fp64 sum of fp32 values is exact unless their magnitudes span more than ~2^29, so in
practice the totals do not depend on how the calibration set was split into batches or
across ranks, and a distributed run chooses bit-for-bit the same masks as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: First stride of the kept-row thinning. Odd, so that doubled strides (7 * 2^k) do not
#: divide a power-of-two window length: the kept rows fall on different positions in
#: different windows instead of always on the first token (an attention sink).
SAMPLE_STRIDE = 7


@dataclass
class FeatureStats:
    """Sums over calibration tokens of one input space of ``features`` dimensions."""

    features: int
    device: torch.device | str = "cpu"
    with_hessian: bool = False
    max_samples: int = 0  # keep up to this many input rows (for methods that test candidates)
    sqsum: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False, default=None)
    tokens: int = field(init=False, default=0)
    samples: list[torch.Tensor] = field(init=False, default_factory=list)
    sample_index: list[torch.Tensor] = field(init=False, default_factory=list)  # global row numbers of samples
    sample_stride: int = field(init=False, default=SAMPLE_STRIDE)

    def __post_init__(self) -> None:
        self.sqsum = torch.zeros(self.features, dtype=torch.float64, device=self.device)
        if self.with_hessian:
            self.xtx = torch.zeros(self.features, self.features, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``x`` of shape ``[..., features]`` (any dtype)."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.features:
            raise ValueError(f"expected {self.features} features, got {x.shape[-1]}")
        if x.shape[0] == 0:
            return
        xf = x.to(device=self.sqsum.device, dtype=torch.float32)
        self.sqsum.add_(xf.pow(2).sum(0))
        if self.xtx is not None:
            self.xtx.add_(xf.t() @ xf)
        if self.max_samples:
            self._keep_sample(x, self.tokens)
        self.tokens += x.shape[0]

    def _keep_sample(self, x: torch.Tensor, start: int) -> None:
        """Keep the rows whose global row number is a multiple of ``sample_stride`` (in the
        input dtype), doubling the stride and thinning what is kept whenever more than
        ``max_samples`` rows would be kept. The kept rows are spread evenly over *all* the
        calibration tokens seen so far (between half and all of ``max_samples`` of them once
        there are enough), and they do not depend on how the tokens were split into batches.
        Candidate masks are tried on them (``dass --alpha auto``), so they must represent
        every calibration window, not the first batch."""
        first = (-start) % self.sample_stride
        if first < x.shape[0]:
            rows = x[first :: self.sample_stride]
            idx = start + first + self.sample_stride * torch.arange(rows.shape[0])
            self.samples.append(rows.detach().to(self.sqsum.device).clone())
            self.sample_index.append(idx)
        while sum(t.shape[0] for t in self.samples) > self.max_samples:
            self.sample_stride *= 2
            samples, index = [], []
            for rows, idx in zip(self.samples, self.sample_index):
                pos = (idx % self.sample_stride == 0).nonzero().flatten()
                if pos.numel():
                    samples.append(rows[pos.to(rows.device)])
                    index.append(idx[pos])
            self.samples, self.sample_index = samples, index

    def sample(self) -> torch.Tensor | None:
        """The kept input rows ``[k, features]`` or None."""
        return torch.cat(self.samples) if self.samples else None

    def merge(self, other: "FeatureStats") -> None:
        """Add another accumulator's sums (another batch split, or another rank)."""
        self.sqsum.add_(other.sqsum.to(self.sqsum.device))
        if self.xtx is not None and other.xtx is not None:
            self.xtx.add_(other.xtx.to(self.xtx.device))
        if self.max_samples and other.samples:
            # both sets of kept rows, every other row dropped while over the cap (exact
            # batch independence holds for add(), not across merges)
            mine = [self.sample()] if self.samples else []
            rows = torch.cat(mine + [other.sample().to(self.sqsum.device)])
            idx = torch.cat(self.sample_index + [i + self.tokens for i in other.sample_index])
            while rows.shape[0] > self.max_samples:
                rows, idx = rows[::2], idx[::2]
            self.samples, self.sample_index = [rows], [idx]
            self.sample_stride = max(self.sample_stride, other.sample_stride)
        self.tokens += other.tokens

    @property
    def norm(self) -> torch.Tensor:
        """Per-feature L2 norm over all tokens (Wanda's ``||X_j||``, DaSS's ``a_i``), fp32."""
        return self.sqsum.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """SparseGPT's ``H = 2/T X^T X`` (fp32)."""
        if self.xtx is None:
            raise ValueError("these statistics were gathered without the Hessian")
        return (self.xtx * (2.0 / max(self.tokens, 1))).float()

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to sum across ranks (all-reduce), in a fixed order."""
        return [self.sqsum] + ([self.xtx] if self.xtx is not None else [])
