"""Atomic, safe checkpoint files: plain tensors and config only, loaded with weights_only."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT_KEY = "vmonf_format"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, foreign or unsafe."""


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike, kind: str) -> Path:
    """Write ``payload`` atomically: temporary file in the same folder, fsync, rename.

    ``kind`` names what the file holds (e.g. ``"VMoNF"``) and is checked on load. A
    crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({**payload, FORMAT_KEY: kind}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` for ``kind``.

    Uses ``torch.load(weights_only=True)``: a file that would run code on load is
    refused. Any unreadable or foreign file raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a loadable vmonf checkpoint (truncated, corrupted or unsafe): "
            f"{first_line}"
        ) from None
    if not isinstance(payload, dict) or payload.get(FORMAT_KEY) != kind:
        found = payload.get(FORMAT_KEY) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} does not hold a {kind} checkpoint (found {found!r})")
    return payload
