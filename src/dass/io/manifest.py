"""``dass.json``: checking its shape, and sealing it with the content hashes of the output.

A sealed manifest lists every file dass wrote into the output (``files``: bytes, SHA-256,
and for safetensors files the SHA-256 of every tensor) and ends with ``manifest_sha256``,
the hash of the manifest itself without that field (canonical JSON). ``dass verify``
recomputes all of them; ``--overwrite`` replaces an output only if every file in it is
listed. Manifests written before the hashes existed have neither field and still load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dass.io.hashing import hash_files, json_digest
from dass.io.outputs import MANIFEST, CheckpointError, default_file_mode, set_modes

SELF_HASH = "manifest_sha256"
ORIENTATIONS = ("input", "output", None)


def manifest_digest(manifest: dict) -> str:
    """The hash ``manifest_sha256`` records: the manifest without that field."""
    return json_digest({k: v for k, v in manifest.items() if k != SELF_HASH})


def seal(directory: Path, manifest: dict) -> dict:
    """Give the output's files ordinary permissions, record their hashes in ``manifest``,
    add the manifest's own hash and write it as ``directory/dass.json``. Call last, when
    every other file is in place. Returns the written manifest."""
    set_modes(directory, default_file_mode())
    names = [p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    manifest = {k: v for k, v in manifest.items() if k not in ("files", SELF_HASH)}
    manifest["files"] = hash_files(directory, names)
    manifest[SELF_HASH] = manifest_digest(manifest)
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    path.chmod(default_file_mode())
    return manifest


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one ``matrices`` entry, or None."""
    if not isinstance(entry, dict):
        return "is not an object"
    if not isinstance(entry.get("name"), str) or not entry["name"]:
        return "has no 'name' (the tensor's name)"
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s >= 0 for s in shape)):
        return "has no 'shape' of two integers"
    if not isinstance(entry.get("pattern"), str):
        return "has no 'pattern' string"
    sp = entry.get("sparsity")
    if not (isinstance(sp, (int, float)) and not isinstance(sp, bool) and 0 <= sp <= 1):
        return "has no 'sparsity' between 0 and 1"
    if entry.get("orientation") not in ORIENTATIONS:
        return f"has an unknown 'orientation' {entry.get('orientation')!r}"
    for key in ("n", "m", "expert", "nonzeros"):
        if key in entry and entry[key] is not None and not (_is_int(entry[key]) and entry[key] >= 0):
            return f"has a '{key}' that is not a non-negative integer"
    rows = entry.get("rows")
    if rows is not None and not (isinstance(rows, list) and len(rows) == 2 and all(_is_int(r) for r in rows)):
        return "has 'rows' that are not two integers"
    if "transposed" in entry and not isinstance(entry["transposed"], bool):
        return "has a 'transposed' that is not true or false"
    return None


def check_manifest(manifest: Any, where: str | Path) -> dict:
    """Return ``manifest`` if it has the shape dass writes; else raise
    :class:`CheckpointError` with one line naming the first problem (an edited or
    foreign ``dass.json`` must not end in a traceback deep inside verify or compress)."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: not a dass manifest (a JSON {type(manifest).__name__}, not an object)")
    fmt = manifest.get("format")
    if not (isinstance(fmt, str) and fmt.startswith("dass/")):
        raise CheckpointError(f"{where}: not a dass manifest (format {fmt!r}, expected 'dass/1')")
    matrices = manifest.get("matrices", {})
    if not isinstance(matrices, dict):
        raise CheckpointError(f"{where}: 'matrices' is not an object")
    for key, entry in matrices.items():
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(f"{where}: matrix entry {key!r} {problem}")
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise CheckpointError(f"{where}: 'files' is not an object")
        for name, info in files.items():
            ok = (
                isinstance(info, dict)
                and _is_int(info.get("bytes"))
                and isinstance(info.get("sha256"), str)
                and isinstance(info.get("tensors", {}), dict)
                and "/" not in name
                and name not in ("", ".", "..")
            )
            if not ok:
                raise CheckpointError(f"{where}: file entry {name!r} needs 'bytes' and 'sha256'")
    if SELF_HASH in manifest and not isinstance(manifest[SELF_HASH], str):
        raise CheckpointError(f"{where}: '{SELF_HASH}' is not a string")
    return manifest


def read_manifest(ckpt: str | Path) -> dict:
    """The checked ``dass.json`` of a checkpoint directory."""
    path = Path(ckpt) / MANIFEST
    if not Path(ckpt).is_dir():
        raise CheckpointError(f"{ckpt} is not a folder")
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {MANIFEST}: not a checkpoint written by dass")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a text file") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    return check_manifest(data, path)
