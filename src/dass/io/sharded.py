"""Reading a safetensors checkpoint one group of tensors at a time, and the model skeleton
a streaming run fills layer by layer (parameters on the ``meta`` device until read)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dass.errors import UserValueError
from dass.io.hashing import tensor_digest

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class StreamingError(UserValueError):
    """A checkpoint that cannot be streamed (no safetensors, keys that do not match)."""


class ShardedCheckpoint:
    """The tensors of a safetensors checkpoint directory, read one group at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            self.index_bytes = index.read_bytes()
            weight_map = json.loads(self.index_bytes)["weight_map"]
        elif (self.path / SINGLE).is_file():
            from safetensors import safe_open

            self.index_bytes = b""
            with safe_open(str(self.path / SINGLE), "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise StreamingError(f"{self.path} has no {INDEX} or {SINGLE}: streaming needs safetensors weights")
        self.weight_map: dict[str, str] = dict(weight_map)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU (each file is opened once and closed after)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for fname, names in by_file.items():
            with safe_open(str(self.path / fname), "pt", device="cpu") as f:
                for k in names:
                    out[k] = f.get_tensor(k)
        return {k: out[k] for k in keys}

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor."""
        from safetensors import safe_open

        names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for k, fname in self.weight_map.items():
            with safe_open(str(self.path / fname), "pt") as f:
                dt = f.get_slice(k).get_dtype()
            if dt in names:
                return names[dt]
        return torch.float32

    def nbytes(self, key: str, dtype: torch.dtype) -> int:
        """Bytes of tensor ``key`` once cast to ``dtype`` (floating-point tensors only)."""
        from safetensors import safe_open

        with safe_open(str(self.path / self.weight_map[key]), "pt") as f:
            sl = f.get_slice(key)
            shape, dt = sl.get_shape(), sl.get_dtype()
        numel = 1
        for s in shape:
            numel *= s
        size = dtype.itemsize if dt in ("F64", "F32", "F16", "BF16") else {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(dt, 4)
        return numel * size

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source for resuming: its path, index, config and file sizes."""
        files = sorted(set(self.weight_map.values()))
        config = self.path / "config.json"
        return {
            "path": str(self.path.resolve()),
            "index": tensor_digest(torch.frombuffer(bytearray(self.index_bytes or b"-"), dtype=torch.uint8)),
            "config": config.read_text() if config.is_file() else None,
            "files": {f: (self.path / f).stat().st_size for f in files},
        }


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the ``meta`` device at once (before
    the module initialises it), while buffers (rotary ``inv_freq``, embedding scales) are
    computed for real: the model costs no memory and no initialisation time."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``path``'s config with all parameters on ``meta``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``root`` by ``value``."""
    mod, leaf = _owner(root, name)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:  # pragma: no cover - checked before
        raise KeyError(name)


def get_tensor(root: nn.Module, name: str) -> torch.Tensor:
    mod, leaf = _owner(root, name)
    t = mod._parameters.get(leaf)
    return t if t is not None else mod._buffers[leaf]


def model_tensor_names(root: nn.Module) -> set[str]:
    names = {n for n, _ in root.named_parameters(remove_duplicate=False)}
    return names | {n for n, _ in root.named_buffers(remove_duplicate=False)}
