"""Calibration token ids: from a tensor, a list of tensors or a text source, and this
process's share of the batches."""

from __future__ import annotations

from typing import Any

import torch

from dass.errors import UserValueError
from dass.run import distributed


class CalibrationError(UserValueError):
    """Calibration data missing or unusable."""


def as_calibration_tensor(
    calibration: Any,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids ``[N, L]`` from a tensor, a list of token tensors, or a text source."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration if calibration.dim() == 2 else calibration.reshape(1, -1)
    elif isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], torch.Tensor):
        rows = [c.reshape(-1) for c in calibration]
        if len({r.numel() for r in rows}) != 1:
            raise CalibrationError("calibration sequences must all have the same length")
        ids = torch.stack(rows)
    elif isinstance(calibration, str):
        if tokenizer is None:
            raise CalibrationError("a text calibration source needs a tokenizer")
        from dass.io.data import sample_calibration

        ids = sample_calibration(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
    else:
        raise CalibrationError(
            "calibration must be token ids (tensor [N, L] or a list of tensors) or a text source "
            "('default', a .txt or .jsonl file, 'c4', 'wikitext2')"
        )
    if ids.numel() == 0:
        raise CalibrationError("calibration data is empty")
    return ids.long()


def activation_bytes(ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of the calibration activations of one layer boundary."""
    return ids.numel() * hidden_size * dtype.itemsize


def calibration_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """This process's calibration batches: all of them, or under torch.distributed a
    disjoint share (statistics are then all-reduced per layer)."""
    ctx = distributed.current()
    batches = list(ids.split(batch_size))
    if len(batches) < ctx.world:
        raise CalibrationError(
            f"{len(batches)} calibration batches cannot be shared by {ctx.world} processes: "
            "use more samples or a smaller --batch-size"
        )
    return ctx.shard(batches)
