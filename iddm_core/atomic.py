"""Atomic file writes: write a temp file beside the target, then rename over it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import InputError


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``path`` exists and may not be overwritten."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another name or allow overwriting")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _default_mode() -> int:
    """What a plain open() would give a new file: 0o666 minus the process umask (mkstemp would give 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False,
                 mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file to ``path``. The target is never half-written. ``mode``:
    the file's permissions (default: what a plain open() gives); the temp file is 0600 while it is written."""
    path = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode() if mode is None else mode)
        if path.exists() and not overwrite:  # appeared while we worked
            raise InputError(f"{path} already exists; choose another name or allow overwriting")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path, text: str, overwrite: bool = True) -> Path:
    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, _w, overwrite=overwrite)
