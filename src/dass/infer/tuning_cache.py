"""The autotuner's results on disk, so a process does not pay the search on every start.

One JSON file, ``<dass cache dir>/infer-tuning.json`` (``$DASS_CACHE`` or ``~/.cache/dass``,
:func:`dass.io.models.cache_dir`), or the path in ``$DASS_TUNING_CACHE``. Entries live under an
environment signature (GPU name and compute capability, torch, triton, and a hash of the
kernel sources), so a driver, library or kernel change starts a fresh section instead of
replaying stale winners. Writes take a file lock and replace the file atomically; a
damaged or unreadable file is ignored (the search simply runs again).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["TuningCache", "default_cache", "cache_at", "environment_signature"]


@functools.lru_cache(maxsize=None)
def _kernel_hash() -> str:
    here = Path(__file__).resolve().parent / "kernels"
    h = hashlib.sha256()
    for name in ("nm24.py", "tiles.py", "launch.py"):
        try:
            h.update((here / name).read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:12]


def environment_signature(device: torch.device | None = None) -> str:
    """What the tuned numbers depend on besides the shape: GPU, libraries, kernel sources."""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    if torch.cuda.is_available():
        idx = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        gpu = f"{torch.cuda.get_device_name(idx)} sm{''.join(map(str, torch.cuda.get_device_capability(idx)))}"
    else:
        gpu = "cpu"
    return f"{gpu} | torch {torch.__version__} | triton {tv} | kernels {_kernel_hash()}"


class TuningCache:
    """A small persistent dict of tuning results (``get``/``put`` by string key)."""

    def __init__(self, path: str | os.PathLike, signature: str | None = None):
        self.path = Path(path)
        self.signature = signature
        self._data: dict[str, Any] | None = None

    def _sig(self) -> str:
        if self.signature is None:
            self.signature = environment_signature()
        return self.signature

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Any:
        if self._data is None:
            self._data = self._read().get(self._sig(), {})
        return self._data.get(key)

    def put(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON-able) and write the file (merging what other processes wrote)."""
        if self._data is None:
            self._data = self._read().get(self._sig(), {})
        self._data[key] = value
        try:
            from filelock import FileLock

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=30):
                data = self._read()
                section = data.setdefault(self._sig(), {})
                section[key] = value
                tmp = self.path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
        except Exception:  # a read-only or full disk must not stop inference
            pass


@functools.lru_cache(maxsize=None)
def _default_path() -> Path:
    env = os.environ.get("DASS_TUNING_CACHE")
    if env:
        return Path(env).expanduser()
    from dass.io.models import cache_dir

    return cache_dir() / "infer-tuning.json"


_DEFAULT: dict[str, TuningCache] = {}


def cache_at(path: str | os.PathLike) -> TuningCache:
    """The process-wide cache object of the file ``path``."""
    path = str(path)
    if path not in _DEFAULT:
        _DEFAULT[path] = TuningCache(path)
    return _DEFAULT[path]


def default_cache() -> TuningCache:
    """The process-wide cache at the default path."""
    return cache_at(_default_path())
