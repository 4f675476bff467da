"""``dass verify``: a saved checkpoint against its manifest, content included.

Two independent checks, so that each kind of damage is named:

- content: every file dass wrote is re-hashed against the manifest's ``files`` (a
  changed safetensors file is narrowed down to the tensors that changed), and the
  manifest against its own ``manifest_sha256``. Catches any edit: a weight set to NaN or
  scaled, an attention weight changed, a flipped byte in a compressed file, an edited or
  deleted manifest entry. Manifests written before the hashes existed get a note instead.
- structure: every pruned matrix is re-read and checked for its shape, its exact count of
  nonzeros (recorded since the hashes; older manifests: the sparsity fraction), N:M
  validity along the recorded orientation, and NaN/inf among its kept weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from dass.core.patterns import nm_violations, parse_pattern
from dass.errors import DassError
from dass.io.checkpoint import is_compressed, read_state_dict, tensor_files
from dass.io.hashing import TensorFileError, hash_file
from dass.io.manifest import SELF_HASH, manifest_digest, read_manifest
from dass.io.outputs import MANIFEST

NO_HASHES = "no content hashes recorded (dass.json written by an older dass): file contents were not checked"


@dataclass
class VerifyResult:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: int = 0  # files whose recorded hashes were checked

    @property
    def ok(self) -> bool:
        return not self.problems


def _list(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def content_problems(ckpt: Path, manifest: dict) -> tuple[list[str], list[str]]:
    """(problems, notes) of the content check: recorded hashes against the files."""
    problems: list[str] = []
    notes: list[str] = []
    files = manifest.get("files")
    if SELF_HASH in manifest:
        if manifest_digest(manifest) != manifest[SELF_HASH]:
            problems.append(f"{MANIFEST}: edited after dass wrote it (its content does not match its recorded hash)")
    elif files is not None:
        problems.append(f"{MANIFEST}: lists file hashes but not its own hash: edited after dass wrote it")
    if files is None:
        notes.append(NO_HASHES)
        return problems, notes
    for name, want in sorted(files.items()):
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{name}: missing (dass wrote it)")
            continue
        try:
            got = hash_file(path)
        except TensorFileError as exc:
            problems.append(f"{name}: {str(exc).split(': ', 1)[-1]}")
            continue
        if got["sha256"] == want["sha256"] and got["bytes"] == want["bytes"]:
            continue
        old, new = want.get("tensors") or {}, got.get("tensors") or {}
        changed = sorted(k for k in old if k in new and old[k] != new[k])
        gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        parts = [f"tensors changed: {_list(changed)}"] if changed else []
        parts += [f"tensors missing: {_list(gone)}"] if gone else []
        parts += [f"tensors added: {_list(added)}"] if added else []
        detail = "; ".join(parts) or "its bytes differ"
        problems.append(f"{name}: content differs from what dass wrote ({detail})")
    extra = sorted(p.name for p in ckpt.iterdir() if p.name not in files and p.name != MANIFEST and not p.name.startswith("."))
    if extra:
        notes.append(f"not written by dass (not checked): {_list(extra)}")
    return problems, notes


def changed_files(ckpt: Path, manifest: dict) -> list[str]:
    """Names of the files (and ``dass.json``) whose content differs from the manifest."""
    problems, _ = content_problems(Path(ckpt), manifest)
    return [p.split(":", 1)[0] for p in problems]


def _lookup(files: dict[str, Path], name: str) -> str | None:
    """The stored name of a parameter (transformers may drop or add a prefix)."""
    if name in files:
        return name
    for cand in files:
        if cand.endswith("." + name) or name.endswith("." + cand):
            return cand
    return None


def _model_parameters(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """In-memory parameter names and values, via transformers. Needed when the stored
    names differ from the module names (transformers 5 stores fused MoE experts as
    per-expert ``w1``/``w2``/``w3`` tensors and converts them back on load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    return dict(model.named_parameters())


class _Weights:
    """Fetches the stored tensors named by manifest entries."""

    def __init__(self, ckpt: Path, entries: dict[str, dict]) -> None:
        self.params: dict[str, torch.Tensor] | None = None
        self.files: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        if is_compressed(ckpt):  # decompressed (and validated) first
            from dass.io.checkpoint import load_pruned_model

            self.params = read_state_dict(ckpt)
            if any(e["name"] not in self.params for e in entries.values()):
                self.params = dict(load_pruned_model(ckpt).named_parameters())
        else:
            self.files = tensor_files(ckpt)
            if any(_lookup(self.files, e["name"]) is None for e in entries.values()):
                self.params = _model_parameters(ckpt)

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if self.params is not None and name in self.params:
            return self.params[name].detach()
        stored = _lookup(self.files, name)
        if stored is None:
            return None
        path = self.files[stored]
        if path not in self.handles:
            self.handles[path] = safe_open(path, "pt")
        return self.handles[path].get_tensor(stored)


def matrix_problems(key: str, entry: dict, w: torch.Tensor, tolerance: float) -> list[str]:
    """What is wrong with one pruned matrix ``w`` (already cut to the entry's part)."""
    if list(w.shape) != list(entry["shape"]):
        return [f"{key}: shape {list(w.shape)} != manifest {entry['shape']}"]
    out = []
    pat = parse_pattern(entry["pattern"])
    nonzeros = int(torch.count_nonzero(w))
    actual = 1 - nonzeros / max(w.numel(), 1)
    if entry.get("nonzeros") is not None:
        if nonzeros != entry["nonzeros"]:
            out.append(f"{key}: {nonzeros} nonzero weights, the manifest records {entry['nonzeros']}")
    elif actual + tolerance < float(entry["sparsity"]):
        out.append(f"{key}: sparsity {actual:.6f} below the recorded {entry['sparsity']:.6f}")
    if actual + tolerance < pat.sparsity:
        out.append(f"{key}: sparsity {actual:.6f} below the pattern's {pat.sparsity:g}")
    if w.is_floating_point():
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            out.append(f"{key}: {bad} kept weight(s) are NaN or infinite")
    if pat.is_nm:
        orient = entry.get("orientation")
        if orient not in ("input", "output"):
            return out + [f"{key}: N:M matrix without a recorded orientation"]
        bad = nm_violations(w, pat.n, pat.m, orient)
        if bad:
            out.append(f"{key}: {bad} group(s) of {pat.m} along the {orient} dimension hold more than {pat.n} nonzeros")
    return out


def verify_checkpoint(ckpt: str | Path, tolerance: float = 1e-6) -> VerifyResult:
    """Check the checkpoint ``ckpt`` against its manifest (see the module doc). A
    malformed manifest raises :class:`~dass.io.outputs.CheckpointError`; every other
    finding is a line in ``problems``. ``tolerance`` applies to sparsity fractions of
    manifests without exact counts."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    entries = manifest.get("matrices", {})
    result = VerifyResult()
    result.problems, result.notes = content_problems(ckpt, manifest)
    result.files = len(manifest.get("files") or {})
    try:
        weights = _Weights(ckpt, entries)
    except (DassError, SafetensorError, OSError, ValueError) as exc:  # unreadable weights: named, not raised
        result.problems.append(f"weights cannot be read: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        return result
    for key, entry in entries.items():
        try:
            w = weights.get(entry["name"])
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            result.problems.append(f"{key}: cannot be read ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")
            continue
        if w is None:
            result.problems.append(f"{key}: tensor {entry['name']} is missing")
            continue
        if entry.get("expert") is not None:
            w = w[entry["expert"]]
        if entry.get("rows"):
            w = w[entry["rows"][0] : entry["rows"][1]]
        if entry.get("transposed"):
            w = w.t()
        result.checked += 1
        result.problems += matrix_problems(key, entry, w, tolerance)
    weights.handles.clear()
    if result.checked == 0 and not entries:
        result.problems.append("the manifest lists no pruned matrix")
    return result
