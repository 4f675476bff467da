"""Activation statistics accumulated in fp32 over any number of batches.

Pure tensor code. One :class:`FeatureStats` describes the inputs of one weight matrix (or
of several that share an input, such as q/k/v or gate/up): the per-feature sum of squares
(Wanda's and DaSS's norms are its square root) and, when SparseGPT needs it, the sum of
outer products ``X^T X``. Sums, not running means, so that batches and ranks merge by
addition.

Each batch's sums are computed in fp32 (as METHOD.md asks) and added into fp64 totals. An
fp64 sum of fp32 values is exact unless their magnitudes span more than ~2^29, so in
practice the totals do not depend on how the calibration set was split into batches or
across ranks, and a distributed run chooses bit-for-bit the same masks as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
        self.tokens += x.shape[0]
        self._keep_sample(x)

    def _keep_sample(self, x: torch.Tensor) -> None:
        """Keep an evenly strided subset of rows (the first ``max_samples`` of a stride-8
        thinning), in the input dtype, so candidate masks can be tried on real inputs."""
        have = sum(t.shape[0] for t in self.samples)
        if have >= self.max_samples:
            return
        rows = x[::8][: self.max_samples - have]
        self.samples.append(rows.detach().to(self.sqsum.device).clone())

    def sample(self) -> torch.Tensor | None:
        """The kept input rows ``[k, features]`` or None."""
        return torch.cat(self.samples) if self.samples else None

    def merge(self, other: "FeatureStats") -> None:
        """Add another accumulator's sums (another batch split, or another rank)."""
        self.sqsum.add_(other.sqsum.to(self.sqsum.device))
        if self.xtx is not None and other.xtx is not None:
            self.xtx.add_(other.xtx.to(self.xtx.device))
        self.tokens += other.tokens
        for t in other.samples:
            self._keep_sample_rows(t)

    def _keep_sample_rows(self, rows: torch.Tensor) -> None:
        have = sum(t.shape[0] for t in self.samples)
        if have < self.max_samples:
            self.samples.append(rows[: self.max_samples - have].to(self.sqsum.device))

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
