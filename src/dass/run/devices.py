"""The compute device a user asked for, checked before any work."""

from __future__ import annotations

import torch

from dass.run.preflight import DeviceError, check_device

__all__ = ["DeviceError", "resolve_device"]


def resolve_device(requested: str | None) -> str:
    """``requested`` if this machine has it (:func:`dass.run.preflight.check_device`), else a
    :class:`DeviceError`; None: CUDA if available, else the CPU."""
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(requested)
    return requested
