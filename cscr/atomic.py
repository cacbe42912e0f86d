"""Atomic writes of files and folders: write to a temporary sibling, then rename into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask (read without changing it where /proc tells it; else set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_mode(folder: bool = False) -> int:
    """The mode a plain ``open()`` / ``mkdir()`` would give: 0o666 (files) or 0o777 (folders) less the umask.
    (mkstemp and mkdtemp create 0o600 / 0o700 whatever the umask; outputs are set to this instead.)"""
    return (0o777 if folder else 0o666) & ~_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path`` (same folder, same FS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_dir(folder: str | os.PathLike[str], write: Callable[[Path], object], mode: int | None = None) -> Path:
    """Call ``write(tmp)`` on a new temporary sibling folder, then move it onto ``folder``: a reader
    sees the old folder or the new one, never a mix, and a failed write leaves ``folder`` as it was.
    An existing ``folder`` is set aside, replaced, then removed. ``mode``: the new folder's
    permissions (default: 0o777 less the umask, as ``mkdir`` would give; a temporary folder
    starts as 0o700)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        os.chmod(tmp, default_mode(folder=True) if mode is None else mode)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
