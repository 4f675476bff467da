"""Compressed checkpoints: a safetensors file whose N:M matrices are stored compressed.

Each N:M matrix ``NAME`` of a state dict is stored by the codec of :mod:`dass.io.nm_codec`
as ``NAME.nm_values`` and ``NAME.nm_mask`` (plus ``NAME.nm_negzero`` when signed zeros
need it); every other tensor is stored dense under its own name. The file's metadata
records the format (:data:`FORMAT_NAME`) and every compressed matrix. The codec's names
are re-exported here, where callers have always imported them from.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from dass.io.nm_codec import (
    ORIENTATIONS,
    FormatError,
    compress_nm,
    compressed_shapes,
    decompress_nm,
    detect_orientation,
    is_nm,
    nm_mask,
    pack_bits,
    unpack_bits,
)

__all__ = [
    "FormatError",
    "ORIENTATIONS",
    "compress_nm",
    "decompress_nm",
    "nm_mask",
    "is_nm",
    "detect_orientation",
    "compressed_shapes",
    "pack_bits",
    "unpack_bits",
    "save_compressed",
    "load_compressed",
    "parse_entry",
    "FORMAT_NAME",
    "VALUES_SUFFIX",
    "MASK_SUFFIX",
    "NEGZERO_SUFFIX",
]

FORMAT_NAME = "dass-nm-v1"
VALUES_SUFFIX = ".nm_values"
MASK_SUFFIX = ".nm_mask"
NEGZERO_SUFFIX = ".nm_negzero"


# --------------------------------------------------------------------------- checkpoint helpers


def parse_entry(entry: Mapping[str, Any]) -> tuple[int, int, str | None] | None:
    """(n, m, orientation) of an N:M manifest entry, or None for unstructured/dense ones."""
    pat = entry.get("pattern")
    n, m = entry.get("n"), entry.get("m")
    if (n is None or m is None) and isinstance(pat, str) and ":" in pat and not pat.startswith("unstructured"):
        a, b = pat.split(":", 1)
        try:
            n, m = int(a), int(b)
        except ValueError:
            return None
    if n is None or m is None:
        return None
    if isinstance(pat, str) and pat.startswith("unstructured"):
        return None
    return int(n), int(m), entry.get("orientation")


def _matrices(manifest: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if manifest is None:
        return {}
    if "matrices" in manifest and isinstance(manifest["matrices"], Mapping):
        return manifest["matrices"]
    return manifest


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Packer:
    """The tensors, metadata and byte counts of a compressed file being assembled."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.kept_dense: dict[str, str] = {}
        self.seen_ptrs: set[int] = set()
        self.dense_total = self.stored_total = self.pruned_dense = self.pruned_stored = 0

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share storage (tied weights): copy repeats
        t = t.detach()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.seen_ptrs:
                t = t.clone()
            self.seen_ptrs.add(t.untyped_storage().data_ptr())
        return t.contiguous().cpu()

    def add_dense(self, name: str, W: torch.Tensor, reason: str | None) -> None:
        if reason is not None:
            self.kept_dense[name] = reason
        self.tensors[name] = self._own(W)
        self.stored_total += _nbytes(W)

    def add_compressed(
        self, name: str, W: torch.Tensor, parts: Mapping[str, torch.Tensor], nmo: tuple[int, int, str], transposed: bool
    ) -> None:
        n, m, orientation = nmo
        self.tensors[name + VALUES_SUFFIX] = parts["values"].cpu()
        self.tensors[name + MASK_SUFFIX] = parts["mask"].cpu()
        if "negzero" in parts:
            self.tensors[name + NEGZERO_SUFFIX] = parts["negzero"].cpu()
        s = sum(_nbytes(t) for t in parts.values())
        self.info[name] = {
            "n": n,
            "m": m,
            "orientation": orientation,
            "shape": list(W.shape),
            "dtype": str(W.dtype).replace("torch.", ""),
            **({"transposed": True} if transposed else {}),
            "dense_bytes": _nbytes(W),
            "stored_bytes": s,
        }
        self.pruned_dense += _nbytes(W)
        self.pruned_stored += s
        self.stored_total += s

    def report(self, path: str) -> dict[str, Any]:
        return {
            "path": path,
            "file_bytes": os.path.getsize(path),
            "dense_bytes": self.dense_total,
            "stored_bytes": self.stored_total,
            "pruned_dense_bytes": self.pruned_dense,
            "pruned_stored_bytes": self.pruned_stored,
            "pruned_ratio": (self.pruned_stored / self.pruned_dense) if self.pruned_dense else None,
            "total_ratio": (self.stored_total / self.dense_total) if self.dense_total else None,
            "compressed": self.info,
            "kept_dense": self.kept_dense,
        }


def _sliced_names(mats: Mapping[str, Any]) -> set[str]:
    """Names (entry keys and their parameters) of the entries for part of a tensor."""
    sliced = {k for k, e in mats.items() if isinstance(e, Mapping) and ("rows" in e or "expert" in e)}
    return sliced | {e.get("param", k) for k, e in mats.items() if k in sliced}


def _classify(
    name: str, W: torch.Tensor, entry: Any, sliced: set[str]
) -> tuple[tuple[int, int, str | None] | None, str | None]:
    """``(n, m, orientation)`` of the manifest entry (or None) and why ``W`` stays dense
    (None: compress it). Raises when the manifest's shape is not the tensor's."""
    nmo = parse_entry(entry) if isinstance(entry, Mapping) else None
    if nmo is None:
        return None, ("not N:M" if entry is not None else None)
    if name in sliced:
        return nmo, "partial-tensor entry (rows/expert): kept dense"
    if W.dim() != 2 or not W.is_floating_point():
        return nmo, "not a 2-D floating weight"
    if "shape" in entry and list(entry["shape"]) != list(W.shape):
        raise FormatError(f"{name}: manifest shape {entry['shape']} != tensor shape {list(W.shape)}")
    return nmo, None


def _compress_entry(
    name: str, W: torch.Tensor, nmo: tuple[int, int, str | None], strict: bool
) -> tuple[dict[str, torch.Tensor] | None, tuple[int, int, str] | None, str | None]:
    """``(parts, (n, m, orientation), None)``, or ``(None, None, reason)`` when ``W`` is not
    the N:M matrix its entry says and ``strict`` is off (with ``strict`` that raises)."""
    n, m, orientation = nmo
    try:
        if orientation is None:
            orientation = detect_orientation(W, n, m)
            if orientation is None:
                raise FormatError(f"not {n}:{m} in either orientation")
        parts = compress_nm(W.detach().contiguous(), n, m, orientation)
    except ValueError as e:
        if strict:
            raise FormatError(f"{name}: manifest says {n}:{m} ({nmo[2]}) but: {e}") from e
        return None, None, f"kept dense: {e}"
    return parts, (n, m, orientation), None


def _write(packer: _Packer, path: str, metadata: Mapping[str, str] | None) -> None:
    """Write the assembled tensors and the format's metadata to ``path`` atomically."""
    from safetensors.torch import save_file

    keep = ("n", "m", "orientation", "shape", "dtype", "transposed")
    listed = {k: {kk: v[kk] for kk in keep if kk in v} for k, v in packer.info.items()}
    meta = {"format": FORMAT_NAME, "nm_matrices": json.dumps(listed)}
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    tmp = path + ".tmp"
    save_file(packer.tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def save_compressed(
    state_dict: Mapping[str, torch.Tensor],
    manifest: Mapping[str, Any] | None,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``state_dict`` to a safetensors file with every N:M matrix compressed.

    ``manifest`` is the ``dass.json`` dict (or its ``"matrices"`` dict). Each N:M entry whose
    tensor is a plain 2-D weight is stored as ``<name>.nm_values`` and ``<name>.nm_mask``;
    everything else is stored dense under its own name. Entries for part of a tensor
    (``"rows"``) or an expert slice (``"expert"``) keep that tensor dense. An entry without an
    orientation is detected from the weights. With ``strict`` a matrix that the manifest calls
    N:M but is not raises ``ValueError``; otherwise it is kept dense.

    The file's metadata records the format and every compressed matrix (n, m, orientation,
    shape, dtype). Returns a report with byte counts (dense vs stored, pruned matrices alone
    and the whole file).
    """
    mats = _matrices(manifest)
    sliced = _sliced_names(mats)
    packer = _Packer()
    for name, W in state_dict.items():
        packer.dense_total += _nbytes(W)
        entry = mats.get(name)
        transposed = bool(isinstance(entry, Mapping) and entry.get("transposed")) and W.dim() == 2
        if transposed:  # stored [in, out] (GPT-2's Conv1D): compressed as the [out, in] matrix
            W = W.t()
        nmo, reason = _classify(name, W, entry, sliced)
        if nmo is not None and reason is None:
            parts, done, reason = _compress_entry(name, W, nmo, strict)
            if parts is not None:
                packer.add_compressed(name, W, parts, done, transposed)
                continue
        packer.add_dense(name, W.t() if transposed else W, reason)
    path = os.fspath(path)
    _write(packer, path, metadata)
    return packer.report(path)


def load_compressed(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, return_info: bool = False
):
    """Read a file written by :func:`save_compressed` and restore the dense state dict.

    Every compressed matrix is validated (``ValueError`` naming the tensor on corruption) and
    decompressed bit-exactly. With ``return_info`` returns ``(state_dict, info)`` where ``info``
    maps each compressed name to its ``{"n", "m", "orientation", "shape", "dtype"}``.
    """
    from dass.io.hashing import read_header

    path = os.fspath(path)
    read_header(path)  # truncated or corrupt: one line naming the file, not the library's error
    try:
        return _load_compressed(path, device, return_info)
    except FormatError:
        raise
    except (_safetensor_error(), ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:  # a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{path}: unreadable compressed checkpoint ({first})") from exc


def _safetensor_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def nm_matrices_info(path: str, meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The per-matrix entries of a compressed file's header metadata (``meta``), checked:
    a file of another format or with unreadable entries is a :class:`FormatError`."""
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} file (format={meta.get('format')!r})")
    try:
        info = json.loads(meta.get("nm_matrices", "{}"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: unreadable nm_matrices metadata: {e}") from e
    if not isinstance(info, dict) or not all(isinstance(e, dict) for e in info.values()):
        raise FormatError(f"{path}: unreadable nm_matrices metadata")
    return info


def _load_compressed(path: str, device: str | torch.device, return_info: bool):
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        info = nm_matrices_info(path, meta)
        keys = set(f.keys())
        out: dict[str, torch.Tensor] = {}
        comp_keys = set()
        for name, e in info.items():
            vk, mk = name + VALUES_SUFFIX, name + MASK_SUFFIX
            if vk not in keys or mk not in keys:
                raise FormatError(f"{path}: compressed matrix {name} lacks {vk} or {mk}")
            comp_keys.update((vk, mk))
            try:
                n, m, o, shape = int(e["n"]), int(e["m"]), e["orientation"], e["shape"]
                parts = {"values": f.get_tensor(vk), "mask": f.get_tensor(mk)}
                if name + NEGZERO_SUFFIX in keys:
                    comp_keys.add(name + NEGZERO_SUFFIX)
                    parts["negzero"] = f.get_tensor(name + NEGZERO_SUFFIX)
                W = decompress_nm(parts, shape, n, m, o)
            except (ValueError, KeyError, TypeError) as err:
                raise FormatError(f"{path}: cannot restore {name}: {err}") from err
            if str(W.dtype).replace("torch.", "") != e.get("dtype", str(W.dtype).replace("torch.", "")):
                raise FormatError(f"{path}: {name} values dtype {W.dtype} != recorded {e['dtype']}")
            out[name] = W.t().contiguous() if e.get("transposed") else W
        for k in keys - comp_keys:
            if k.endswith((VALUES_SUFFIX, MASK_SUFFIX, NEGZERO_SUFFIX)):
                raise FormatError(f"{path}: stray compressed tensor {k} not listed in the metadata")
            out[k] = f.get_tensor(k)
    return (out, info) if return_info else out
