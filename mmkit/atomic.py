"""Atomic file and directory writes: a crash mid-write leaves the previous version intact."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give (mkstemp/mkdtemp make private 0600/0700 files,
    which other users of a shared run directory could not read)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # read, not set: os.umask() changes it process-wide for a moment (other threads create files)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` over ``path`` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory under a temporary name, then swap it in for ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        fill(tmp)
        os.chmod(tmp, default_mode(directory=True))
        for child in tmp.rglob("*"):
            if child.is_file():
                # safetensors' save_file writes 0600 whatever the umask: files of a run are read by the group
                os.chmod(child, default_mode())
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(staged: Path, final: Path) -> None:
    """Replace the directory ``final`` by ``staged`` (same filesystem: renames), never leaving
    neither in place."""
    _fsync_dir(staged)  # its entries are on disk before the rename makes them visible
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
