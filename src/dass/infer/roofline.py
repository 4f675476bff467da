"""How close a decoding step comes to the GPU's memory bandwidth: bytes a step must read
(weights as stored + the KV cache) over its time, against a copy bandwidth measured in the
same run.

Why: at small batches a decoding step is bound by reading the weights, so tokens/s alone
does not say whether a loop (eager, graphs, compiled) is any good; the fraction of the
memory roofline does, and it is comparable between dense and 2:4 models (a 2:4 model reads
fewer weight bytes, so at the same fraction it is faster).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

__all__ = ["copy_bandwidth", "weight_bytes", "kv_bytes_per_token", "step_bytes", "roofline_fraction"]


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting the bytes read and written (what
    an ideal weight-streaming step could reach). CPU: a smaller copy, timed by the clock."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 24)
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            dst.copy_(src)
        b.record()
        b.synchronize()
        seconds = a.elapsed_time(b) / 1e3 / reps
    else:
        t = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        seconds = (time.perf_counter() - t) / reps
    del src, dst
    return 2 * n * 2 / max(seconds, 1e-12)


def _nm24_bytes(mod, T: int) -> int:
    """Bytes an NM24Linear's chosen path at T tokens reads (compressed, or its dense copy)."""
    path = mod.decision(T).path
    if path == "cslt" and mod.cslt is not None:
        parts = [mod.cslt]
    elif path == "dense" and mod.dense is not None:
        parts = [mod.dense]
    elif path == "cuda" or mod.values is None:
        parts = [mod.cu_values, mod.cu_meta]
    else:
        parts = [mod.values, mod.meta]
    if mod.bias is not None:
        parts.append(mod.bias)
    return sum(t.numel() * t.element_size() for t in parts)


def weight_bytes(model: nn.Module, tokens: int = 1) -> dict[str, int]:
    """``{"read": bytes a step with ``tokens`` tokens reads, "stored": bytes held}`` for the
    model's weights: every parameter and buffer once (tied weights once), 2:4 modules by
    what their path reads, an embedding table by the rows it looks up (unless it is also a
    tied output matrix)."""
    from dass.infer.nm24_linear import NM24Linear

    seen: set[int] = set()
    read = stored = 0
    embeddings: dict[int, int] = {}
    for mod in model.modules():
        if isinstance(mod, NM24Linear):
            for t in mod.stored_tensors():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    stored += t.numel() * t.element_size()
            read += _nm24_bytes(mod, tokens)
            continue
        if isinstance(mod, nn.Embedding):
            w = mod.weight
            embeddings[w.data_ptr()] = min(tokens, w.shape[0]) * w.shape[1] * w.element_size()
    for mod in model.modules():
        if isinstance(mod, NM24Linear):
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            nb = t.numel() * t.element_size()
            stored += nb
            tied = any(t.data_ptr() == p.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)
                       for p in m.parameters(recurse=False)) if t.data_ptr() in embeddings else False
            read += embeddings[t.data_ptr()] if (t.data_ptr() in embeddings and not tied) else nb
    return {"read": read, "stored": stored}


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes per cached token of one sequence (keys and values, every layer)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def step_bytes(model: nn.Module, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """Mean bytes a decoding step must read: weights (as :func:`weight_bytes` counts them at
    ``batch`` tokens) plus the KV cache of the tokens cached so far, averaged over the steps
    (context ``prompt_len + i`` at step ``i``). A static cache's attention may read its whole
    length; the cached tokens are what a step needs, so the fraction is not flattered."""
    w = weight_bytes(model, batch)
    dtype = next(model.parameters()).dtype
    mean_ctx = prompt_len + (new_tokens - 1) / 2
    kv = batch * mean_ctx * kv_bytes_per_token(model.config, dtype)
    return {"weights": float(w["read"]), "weights_stored": float(w["stored"]), "kv": float(kv),
            "total": float(w["read"] + kv)}


def roofline_fraction(bytes_per_step: float, step_s: float, bandwidth: float) -> float:
    """Achieved bytes/s of a step over the measured copy bandwidth."""
    return bytes_per_step / max(step_s, 1e-12) / max(bandwidth, 1e-12)
