"""Output directories: what dass may replace, one run per output, no leftovers.

Rules, and why:

- dass replaces only what it wrote. An existing output is replaced (``--overwrite``) only
  if it is empty or a dass checkpoint (a ``dass.json`` with a ``dass/`` format) whose
  files are all listed in that manifest; anything else is refused whatever the flag,
  because ``--overwrite`` pointed at the wrong folder must not cost a user their files.
  A folder that is, or contains, the current directory or a source model is never
  replaced.
- One run per output. A run holds an exclusive lock on ``.NAME.lock`` next to its
  output for its whole duration (``flock``: the kernel releases it when the process dies,
  so a killed run never leaves a stale lock; the file records the holder for the message
  a second run prints). The lock file is removed on release. The final rename checks
  again that the output did not appear meanwhile.
- No leftovers. A run that holds the lock removes the ``.NAME.tmp-*`` and ``.NAME.old-*``
  siblings that killed runs left (no live run can own them: it would hold the lock);
  an ``.old`` copy whose replacement never arrived is renamed back instead.

Library code uses :func:`claim` (a reentrant context manager) and :func:`replace_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from dass.errors import UserRuntimeError, UserValueError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: filelock below
    fcntl = None  # type: ignore[assignment]

MANIFEST = "dass.json"
STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-z_]{8}$")


class CheckpointError(UserValueError):
    """An output that exists, a missing manifest, or an unreadable checkpoint."""


class OutputError(CheckpointError):
    """An output that dass must not create or replace."""


class OutputLockedError(UserRuntimeError):
    """Another run is writing the same output."""


# --------------------------------------------------------------------------------------
# What may be replaced
# --------------------------------------------------------------------------------------


def resolve(path: str | os.PathLike) -> Path:
    """Absolute, with ``~`` and symlinks resolved: comparisons of folders need it."""
    return Path(path).expanduser().resolve()


def dass_manifest(path: Path) -> dict | None:
    """The manifest of ``path`` if it is a dass output, else None (also when unreadable)."""
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("format"), str) and data["format"].startswith("dass/"):
        return data
    return None


def foreign_entries(path: Path, manifest: dict) -> list[str]:
    """Entries of ``path`` that dass did not write: every entry not listed in the
    manifest's ``files`` (manifests before file hashes: every subdirectory, since dass
    writes none)."""
    listed = manifest.get("files")
    out = []
    for entry in sorted(path.iterdir()):
        if entry.name == MANIFEST:
            continue
        if isinstance(listed, dict):
            if entry.name not in listed or not entry.is_file() or entry.is_symlink():
                out.append(entry.name)
        elif entry.is_dir():
            out.append(entry.name + "/")
    return out


def _contains(folder: Path, other: Path) -> bool:
    return folder == other or folder in other.parents


def check_output(out: str | os.PathLike, *, overwrite: bool, sources: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Raise :class:`OutputError` unless dass may create ``out``, or replace it under
    ``overwrite``; return it resolved. Nothing is touched."""
    o = resolve(out)
    if not (o.exists() or o.is_symlink()):
        return o
    shown = os.fspath(out)
    cwd = Path.cwd().resolve()
    if _contains(o, cwd):
        raise OutputError(f"output {shown} is the current directory or contains it: dass never replaces that; name a new folder")
    for src in sources:
        if src is not None and _contains(o, resolve(src)):
            raise OutputError(f"output {shown} contains the source model {src}: dass never replaces that; name a new folder")
    if not o.is_dir():
        raise OutputError(f"output {shown} exists and is not a folder: dass replaces only its own outputs; name a new folder")
    if not any(o.iterdir()):
        if overwrite:
            return o
        raise OutputError(f"output {shown} already exists (empty); pass --overwrite to replace it")
    manifest = dass_manifest(o)
    if manifest is None:
        raise OutputError(
            f"output {shown} already exists and is not a dass output (no valid {MANIFEST}): "
            "dass will not replace it, even with --overwrite; name a new folder"
        )
    if not overwrite:
        raise OutputError(f"output {shown} already exists; pass --overwrite to replace it")
    foreign = foreign_entries(o, manifest)
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputError(
            f"output {shown} holds files dass did not write ({listed}): dass will not delete them; "
            "move them out or name a new folder"
        )
    return o


def check_writable(out: str | os.PathLike) -> None:
    """Raise :class:`OutputError` if ``out`` cannot be created where it is named: the
    nearest existing parent must be a writable folder. Tested by creating and removing a
    file there (permission bits lie for root and on network file systems)."""
    o = resolve(out)
    parent = o.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create output {os.fspath(out)}: {parent} is not a folder")
    probe = parent / f".dass-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise OutputError(f"cannot create output {os.fspath(out)}: {parent} is not writable ({exc.strerror})") from None


# --------------------------------------------------------------------------------------
# Replacing
# --------------------------------------------------------------------------------------


def replace_dir(done: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the complete directory ``done`` to ``out``. An existing ``out`` is checked
    again (it may have changed during the run), moved aside, and deleted only once the
    new one is in place; without ``overwrite`` an ``out`` that appeared meanwhile is an
    error and is left alone."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(f"output {out} appeared while this run was working; it was not replaced")
        check_output(out, overwrite=True)
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(done, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(done, out)


def clean_stale(out: Path) -> list[str]:
    """Remove ``.NAME.tmp-*`` and ``.NAME.old-*`` siblings of ``out`` left by killed runs;
    call only while holding ``out``'s lock. An ``.old`` copy is renamed back when ``out``
    is missing (the run that moved it aside died before its replacement arrived).
    Returns what was done, for notes."""
    done = []
    if not out.parent.is_dir():
        return done
    stale = sorted(p for p in out.parent.iterdir() if (m := STALE.match(p.name)) and m["name"] == out.name)
    olds = sorted((p for p in stale if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if olds and not (out.exists() or out.is_symlink()) and olds[-1].is_dir():
        os.replace(olds[-1], out)
        done.append(f"restored {out.name} from {olds[-1].name}")
        stale.remove(olds[-1])
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed {p.name}")
    return done


# --------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` next to an output.

    Not filelock's ``FileLock``: its releases keep the lock file (a leftover next to every
    output) and some versions truncate it on every attempt, erasing the holder's record
    that the refusal message names. Here the holder unlinks the file before unlocking,
    and whoever locks a file checks that it is still the one at the path (else retries).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = lock_path(out)
        self.fd: int | None = None
        self._fallback = None

    def acquire(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            return self._acquire_filelock()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputLockedError(
                    f"output {self.out} is being written by another dass run ({holder}); "
                    "wait for it to finish or name another output"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its holder had just removed: try again
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_text().encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self._fallback is not None:  # pragma: no cover
            self._fallback.release()
            self._fallback = None
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiter that gets the lock sees the file is gone
        os.close(self.fd)
        self.fd = None

    def _acquire_filelock(self) -> None:  # pragma: no cover - platforms without fcntl
        import filelock

        lock = filelock.FileLock(str(self.path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise OutputLockedError(f"output {self.out} is being written by another dass run") from None
        self._fallback = lock


def holder_text() -> str:
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:8]))
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}: {cmd}"


_HELD: dict[Path, list] = {}  # resolved output -> [lock, depth]


@contextlib.contextmanager
def claim(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out``'s lock inside the block (reentrant within a process: the CLI claims an
    output before loading the model and the library code it calls claims it again), and
    clean stale siblings once it is first taken. Yields the resolved output path."""
    o = acquire(out)
    try:
        yield o
    finally:
        release(o)


def acquire(out: str | os.PathLike) -> Path:
    """Take ``out``'s lock (or one more level of it); see :func:`claim`."""
    o = resolve(out)
    held = _HELD.get(o)
    if held is not None:
        held[1] += 1
        return o
    lock = OutputLock(o)
    lock.acquire()
    _HELD[o] = [lock, 1]
    clean_stale(o)
    return o


def release(out: str | os.PathLike) -> None:
    o = resolve(out)
    held = _HELD.get(o)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[o]
        held[0].release()


def release_all() -> None:
    """Release every output lock this process holds (end of a CLI command)."""
    for o in list(_HELD):
        _HELD[o][1] = 1
        release(o)


# --------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------


def default_file_mode() -> int:
    """What ``open()`` gives a new file: 0666 less the umask (writers such as safetensors
    create 0600 files through temporary names)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def set_modes(root: Path, file_mode: int, dir_mode: int | None = None) -> None:
    """``file_mode`` on every file under ``root`` (and ``dir_mode`` on its folders)."""
    if dir_mode is not None:
        root.chmod(dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if dir_mode is not None:
                os.chmod(os.path.join(dirpath, d), dir_mode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, file_mode)


def folder_modes(folder: Path) -> tuple[int, int]:
    """(file mode, folder mode) matching ``folder``: its permission bits, and the same
    without execute bits for files (a shared cache folder shares its files)."""
    mode = folder.stat().st_mode & 0o777
    return mode & 0o666, mode
