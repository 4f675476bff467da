"""CUDA graphs for the decoding steps of Hugging Face ``generate()`` with a static KV cache.

:class:`DecodeGraphs` wraps ``model.forward``: a call that decodes (one new token per
sequence) is replayed from a graph captured for its input signature; anything else
(prefill, a dynamic cache, hidden states requested) runs the model as it is. Why: at decode
time a 7B model's step is a few milliseconds of GPU work and comparable host work per layer;
a replay costs one launch.

How a step is made replayable, for any transformers version whose static cache is built for
``torch.compile`` (its tensors are updated in place):

- every tensor argument is copied into a static buffer of the captured shape; a 2-D
  attention mask is widened to the cache's full length with zeros (the static cache's
  masks span its full length anyway, so the result is the same);
- non-tensor arguments and the cache object's identity are part of the graph's key;
- the warm-up runs before capture move the cache's small bookkeeping tensors (e.g. the
  number of cached tokens); they are restored afterwards, and the keys/values written at
  the current position are written again, identically, by the replay.

If capture fails (an operation in the step cannot be captured), the wrapper logs why and
runs eagerly from then on. ``capture`` is a parameter so that the plumbing can be checked
without a GPU (``capture=lambda fn: fn`` re-runs the step instead of replaying it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from dass.infer.kernels.capture import graph_capture

__all__ = ["DecodeGraphs", "cuda_capture"]


def cuda_capture(fn: Callable[[], Any]) -> Callable[[], None]:
    """Capture ``fn`` into a CUDA graph (after two warm-up runs on a side stream); return its replay."""
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    cur.wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with graph_capture(g):
        fn()
    return g.replay


def _cache_len(cache: Any) -> int | None:
    for obj in [cache, *(getattr(cache, "layers", None) or [])]:
        n = getattr(obj, "max_cache_len", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _small_state(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) of the cache's bookkeeping tensors (not its keys/values)."""
    out = []
    for obj in [cache, *(getattr(cache, "layers", None) or [])]:
        for v in list(vars(obj).values()):
            if isinstance(v, torch.Tensor) and v.numel() <= 64:
                out.append((v, v.clone()))
    return out


class _Entry:
    def __init__(self, inputs: dict[str, torch.Tensor], replay: Callable[[], None], out: dict[str, Any]):
        self.inputs, self.replay, self.out = inputs, replay, out


class DecodeGraphs:
    """Wrap ``model.forward`` so decoding steps with a static cache replay CUDA graphs.

    ``DecodeGraphs(model)`` installs itself; :meth:`remove` restores the model.
    ``log`` lists what happened (captures, fall-backs and why)."""

    def __init__(self, model: torch.nn.Module, capture: Callable[[Callable[[], Any]], Callable[[], None]] = cuda_capture,
                 max_graphs: int = 16):
        self.model = model
        self.capture = capture
        self.max_graphs = max_graphs
        self.orig = model.forward
        self._own_forward = "forward" in vars(model)  # an instance attribute already (e.g. accelerate's)
        self.entries: dict[tuple, _Entry] = {}
        self.log: list[str] = []
        self.disabled = False
        self.replays = 0
        # a plain function carrying the original signature: generate() inspects forward's parameters
        @functools.wraps(self.orig)
        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        model.forward = forward

    def remove(self) -> None:
        if self._own_forward:
            self.model.forward = self.orig
        else:
            vars(self.model).pop("forward", None)
        self.entries.clear()

    def _forward(self, *args, **kwargs):
        if args:  # generate() passes keywords; positional input_ids is mapped for other callers
            kwargs = {"input_ids": args[0], **kwargs}
            args = args[1:]
        plan = None if (args or self.disabled) else self._plan(kwargs)
        if plan is None:
            return self.orig(*args, **kwargs)
        key, tensors, others = plan
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(key, tensors, others)
            if entry is None:
                return self.orig(**kwargs)
        for name, t in tensors.items():
            dst = entry.inputs[name]
            if dst.shape == t.shape:
                dst.copy_(t)
            else:  # an attention mask widened to the cache length
                dst.zero_()
                dst[..., : t.shape[-1]].copy_(t)
        entry.replay()
        self.replays += 1
        return entry.out["y"]

    def _plan(self, kwargs: dict[str, Any]):
        """(key, tensor inputs, other inputs) of a decoding step, or None to run eagerly."""
        ids = kwargs.get("input_ids")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or kwargs.get("inputs_embeds") is not None:
            return None
        if cache is None or not getattr(cache, "is_compileable", False) or _cache_len(cache) is None:
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return None
        tensors: dict[str, torch.Tensor] = {}
        others: dict[str, Any] = {}
        sig = []
        for k, v in kwargs.items():
            if k in ("past_key_values", "cache"):
                others[k] = v
                sig.append((k, id(v)))
            elif isinstance(v, torch.Tensor):
                tensors[k] = v
                shape = tuple(v.shape)
                if k == "attention_mask" and v.dim() == 2:
                    shape = (v.shape[0], _cache_len(cache))
                sig.append((k, shape, v.dtype, v.device))
            else:
                others[k] = v
                sig.append((k, repr(v)))
        return tuple(sorted(sig, key=lambda s: s[0])), tensors, others

    def _capture(self, key: tuple, tensors: dict[str, torch.Tensor], others: dict[str, Any]) -> _Entry | None:
        cache = others.get("past_key_values", others.get("cache"))
        inputs: dict[str, torch.Tensor] = {}
        with torch.inference_mode(False):
            for k, v in tensors.items():
                if k == "attention_mask" and v.dim() == 2:
                    buf = v.new_zeros(v.shape[0], _cache_len(cache))
                    buf[:, : v.shape[1]].copy_(v)
                else:
                    buf = v.clone()
                inputs[k] = buf
        out: dict[str, Any] = {}
        saved = _small_state(cache)

        def step():
            out["y"] = self.orig(**inputs, **others)

        try:
            with torch.inference_mode(False), torch.no_grad():
                replay = self.capture(step)
        except Exception as e:  # noqa: BLE001 -- a step that cannot be captured runs eagerly
            self.log.append(f"capture failed ({type(e).__name__}: {str(e)[:200]}); decoding eagerly from now on")
            self.disabled = True
            return None
        finally:
            for t, v in saved:
                t.copy_(v)
        if len(self.entries) >= self.max_graphs:
            self.entries.pop(next(iter(self.entries)))
        entry = self.entries[key] = _Entry(inputs, replay, out)
        self.log.append(f"captured a decoding step: batch {next(iter(tensors.values())).shape[0]}")
        return entry
