"""``AutoModelForCausalLM.from_pretrained`` on a compressed dass checkpoint.

transformers loads a model stored in a format of its own through a registered
quantization config and quantizer (``quant_method`` in ``config.json``), which is how
compressed-tensors and torchao plug in. :func:`dass.io.checkpoint.compress_checkpoint`
writes ``"quantization_config": {"quant_method": "dass", ...}``
(:func:`dass.io.hf_registry.quantizer_entry`),
and this module registers the matching :class:`DassNMConfig` and :class:`DassNMQuantizer`.

How a load goes (the same on transformers 5.17 and 5.2x):

1. Before the weight files are looked up, the quantizer points transformers at the
   compressed file (``config.transformers_weights``). The checkpoint deliberately has no
   ``model.safetensors``: without dass, transformers warns that the quantization type
   ``dass`` is unknown and then fails to find the weights, instead of loading a model
   whose pruned matrices are missing (random).
2. Before the weights are read, every compressed ``<module>.<param>`` becomes a
   placeholder submodule ``<param>`` with buffers named like the stored tensors
   (``nm_values``, ``nm_mask``, ``nm_negzero``), so transformers' own loader reads them,
   on the requested device and dtype, with no custom weight conversion.
3. After loading, each placeholder is decompressed (validated, bit-exact) into the dense
   parameter and the quantization config is removed: the result is an ordinary dense
   model, and ``save_pretrained`` on it writes an ordinary checkpoint.

Importing this module imports transformers' quantizer registry (seconds), so
``import dass`` does not import it; :mod:`dass.io.hf_registry` registers it when transformers
loads its registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dass.errors import UserRuntimeError
from dass.io.hf_registry import QUANT_METHOD, REQUIRES
from dass.io.nm_codec import FormatError, decompress_nm
from dass.io.sparse_format import FORMAT_NAME, MASK_SUFFIX, NEGZERO_SUFFIX, VALUES_SUFFIX, nm_matrices_info

_PART_SUFFIXES = {"values": VALUES_SUFFIX, "mask": MASK_SUFFIX, "negzero": NEGZERO_SUFFIX}


class UnsupportedTransformers(UserRuntimeError):
    """The installed transformers loads weights in a way this quantizer does not expect."""


class DassNMConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressed dass checkpoint: where the weights are
    and in which format; everything per matrix (N:M, orientation, shape, dtype) is in
    that file's safetensors header, and how it was pruned is in ``dass.json``."""

    def __init__(self, file: str, format: str = FORMAT_NAME, requires: str = REQUIRES, **_ignored: Any):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.file = file
        self.requires = requires
        if format != FORMAT_NAME:
            raise FormatError(f"quantization_config format {format!r} is not {FORMAT_NAME!r}: written by a newer dass?")
        if "/" in file or "\\" in file or not file.endswith(".safetensors"):
            raise FormatError(f"quantization_config file {file!r} must be a .safetensors file name in the checkpoint")


@dataclass
class _Compressed:
    """One compressed parameter: where it goes and how to rebuild it (from the header)."""

    module: str  # owning module, "" for the root
    param: str  # parameter name on that module
    n: int
    m: int
    orientation: str
    shape: tuple[int, int]  # of the compressed [out, in] matrix
    parts: tuple[str, ...]  # "values", "mask" and, when stored, "negzero"
    transposed: bool = False  # the parameter is stored [in, out] (GPT-2's Conv1D)

    @property
    def param_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape


def _read_header(path: str) -> list[_Compressed]:
    """The compressed parameters listed in a compressed file's header (tensors unread)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
    info = nm_matrices_info(path, meta)
    out = []
    for name, e in info.items():
        parts = tuple(p for p, s in _PART_SUFFIXES.items() if name + s in keys)
        if not {"values", "mask"} <= set(parts):
            raise FormatError(f"{path}: compressed matrix {name} lacks {name + VALUES_SUFFIX} or {name + MASK_SUFFIX}")
        module, _, param = name.rpartition(".")
        out.append(_Compressed(module, param, int(e["n"]), int(e["m"]), e["orientation"], tuple(e["shape"]), parts,
                               bool(e.get("transposed", False))))
    return out


class _Placeholder(torch.nn.Module):
    """Stands where a compressed parameter goes until the stored parts are loaded into it."""


def _placeholder(c: _Compressed, dtype: torch.dtype, device: torch.device) -> _Placeholder:
    from dass.io.nm_codec import compressed_shapes

    shapes = compressed_shapes(c.shape, c.n, c.m, c.orientation)
    pruned = c.shape[0] * c.shape[1] // c.m * (c.m - c.n)
    holder = _Placeholder()
    holder.register_buffer("nm_values", torch.empty(shapes["values"], dtype=dtype, device=device))
    holder.register_buffer("nm_mask", torch.empty(shapes["mask"], dtype=torch.uint8, device=device))
    if "negzero" in c.parts:
        holder.register_buffer("nm_negzero", torch.empty(((pruned + 7) // 8,), dtype=torch.uint8, device=device))
    return holder


class DassNMQuantizer(HfQuantizer):
    """Loads a compressed dass checkpoint as a dense model (see the module docstring)."""

    requires_calibration = True  # loads compressed checkpoints only; it compresses nothing itself

    def __init__(self, quantization_config: DassNMConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._compressed: list[_Compressed] = []
        self._dtype: torch.dtype | None = None

    # -- before the weight files are looked up: read the compressed file ---------------
    # transformers 5.2x calls update_attn_implementation(config) there, 5.17 update_tp_plan
    # and update_ep_plan; each points the lookup at the compressed file.
    def _point_at_file(self, config: Any) -> Any:
        config.transformers_weights = self.quantization_config.file
        return config

    def update_attn_implementation(self, config: Any) -> Any:
        return self._point_at_file(config)

    def update_tp_plan(self, config: Any) -> Any:
        return self._point_at_file(config)

    def update_ep_plan(self, config: Any) -> Any:
        return self._point_at_file(config)

    # -- on the empty (meta) model, before the weights are read ------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        files = [f for f in checkpoint_files or [] if str(f).endswith(self.quantization_config.file)]
        if len(files) != 1:
            raise UnsupportedTransformers(
                f"transformers read {checkpoint_files}, not {self.quantization_config.file}: this transformers "
                "version cannot load compressed dass checkpoints with from_pretrained; use dass.io.checkpoint.load_pruned_model"
            )
        self._compressed = _read_header(str(files[0]))
        for c in self._compressed:
            try:
                owner = model.get_submodule(c.module)
                current = getattr(owner, c.param)
            except AttributeError:
                raise FormatError(f"compressed matrix {c.module}.{c.param} is not a parameter of {type(model).__name__}") from None
            if not isinstance(current, torch.Tensor) or tuple(current.shape) != c.param_shape:
                raise FormatError(f"compressed matrix {c.module}.{c.param}: the model has {getattr(current, 'shape', None)}, "
                                  f"the file {list(c.param_shape)}")
            values_dtype = current.dtype if self._dtype is None else self._dtype
            delattr(owner, c.param)
            owner.add_module(c.param, _placeholder(c, values_dtype, current.device))
        return model

    def preprocess_model(self, model, dtype=None, **kwargs: Any):
        # the base class does not pass dtype on; the values are read in the dense weights' dtype
        self._dtype = dtype
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    # -- after loading: rebuild the dense parameters, drop the quantization config -----
    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        for c in self._compressed:
            owner = model.get_submodule(c.module)
            holder = getattr(owner, c.param)
            parts = {p: getattr(holder, "nm_" + p) for p in c.parts}
            name = f"{c.module}.{c.param}" if c.module else c.param
            if any(t.device.type == "meta" for t in parts.values()):
                raise FormatError(f"{name}: compressed weights cannot be offloaded to disk; load without a disk device_map")
            try:
                dense = decompress_nm(parts, c.shape, c.n, c.m, c.orientation)
                if c.transposed:
                    dense = dense.t().contiguous()
            except ValueError as err:
                raise FormatError(f"{self.quantization_config.file}: cannot restore {name}: {err}") from err
            delattr(owner, c.param)
            owner.register_parameter(c.param, torch.nn.Parameter(dense))
        self._compressed = []
        if getattr(model.config, "transformers_weights", None) == self.quantization_config.file:
            del model.config.transformers_weights
        self.remove_quantization_config(model)
        return model

    def postprocess_model(self, model, **kwargs: Any):
        return self._process_model_after_weight_loading(model, **kwargs)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False  # the loaded model is dense; it saves as an ordinary checkpoint

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Make ``quant_method: "dass"`` known to transformers (idempotent)."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is DassNMQuantizer:
        return
    register_quantization_config(QUANT_METHOD)(DassNMConfig)
    register_quantizer(QUANT_METHOD)(DassNMQuantizer)
