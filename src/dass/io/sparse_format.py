"""Compressed storage of N:M sparse matrices (pure tensor code, CPU or GPU).

A weight ``W`` is a 2-D ``nn.Linear`` weight of shape ``[out, in]``; pattern ``N:M`` keeps
``N`` weights in every group of ``M`` consecutive weights.

- orientation ``"input"``: groups run along dim 1 (the reduction dim) within each row;
- orientation ``"output"``: groups run along dim 0 (output rows) within each column.

Compressed form (``compress_nm``) is two tensors:

``values``
    the kept weights, bit for bit, in the dtype of ``W``. The grouped dimension shrinks by
    ``N/M``: shape ``[out, in // M * N]`` for ``"input"`` and ``[out // M * N, in]`` for
    ``"output"``. Within a group the kept weights appear in increasing position order, so
    ``values`` of a 2:4 output-orientation matrix holds, for row-group ``g``, rows ``2g``
    and ``2g + 1`` (this is the layout the output-orientation kernel streams).
``mask``
    the boolean keep-mask of ``W`` (shape ``[out, in]``), flattened in row-major order
    and packed 8 per byte (``uint8``, bit ``k`` of byte ``b`` is element ``8b + k``,
    unused trailing bits are zero). One bit per weight: a 2:4 matrix in bf16/fp16
    takes ``0.5 * 2 + 1/8 = 1.125`` bytes per weight, 56.25% of dense.

``negzero`` (only when needed)
    pruning by multiplication (``W.mul_(mask)``) leaves ``-0.0`` at pruned positions of
    negative weights. When any pruned position holds ``-0.0``, one more packed bitmask,
    one bit per *pruned* position (row-major order), records those signs: +0.5 bit per
    weight for 2:4, so 59.4% of dense for 16-bit weights. The round trip is therefore
    bit-exact, signed zeros included.

Every group keeps exactly ``N`` positions. A group with fewer than ``N`` nonzero weights
still stores ``N`` positions, chosen deterministically: nonzeros first, then negative
zeros, then the earliest remaining positions.

Decompression validates everything it reads and raises ``ValueError`` on a wrong
shape or dtype, or a group whose mask bits do not count exactly ``N``: any single
flipped mask bit is detected.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from dass.errors import UserValueError


class FormatError(UserValueError):
    """A compressed matrix or file that is not what its metadata says (corrupt or edited)."""

__all__ = [
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

ORIENTATIONS = ("input", "output")
FORMAT_NAME = "dass-nm-v1"
VALUES_SUFFIX = ".nm_values"
MASK_SUFFIX = ".nm_mask"
NEGZERO_SUFFIX = ".nm_negzero"


# --------------------------------------------------------------------------- helpers


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or isinstance(m, bool):
        raise FormatError(f"N:M must be integers, got {n!r}:{m!r}")
    if not (0 < n <= m) or m > 64:
        raise FormatError(f"invalid N:M pattern {n}:{m} (need 0 < N <= M <= 64)")


def _check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise FormatError(f"orientation must be 'input' or 'output', got {orientation!r}")


def _group_dim(orientation: str) -> int:
    # dimension of the grouped view that indexes positions inside a group
    return 2 if orientation == "input" else 1


def _grouped_shape(shape: tuple[int, int], m: int, orientation: str) -> tuple[int, int, int]:
    out, inp = shape
    if orientation == "input":
        if inp % m:
            raise FormatError(f"shape {list(shape)}: input dim {inp} is not a multiple of M={m}")
        return (out, inp // m, m)
    if out % m:
        raise FormatError(f"shape {list(shape)}: output dim {out} is not a multiple of M={m}")
    return (out // m, m, inp)


def compressed_shapes(shape, n: int, m: int, orientation: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``values`` and ``mask`` tensors for a matrix of ``shape``."""
    _check_nm(n, m)
    _check_orientation(orientation)
    shape = (int(shape[0]), int(shape[1]))
    _grouped_shape(shape, m, orientation)
    out, inp = shape
    vals = (out, inp // m * n) if orientation == "input" else (out // m * n, inp)
    return {"values": vals, "mask": ((out * inp + 7) // 8,)}




def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened row-major) 8 per byte, little-endian bit order."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`; returns a flat bool tensor of ``numel`` elements.

    Raises ``ValueError`` if the byte count is wrong or a trailing padding bit is set.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise FormatError(f"packed mask must be a 1-D uint8 tensor, got {packed.dtype} {list(packed.shape)}")
    if packed.numel() != (numel + 7) // 8:
        raise FormatError(f"packed mask has {packed.numel()} bytes, expected {(numel + 7) // 8} for {numel} elements")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = ((packed.view(-1, 1) >> shifts) & 1).bool().view(-1)
    if bits.numel() > numel and bool(bits[numel:].any()):
        raise FormatError("packed mask has padding bits set beyond the last element")
    return bits[:numel]


def _float_view_nonzero(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value != 0, is negative zero) for a floating tensor; ints have no signed zero."""
    nz = W != 0
    if W.is_floating_point():
        negzero = (~nz) & torch.signbit(W)
    else:
        negzero = torch.zeros_like(nz)
    return nz, negzero


def _positions_from_keep(keep_g: torch.Tensor, n: int, gdim: int) -> torch.Tensor:
    """Sorted positions (ascending) of the n True entries of every group (exactly n assumed)."""
    # stable sort of ~keep puts kept positions first, in increasing order
    order = torch.sort((~keep_g).to(torch.int8), dim=gdim, stable=True).indices
    return order.narrow(gdim, 0, n)


# --------------------------------------------------------------------------- public API


def nm_mask(W: torch.Tensor, n: int, m: int, orientation: str) -> torch.Tensor:
    """The keep-mask ``compress_nm`` would store for ``W`` (bool, shape of ``W``).

    Raises ``ValueError`` if some group holds more than ``n`` nonzeros.
    """
    _check_nm(n, m)
    _check_orientation(orientation)
    if W.dim() != 2:
        raise FormatError(f"expected a 2-D weight, got shape {list(W.shape)}")
    gshape = _grouped_shape(tuple(W.shape), m, orientation)
    gdim = _group_dim(orientation)
    Wg = W.reshape(gshape)
    nz, negzero = _float_view_nonzero(Wg)
    count = nz.sum(dim=gdim)
    if bool((count > n).any()):
        bad = int((count > n).sum())
        raise FormatError(
            f"not a {n}:{m} matrix in {orientation} orientation: {bad} group(s) of {m} hold more than "
            f"{n} nonzeros (max {int(count.max())})"
        )
    # priority: nonzero (2) > negative zero (1) > +0 (0); ties -> earlier position
    prio = nz.to(torch.int32) * 2 + negzero.to(torch.int32)
    pos_shape = [1, 1, 1]
    pos_shape[gdim] = m
    pos = torch.arange(m, device=W.device, dtype=torch.int32).view(pos_shape)
    key = prio * m + (m - 1 - pos)
    top = torch.topk(key, n, dim=gdim, largest=True, sorted=False).indices
    keep = torch.zeros(gshape, dtype=torch.bool, device=W.device).scatter_(gdim, top, True)
    return keep.view(W.shape)


def is_nm(W: torch.Tensor, n: int, m: int, orientation: str) -> bool:
    """True when every group of ``m`` along ``orientation`` holds at most ``n`` nonzeros."""
    try:
        gshape = _grouped_shape(tuple(W.shape), m, orientation)
    except ValueError:
        return False
    count = (W.reshape(gshape) != 0).sum(dim=_group_dim(orientation))
    return bool((count <= n).all())


def detect_orientation(W: torch.Tensor, n: int, m: int) -> str | None:
    """``"input"`` or ``"output"`` if ``W`` is N:M along that dim (input preferred), else None."""
    for o in ORIENTATIONS:
        if is_nm(W, n, m, o):
            return o
    return None


def compress_nm(
    W: torch.Tensor, n: int, m: int, orientation: str, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Compress an N:M sparse matrix into ``{"values", "mask"}`` (see module doc).

    ``mask`` (optional, bool, shape of ``W``) fixes the kept positions; it must keep exactly
    ``n`` per group and ``W`` must be zero outside it. Without it the positions are chosen
    from ``W`` deterministically. Raises ``ValueError`` when ``W`` is not N:M.
    """
    _check_nm(n, m)
    _check_orientation(orientation)
    if W.dim() != 2:
        raise FormatError(f"expected a 2-D weight, got shape {list(W.shape)}")
    gshape = _grouped_shape(tuple(W.shape), m, orientation)
    gdim = _group_dim(orientation)
    if mask is None:
        keep = nm_mask(W, n, m, orientation)
    else:
        if mask.shape != W.shape or mask.dtype != torch.bool:
            raise FormatError(f"mask must be bool of shape {list(W.shape)}, got {mask.dtype} {list(mask.shape)}")
        keep = mask.to(W.device)
        cnt = keep.reshape(gshape).sum(dim=gdim)
        if bool((cnt != n).any()):
            raise FormatError(f"mask does not keep exactly {n} of every {m} along {orientation}")
        if bool((W.masked_select(~keep) != 0).any()):
            raise FormatError("W has nonzero weights outside the given mask")
    pos = _positions_from_keep(keep.reshape(gshape), n, gdim)
    vals = W.reshape(gshape).gather(gdim, pos)
    shapes = compressed_shapes(W.shape, n, m, orientation)
    parts = {"values": vals.reshape(shapes["values"]).contiguous(), "mask": pack_bits(keep)}
    if W.is_floating_point():
        negz = torch.signbit(W.masked_select(~keep))
        if bool(negz.any()):
            parts["negzero"] = pack_bits(negz)
    return parts


def decompress_nm(parts: Mapping[str, torch.Tensor], shape, n: int, m: int, orientation: str) -> torch.Tensor:
    """Rebuild the dense matrix from :func:`compress_nm`'s output (bit-exact).

    Raises ``ValueError`` on missing/extra parts, wrong shapes or dtypes, and on a mask
    whose groups do not keep exactly ``n`` positions.
    """
    _check_nm(n, m)
    _check_orientation(orientation)
    if len(shape) != 2:
        raise FormatError(f"expected a 2-D shape, got {list(shape)}")
    shape = (int(shape[0]), int(shape[1]))
    if not ({"values", "mask"} <= set(parts) <= {"values", "mask", "negzero"}):
        raise FormatError(f"compressed parts must be 'values', 'mask' (and optionally 'negzero'), got {sorted(parts)}")
    values, packed = parts["values"], parts["mask"]
    shapes = compressed_shapes(shape, n, m, orientation)
    if tuple(values.shape) != shapes["values"]:
        raise FormatError(
            f"values has shape {list(values.shape)}, expected {list(shapes['values'])} for a {n}:{m} "
            f"{orientation}-orientation matrix of shape {list(shape)}"
        )
    if tuple(packed.shape) != shapes["mask"]:
        raise FormatError(f"mask has shape {list(packed.shape)}, expected {list(shapes['mask'])}")
    gshape = _grouped_shape(shape, m, orientation)
    gdim = _group_dim(orientation)
    keep = unpack_bits(packed.to(values.device), shape[0] * shape[1]).view(gshape)
    cnt = keep.sum(dim=gdim)
    if bool((cnt != n).any()):
        bad = int((cnt != n).sum())
        raise FormatError(
            f"corrupted mask: {bad} group(s) do not keep exactly {n} of {m} positions "
            f"(counts seen: {sorted(set(cnt.unique().tolist()))})"
        )
    pos = _positions_from_keep(keep, n, gdim)
    vshape = list(gshape)
    vshape[gdim] = n
    out = torch.zeros(gshape, dtype=values.dtype, device=values.device)
    out.scatter_(gdim, pos, values.reshape(vshape))
    out = out.view(shape)
    if "negzero" in parts:
        pruned = ~keep.view(shape)
        npruned = shape[0] * shape[1] // m * (m - n)
        neg = unpack_bits(parts["negzero"].to(values.device), npruned)
        if not values.is_floating_point():
            raise FormatError("negzero part given for a non-floating matrix")
        zeros = torch.zeros(npruned, dtype=values.dtype, device=values.device)
        out[pruned] = torch.where(neg, -zeros, zeros)
    return out


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
    from safetensors.torch import save_file

    mats = _matrices(manifest)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    kept_dense: dict[str, str] = {}
    seen_ptrs: set[int] = set()
    dense_total = stored_total = pruned_dense = pruned_stored = 0

    def _own(t: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share storage (tied weights): copy repeats
        t = t.detach()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_ptrs:
                t = t.clone()
            seen_ptrs.add(t.untyped_storage().data_ptr())
        return t.contiguous().cpu()

    sliced = {k for k, e in mats.items() if isinstance(e, Mapping) and ("rows" in e or "expert" in e)}
    sliced_params = {e.get("param", k) for k, e in mats.items() if k in sliced}
    for name, W in state_dict.items():
        dense_total += _nbytes(W)
        entry = mats.get(name)
        nmo = parse_entry(entry) if isinstance(entry, Mapping) else None
        reason = None
        transposed = bool(isinstance(entry, Mapping) and entry.get("transposed")) and W.dim() == 2
        if transposed:  # stored [in, out] (GPT-2's Conv1D): compressed as the [out, in] matrix
            W = W.t()
        if nmo is None:
            reason = "not N:M" if entry is not None else None
        elif name in sliced or name in sliced_params:
            reason = "partial-tensor entry (rows/expert): kept dense"
        elif W.dim() != 2 or not W.is_floating_point():
            reason = "not a 2-D floating weight"
        elif "shape" in entry and list(entry["shape"]) != list(W.shape):
            raise FormatError(f"{name}: manifest shape {entry['shape']} != tensor shape {list(W.shape)}")
        if nmo is not None and reason is None:
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
                reason = f"kept dense: {e}"
            else:
                tensors[name + VALUES_SUFFIX] = parts["values"].cpu()
                tensors[name + MASK_SUFFIX] = parts["mask"].cpu()
                if "negzero" in parts:
                    tensors[name + NEGZERO_SUFFIX] = parts["negzero"].cpu()
                s = sum(_nbytes(t) for t in parts.values())
                info[name] = {
                    "n": n,
                    "m": m,
                    "orientation": orientation,
                    "shape": list(W.shape),
                    "dtype": str(W.dtype).replace("torch.", ""),
                    **({"transposed": True} if transposed else {}),
                    "dense_bytes": _nbytes(W),
                    "stored_bytes": s,
                }
                pruned_dense += _nbytes(W)
                pruned_stored += s
                stored_total += s
                continue
        if reason is not None:
            kept_dense[name] = reason
        tensors[name] = _own(W.t() if transposed else W)
        stored_total += _nbytes(W)

    keep = ("n", "m", "orientation", "shape", "dtype", "transposed")
    meta = {"format": FORMAT_NAME, "nm_matrices": json.dumps({k: {kk: v[kk] for kk in keep if kk in v} for k, v in info.items()})}
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return {
        "path": path,
        "file_bytes": os.path.getsize(path),
        "dense_bytes": dense_total,
        "stored_bytes": stored_total,
        "pruned_dense_bytes": pruned_dense,
        "pruned_stored_bytes": pruned_stored,
        "pruned_ratio": (pruned_stored / pruned_dense) if pruned_dense else None,
        "total_ratio": (stored_total / dense_total) if dense_total else None,
        "compressed": info,
        "kept_dense": kept_dense,
    }


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


def _load_compressed(path: str, device: str | torch.device, return_info: bool):
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: not a {FORMAT_NAME} file (format={meta.get('format')!r})")
        try:
            info = json.loads(meta.get("nm_matrices", "{}"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: unreadable nm_matrices metadata: {e}") from e
        if not isinstance(info, dict) or not all(isinstance(e, dict) for e in info.values()):
            raise FormatError(f"{path}: unreadable nm_matrices metadata")
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
