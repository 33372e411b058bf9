"""Atomic file writes: a crash at any moment leaves the old file or the new one, never a
torn one (checkpoints, cached data sets, results JSON, figures)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomically", "write_file_atomically"]


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a binary handle of a temporary file that then replaces
    ``path`` (see :func:`write_file_atomically`)."""

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return write_file_atomically(path, write_file)


def write_file_atomically(path: Path, write_file: Callable[[Path], object]) -> Path:
    """Call ``write_file(tmp)`` to write a temporary file in ``path``'s folder (same
    suffix, for writers that choose the format by it), fsync it, rename it over
    ``path`` and fsync the folder; the temporary file is removed on any failure.

    The file keeps the mode of the file it replaces, and a new one gets the mode that
    ``open`` would give it (0666 less the umask), not mkstemp's 0600. Concurrent writers
    each use their own temporary file: the last rename wins.
    """
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        os.chmod(tmp_name, _mode_for(path))
        write_file(Path(tmp_name))
        _fsync(tmp_name)
        os.replace(tmp_name, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The permission bits the file at ``path`` has, or a new file would get."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # read it: os has no getter
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
