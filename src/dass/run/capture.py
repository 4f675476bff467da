"""Capture what enters decoder layer 0 and the arguments the model passes to each layer.

The model's own forward runs with every decoder layer replaced by a catcher, so masks,
positions and rotary embeddings are computed exactly as in inference, for every layer
(Gemma 2/3 alternate sliding-window and global masks). Helpers to move nested call
arguments between devices live here too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dass.arch import decoder_layers
from dass.run.memory import to_store

try:  # progress bars are a nicety, never a requirement
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it=None, **_: Any):  # type: ignore[no-redef]
        return it


def move_module(module: nn.Module, device: torch.device | str) -> None:
    """``module.to(device)`` that leaves parameters on the ``meta`` device where they are
    (a streaming skeleton keeps its decoder layers there)."""
    module._apply(lambda t: t if t.is_meta else t.to(device))


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside (nested tuples, lists, dicts);
    other values as they are. A layer's call arguments are such nests."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, o) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(fn, o) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor inside (nested tuples, lists, dicts) moved to ``device``."""
    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), obj)


_DROP_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


def clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """No KV cache through calibration: it would grow across samples."""
    out = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
    if "use_cache" in out:
        out["use_cache"] = False
    if "output_attentions" in out:
        out["output_attentions"] = False
    return out


def first_output(output: Any) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers >= 4.56) or a tuple (older)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Stop(Exception):
    """Raised by a hook to end a layer's forward early (the rest of its output is not needed)."""


@dataclass
class LayerInputs:
    """Calibration activations entering the current layer, one tensor per batch, plus the
    per-layer call arguments (keyed by batch size: they depend only on the shape)."""

    hidden: list[torch.Tensor]
    args: list[dict[int, tuple[tuple, dict[str, Any]]]]  # per layer: batch size -> (args, kwargs)

    def call_args(self, layer: int, batch: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        return self.args[layer][batch.shape[0]]


class _Catcher(nn.Module):
    """Stands in for a decoder layer during capture: records what it is called with."""

    def __init__(self, original: nn.Module, index: int, sink: dict, last: bool, returns_tuple: bool) -> None:
        super().__init__()
        self.__dict__["_original"] = original  # not a submodule: model.to() must not move it
        self.index, self.sink, self.last, self.returns_tuple = index, sink, last, returns_tuple

    def __getattr__(self, name: str) -> Any:  # e.g. ``attention_type`` read by the model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        hidden = first_output(hidden)
        if self.index == 0:
            self.sink["hidden"] = hidden
        self.sink.setdefault("args", {})[self.index] = (rest, clean_kwargs(kwargs))
        if self.last:
            raise Stop
        return (hidden,) if self.returns_tuple else hidden


def _returns_tuple(layer: nn.Module) -> bool:
    ann = inspect.signature(layer.forward).return_annotation
    return "tuple" in str(ann).lower()


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device,
    store_device: torch.device,
    progress: bool = True,
    restore: bool = True,
) -> LayerInputs:
    """Run the model's own forward with every decoder layer replaced by a catcher.

    The model computes masks, positions and rotary embeddings exactly as in inference, for
    every layer (Gemma 2/3 alternate sliding-window and global masks); nothing of the
    decoder layers runs, and only the non-layer modules are moved to ``device`` (and back
    afterwards when ``restore``). Parameters on the ``meta`` device are left alone.
    """
    path, layers = decoder_layers(model)
    originals = list(layers)
    tuple_out = _returns_tuple(originals[0])
    model_device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    per_layer: list[dict[int, tuple[tuple, dict]]] = [dict() for _ in originals]
    hidden: list[torch.Tensor] = []
    sink: dict = {}
    try:
        for i, orig in enumerate(originals):
            layers[i] = _Catcher(orig, i, sink, i == len(originals) - 1, tuple_out)
        move_module(model, device)
        for batch in tqdm(batches, desc="capture", disable=not progress, leave=False):
            sink.clear()
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except Stop:
                pass
            else:  # pragma: no cover - a model that skips layers
                raise RuntimeError("the model returned without calling its last decoder layer")
            hidden.append(to_store(sink["hidden"].detach(), store_device))
            bs = batch.shape[0]
            for i, call in sink["args"].items():
                if bs not in per_layer[i]:
                    per_layer[i][bs] = call
    finally:
        for i, orig in enumerate(originals):
            layers[i] = orig
        if restore:
            move_module(model, model_device)
    return LayerInputs(hidden, per_layer)
