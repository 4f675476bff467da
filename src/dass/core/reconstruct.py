"""Fixed-mask reconstruction: fit the kept weights of a pruned block to the dense block.

Pure tensor code: what a "block" is and how it is called is the caller's business (the run
passes a closure that evaluates the block on chosen calibration rows). Here live the
parts that do not depend on the model:

- :class:`MaskedParams`: fp32 master copies of the weights being fitted, their trainable
  masks (the kept positions of the pruned matrices) and the frozen remainder; the weight
  seen by the block is ``master * mask + frozen * ~mask``, so a pruned position stays
  exactly zero and the N:M pattern is exact whatever the optimiser does;
- :func:`fit`: Adam on the masters with a warm-up and cosine (or constant) learning rate,
  one batch of sampled rows per step, gradients reduced by a caller-given function (the
  all-reduce of a distributed run), with the learning rate optionally scaled by each
  matrix's RMS so one setting serves models whose weights differ in scale;
- :func:`sample_rows`: the seeded row sample of every step, drawn from one generator that
  every process builds alike, so K processes see the same rows as one.

The loss is the block output's squared error summed over the sampled rows divided by the
dense output's mean squared norm times the number of rows (a relative error: 1.0 means as
bad as outputting zeros), so one learning rate serves every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

#: ``loss_fn(weights, rows) -> (sum of squared errors, rows evaluated)`` for the rows this
#: process holds among ``rows`` (global row numbers); the weights are the block's current
#: effective weights by name.
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, int]]
#: Sums tensors over processes in place (identity in a single process).
Reduce = Callable[[list[torch.Tensor]], None]


def _no_reduce(tensors: list[torch.Tensor]) -> None:
    return None


@dataclass
class MaskedParams:
    """The weights of one block being fitted (by parameter name)."""

    masters: dict[str, torch.Tensor]  # fp32, requires_grad
    masks: dict[str, torch.Tensor]  # bool, True = trainable (kept) position
    frozen: dict[str, torch.Tensor]  # the original values (zeros at pruned positions)

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> "MaskedParams":
        masters = {k: w.detach().float().clone().requires_grad_(True) for k, w in weights.items()}
        frozen = {k: w.detach() for k, w in weights.items()}
        return cls(masters, {k: masks[k].to(w.device) for k, w in weights.items()}, frozen)

    def effective(self) -> dict[str, torch.Tensor]:
        """The weights the block computes with: fitted where trainable, frozen elsewhere."""
        return {
            k: torch.where(self.masks[k], m, self.frozen[k].to(m.dtype)) for k, m in self.masters.items()
        }

    def result(self) -> dict[str, torch.Tensor]:
        """Final weights in the original dtypes (pruned positions exactly zero)."""
        with torch.no_grad():
            return {k: w.to(self.frozen[k].dtype) for k, w in self.effective().items()}

    def rms(self) -> dict[str, float]:
        """Root mean square of each matrix's kept weights (for an RMS-relative learning rate)."""
        out = {}
        for k, m in self.masters.items():
            kept = m.detach()[self.masks[k]]
            out[k] = float(kept.pow(2).mean().sqrt()) if kept.numel() else 0.0
        return out


def sample_rows(generator: torch.Generator, total: int, count: int) -> torch.Tensor:
    """``count`` distinct row numbers in ``[0, total)`` (all of them, in order, when
    ``count >= total``), drawn on the CPU so every process draws the same."""
    if count >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:count].sort().values


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then constant or cosine decay to zero at ``steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be cosine or constant, got {schedule!r}")
    span = max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


@dataclass
class FitResult:
    loss_before: float
    loss_after: float
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss every ``log_every`` steps


def evaluate(params: MaskedParams, loss_fn: LossFn, rows: torch.Tensor, norm: float, reduce: Reduce = _no_reduce,
             chunk: int = 4096) -> float:
    """Relative error of the block on ``rows`` (in chunks, no gradients)."""
    device = next(iter(params.masters.values())).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        weights = params.effective()
        for part in rows.split(chunk):
            err, n = loss_fn(weights, part)
            total[0] += err.double() if isinstance(err, torch.Tensor) else float(err)
            total[1] += n
    reduce([total])
    return float(total[0]) / max(float(total[1]) * norm, 1e-30)


def fit(
    params: MaskedParams,
    loss_fn: LossFn,
    total_rows: int,
    norm: float,
    *,
    steps: int,
    lr: float,
    batch_rows: int,
    generator: torch.Generator,
    eval_rows: torch.Tensor,
    schedule: str = "cosine",
    warmup: int = 0,
    lr_scale: str = "rms",
    betas: tuple[float, float] = (0.9, 0.999),
    reduce: Reduce = _no_reduce,
    on_step: Callable[[int], None] | None = None,
    log_every: int = 0,
) -> FitResult:
    """Fit ``params`` by Adam on ``steps`` batches of ``batch_rows`` sampled rows.

    ``norm``: the dense block output's mean squared norm per row (the loss's scale).
    ``lr_scale="rms"``: each matrix's learning rate is ``lr`` times the RMS of its kept
    weights (``"absolute"``: ``lr`` as given). ``eval_rows``: the rows on which the loss
    is measured before and after (the report's numbers). ``reduce`` sums gradients and
    losses over processes. The best of the start and the end (by the loss on
    ``eval_rows``) is kept, so a fit never makes a block worse on the rows it reports.
    """
    before = evaluate(params, loss_fn, eval_rows, norm, reduce)
    if steps <= 0:
        return FitResult(before, before, 0)
    start = {k: m.detach().clone() for k, m in params.masters.items()}
    scale = params.rms() if lr_scale == "rms" else {k: 1.0 for k in params.masters}
    groups = [{"params": [m], "lr": lr * (scale[k] or 1.0), "base": lr * (scale[k] or 1.0)}
              for k, m in params.masters.items()]
    opt = torch.optim.Adam(groups, lr=lr, betas=betas)
    for m in params.masters.values():  # every process steps every parameter, rows or not
        m.grad = torch.zeros_like(m)
    losses: list[float] = []
    for step in range(steps):
        f = lr_factor(step, steps, warmup, schedule)
        for g in opt.param_groups:
            g["lr"] = g["base"] * f
        rows = sample_rows(generator, total_rows, batch_rows)
        err, n = loss_fn(params.effective(), rows)
        loss = err / max(min(batch_rows, total_rows) * norm, 1e-30)
        opt.zero_grad(set_to_none=False)
        if loss.requires_grad:  # False only on a process that holds none of the rows
            loss.backward()
        reduce([m.grad for m in params.masters.values()])
        opt.step()
        if log_every and step % log_every == 0:
            losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    after = evaluate(params, loss_fn, eval_rows, norm, reduce)
    if not after <= before:  # also catches NaN: keep the masked weights as they were
        with torch.no_grad():
            for k, m in params.masters.items():
                m.copy_(start[k])
        after = before
    return FitResult(before, after, steps, losses)
