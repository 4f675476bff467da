"""Content hashes of files and tensors, and a cheap integrity check of safetensors files.

Why SHA-256: a checkpoint's hashes are meant to be re-checked by ``dass verify`` and also
by hand (``sha256sum model.safetensors`` prints the same digest), and CPUs with SHA
instructions hash at memory speed. The hashes detect changes (a flipped byte, an edited
or replaced weight); they are not a signature: whoever can edit the files can also edit
the manifest and its own hash.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, and the tensor bytes. :func:`hash_file` hashes such
a file in one sequential pass and, on the way, each tensor's bytes separately, so that a
changed file can be narrowed down to the tensors that changed without a second pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from dass.errors import UserValueError

CHUNK = 8 << 20
#: Bytes per element of every safetensors dtype.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
#: Headers larger than this are refused (the safetensors library's own limit).
MAX_HEADER = 100_000_000


class TensorFileError(UserValueError):
    """A tensor file that is truncated, corrupt or not a safetensors file."""


def read_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file, checked for consistency: every
    tensor's byte range matches its dtype and shape, the ranges tile the data section
    without gaps or overlaps, and the file is exactly as long as the header says.
    Reads only the header (a truncated or corrupted file is refused in microseconds)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise TensorFileError(f"{path}: truncated or not a safetensors file (header of {n} bytes in a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TensorFileError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for s in shape:
                numel *= int(s)
            nbytes = numel * DTYPE_BYTES[dtype]
            ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == nbytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise TensorFileError(f"{path}: corrupt safetensors header (entry {name!r})")
        ranges.append((begin, end, name))
    ranges.sort()
    pos = 0
    for begin, end, name in ranges:
        if begin != pos:
            raise TensorFileError(f"{path}: corrupt safetensors header (tensor {name!r} does not follow the previous one)")
        pos = end
    if 8 + n + pos != size:
        what = "truncated" if 8 + n + pos > size else "has trailing bytes"
        raise TensorFileError(f"{path}: {what}: the header describes {8 + n + pos} bytes, the file has {size}")
    return 8 + n, header


def is_safetensors(path: str | Path) -> bool:
    return str(path).endswith(".safetensors")


def hash_file(path: str | Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file; for a safetensors file also ``"tensors"``: the
    SHA-256 of each tensor's bytes, computed in the same pass."""
    path = Path(path)
    whole = hashlib.sha256()
    entry: dict[str, Any] = {"bytes": path.stat().st_size}
    spans: list[tuple[int, int, str]] = []
    start = 0
    if is_safetensors(path):
        start, header = read_header(path)
        spans = sorted((start + i["data_offsets"][0], start + i["data_offsets"][1], k) for k, i in header.items() if k != "__metadata__")
    tensors: dict[str, str] = {}
    with open(path, "rb", buffering=0) as f:
        whole.update(f.read(start))
        for begin, end, name in spans:
            h = hashlib.sha256()
            left = end - begin
            while left:
                buf = f.read(min(CHUNK, left))
                if not buf:  # the file shrank while being read
                    raise TensorFileError(f"{path}: truncated while reading {name}")
                whole.update(buf)
                h.update(buf)
                left -= len(buf)
            tensors[name] = h.hexdigest()
        while buf := f.read(CHUNK):
            whole.update(buf)
    entry["sha256"] = whole.hexdigest()
    if spans:
        entry["tensors"] = dict(sorted(tensors.items()))
    return entry


def hash_files(root: str | Path, names: Iterable[str], workers: int | None = None) -> dict[str, dict[str, Any]]:
    """:func:`hash_file` of ``root/name`` for every name, several files at a time
    (hashlib releases the GIL, so threads hash in parallel)."""
    root = Path(root)
    names = sorted(names)
    workers = workers or min(8, os.cpu_count() or 1, max(len(names), 1))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda n: hash_file(root / n), names)))


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name):
    what identifies the content of a group of weights, e.g. one decoder layer's."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            flat = t.cpu().contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(flat.numpy()))
    return h.hexdigest()


def json_digest(data: Any) -> str:
    """SHA-256 of ``data`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
