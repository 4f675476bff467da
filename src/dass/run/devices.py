"""The compute device a user asked for, checked before any work."""

from __future__ import annotations

import torch

from dass.errors import UserValueError

DEVICE_TYPES = ("cpu", "cuda")


class DeviceError(UserValueError):
    """A device that does not exist here (no GPU, an unknown device type)."""


def resolve_device(requested: str | None) -> str:
    """``requested`` if it is usable here (``cpu``, ``cuda``, ``cuda:N``), else a
    :class:`DeviceError`; None: CUDA if available, else the CPU."""
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = requested.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise DeviceError(f"--device {requested!r} is not a device dass can use: cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested} requested but no CUDA GPU is available")
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    return requested
