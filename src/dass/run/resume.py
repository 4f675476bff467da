"""Atomic files and the resumable state of a streaming run.

A streaming run writes into ``OUT.partial/`` next to its output directory. Besides the
output shards it keeps ``OUT.partial/.dass-resume/``:

- ``state.json``: a hash of the run's settings (source checkpoint, method and options,
  pattern, scope, calibration tokens, dtype, batch size, device type, versions), the
  index of the next layer to process, the report entries of the layers before it, and
  the name of the activations file;
- ``activations-NNNNN.safetensors``: the calibration activations entering layer NNNNN.

Every file is written to a temporary name, flushed, fsynced and renamed, and
``state.json`` is replaced last, so whatever moment a run dies at, the state on disk
names files that are complete. Restarting with the same settings continues at that
layer; with different settings it refuses (or starts over when asked to), so one
command never resumes another's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dass.errors import UserValueError

STATE_DIR = ".dass-resume"
STATE_FILE = "state.json"
FORMAT = "dass-resume/1"


class ResumeError(UserValueError):
    """A partial run exists that was started with different settings."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to a temporary name, fsync, rename."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class RunState:
    """The resumable state inside ``OUT.partial``."""

    def __init__(self, partial: Path, settings: dict[str, Any]) -> None:
        self.partial = Path(partial)
        self.dir = self.partial / STATE_DIR
        self.settings = settings
        self.hash = settings_hash(settings)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state if it belongs to these settings; None if there is none.

        Raises :class:`ResumeError` for a state saved by different settings."""
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("settings_hash") != self.hash:
            theirs = state.get("settings", {})
            diff = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            raise ResumeError(
                f"{self.partial} holds a partial run with different settings (differs in: "
                f"{', '.join(diff) or 'versions'}); rerun the same command to resume it, or "
                "start over (resume=False / --no-resume), which deletes it"
            )
        acts = state.get("activations")
        if acts and not (self.dir / acts).is_file():  # pragma: no cover - external tampering
            raise ResumeError(f"{self.dir / acts} named by {self.state_path} is missing")
        return state

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def commit(self, next_layer: int, hidden: list[torch.Tensor] | None, report: dict[str, Any]) -> None:
        """Record that every layer before ``next_layer`` is written and ``hidden`` enters
        ``next_layer``. The activations file is complete before the state names it; the
        previous one is removed only afterwards."""
        self.start()
        old = None
        if self.state_path.is_file():
            old = json.loads(self.state_path.read_text()).get("activations")
        name = None
        if hidden is not None:
            name = f"activations-{next_layer:05d}.safetensors"
            tensors = {f"batch.{j}": h.detach().cpu().contiguous() for j, h in enumerate(hidden)}
            atomic_save_tensors(self.dir / name, tensors)
        state = {
            "format": FORMAT,
            "settings_hash": self.hash,
            "settings": self.settings,
            "next_layer": next_layer,
            "activations": name,
            "report": report,
        }
        atomic_write_json(self.state_path, state)
        if old and old != name:
            (self.dir / old).unlink(missing_ok=True)

    def activations(self, state: dict[str, Any]) -> list[torch.Tensor] | None:
        name = state.get("activations")
        if not name:
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(self.dir / name))
        return [tensors[f"batch.{j}"] for j in range(len(tensors))]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
