"""Atomic files and the resumable state of a streaming run.

A streaming run writes into ``OUT.partial/`` next to its output directory. Besides the
output shards it keeps ``OUT.partial/.dass-resume/``:

- ``state.json``: a hash of the run's settings (source checkpoint, method and options,
  pattern, scope, calibration tokens, dtype, batch size, device type, versions), the
  index of the next layer to process, the report entries of the layers before it, the
  name of the activations file, and the content hash of every source tensor group read
  so far (each decoder layer's tensors, each other tensor);
- ``activations-NNNNN.safetensors``: the calibration activations entering layer NNNNN.

Every file is written to a temporary name, flushed, fsynced and renamed, and
``state.json`` is replaced last, so whatever moment a run dies at, the state on disk
names files that are complete. Restarting with the same settings continues at that
layer; with different settings it refuses (or starts over when asked to), so one
command never resumes another's run.

The source is identified by content, not by file sizes: a model replaced by another of
the same shapes has the same sizes. Hashing every shard up front would read the whole
source once more on every run, so the hashes are taken instead as each layer is read for
pruning (in the reader thread, beside the computation), and a resumed run re-reads only
the layers already done to compare them: a cost paid on resume only, in proportion to
the work it saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from dass.errors import UserValueError
from dass.io.hashing import tensors_digest

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


def read_and_digest(read: Callable[[list[str]], dict[str, torch.Tensor]], keys: list[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``read(keys)`` and the content hash of what was read (run in the reader thread:
    hashlib releases the GIL, so hashing overlaps the computation)."""
    tensors = read(keys)
    return tensors, tensors_digest(tensors)


def source_digest(read: Callable[[list[str]], dict[str, torch.Tensor]], layer_keys: list[list[str]], key: str) -> str:
    """The content hash of one source group: ``layer.N`` (decoder layer N's tensors, as
    :func:`read_and_digest` hashes them while pruning) or a single tensor's name."""
    if key.startswith("layer.") and key[6:].isdigit() and int(key[6:]) < len(layer_keys):
        return read_and_digest(read, layer_keys[int(key[6:])])[1]
    return tensors_digest(read([key]))


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class RunState:
    """The resumable state inside ``OUT.partial``."""

    def __init__(self, partial: Path, settings: dict[str, Any]) -> None:
        self.partial = Path(partial)
        self.dir = self.partial / STATE_DIR
        self.settings = settings
        self.hash = settings_hash(settings)
        #: content hash of each source tensor group read so far ("layer.N" or a tensor name)
        self.source_digests: dict[str, str] = {}

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

    def check_source(self, state: dict[str, Any], digest_of: Callable[[str], str]) -> None:
        """Refuse to resume when the source's content changed since ``state`` was saved:
        ``digest_of(key)`` re-reads and hashes one recorded group ("layer.N" or a tensor
        name). The groups read before the crash are compared; the ones still to do are
        read (and hashed) by the resumed run itself."""
        saved = state.get("source_digests") or {}
        for key in sorted(saved, key=_group_order):
            if digest_of(key) != saved[key]:
                raise ResumeError(
                    f"{self.partial} holds a partial run with different settings (differs in: source weights, "
                    f"{key.replace('layer.', 'layer ')} changed since the run stopped); rerun with the original "
                    "source to resume it, or start over (resume=False / --no-resume), which deletes it"
                )
        self.source_digests.update(saved)

    def record(self, key: str, digest: str) -> None:
        """Note the content hash of a source group read by this run."""
        self.source_digests[key] = digest

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
            "source_digests": dict(self.source_digests),
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


def _group_order(key: str) -> tuple[int, int, str]:
    """Non-layer tensors first (small), then layers in order."""
    if key.startswith("layer.") and key[6:].isdigit():
        return (1, int(key[6:]), key)
    return (0, 0, key)
