"""What the GPU here can run: the device check, cuSPARSELt's availability and its algorithm
search, and whether the Triton kernels can run."""

from __future__ import annotations

import os
import warnings

import torch

from dass.errors import UserRuntimeError

__all__ = ["AccelerationError", "check_device", "cslt_supported", "cslt_search", "triton_ok", "interpreting"]


class AccelerationError(UserRuntimeError):
    """Raised when acceleration is impossible here (no supported GPU, bad manifest, ...)."""


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` with triton installed: the kernels then run on the CPU
    through Triton's interpreter (slow; for checking the code on a machine without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and triton_ok()


def check_device(device: torch.device | str | None = None) -> torch.device:
    """The CUDA device to use, or :class:`AccelerationError` if there is none that can run
    the kernels (compute capability 8.0 or newer). Under Triton's interpreter
    (:func:`interpreting`) the CPU is accepted."""
    if interpreting() and (device is None or torch.device(device).type == "cpu") and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise AccelerationError(
            "dass.infer.accelerate needs a CUDA GPU (compute capability >= 8.0, e.g. A100/H100/H200); "
            "none is available here (torch.cuda.is_available() is False). Run the dense model instead."
        )
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        raise AccelerationError(
            f"dass.infer.accelerate needs the model on a CUDA device, got {dev}; move it with model.cuda() first"
        )
    cc = torch.cuda.get_device_capability(dev)
    if cc < (8, 0):
        raise AccelerationError(
            f"dass.infer.accelerate needs compute capability >= 8.0 (sparse tensor cores); {torch.cuda.get_device_name(dev)} is {cc}"
        )
    return dev


_CSLT_OK: dict[int, bool] = {}


def cslt_supported(device: torch.device) -> bool:
    """Whether torch's cuSPARSELt ops run on ``device`` (tried once on a tiny matrix)."""
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CSLT_OK:
        ok = False
        backend = getattr(torch.backends, "cusparselt", None)
        if hasattr(torch, "_cslt_compress") and getattr(backend, "is_available", lambda: True)():
            try:
                w = torch.zeros(64, 64, dtype=torch.float16, device=device)
                w[:, ::2] = 1
                x = torch.ones(16, 64, dtype=torch.float16, device=device)
                y = torch._cslt_sparse_mm(torch._cslt_compress(w), x.t(), transpose_result=True)
                ok = bool(torch.allclose(y.float(), torch.full((16, 64), 32.0, device=device)))
            except Exception:
                ok = False
        _CSLT_OK[idx] = ok
    return _CSLT_OK[idx]


def cslt_search(compressed: torch.Tensor, dense_t: torch.Tensor, transpose_result: bool = True) -> int:
    """cuSPARSELt's fastest algorithm id for ``compressed @ dense_t`` (result transposed or
    not), 0 when the search is not available in this torch."""
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is None:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.11 calls the op deprecated
        found = search(compressed, dense_t, transpose_result=transpose_result)
    return int(found[0] if isinstance(found, (tuple, list)) else found)


def triton_ok() -> bool:
    from dass.infer.kernels import triton_available

    return triton_available()
