"""Atomic, safe checkpoint files: plain tensors and config only, loaded with weights_only.

A file is a ``torch.save`` archive of ``{format, sha256, payload}``, where
``payload`` holds the bytes of a second ``torch.save`` archive (the content) and
``sha256`` their digest: torch's archives carry no checksum of tensor data, so a
flipped byte would otherwise load as silently wrong weights.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmonf._validation import NUMPY_GENERATORS, check_output_file
from vmonf.atomic import write_atomically

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "from_plain",
    "load_checkpoint",
    "plain_setting",
    "save_checkpoint",
    "to_plain",
]

FORMAT_KEY = "vmonf_format"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, foreign or unsafe."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the path (both a CheckpointError and a FileNotFoundError)."""


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike, kind: str) -> Path:
    """Write ``payload`` atomically: temporary file in the same folder, fsync, rename.

    ``kind`` names what the file holds (e.g. ``"VMoNF"``) and is checked on load. A
    crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = check_output_file(path)
    content = io.BytesIO()
    torch.save(payload, content)
    data = torch.frombuffer(bytearray(content.getbuffer()), dtype=torch.uint8)
    digest = hashlib.sha256(content.getbuffer()).hexdigest()
    wrapped = {FORMAT_KEY: kind, "sha256": digest, "payload": data}
    return write_atomically(path, lambda handle: torch.save(wrapped, handle))


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` for ``kind``.

    Uses ``torch.load(weights_only=True)``: a file that would run code on load is
    refused. Any unreadable or foreign file raises :class:`CheckpointError`.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint file at {path}")
    wrapper = _safe_load(path, path)
    if not isinstance(wrapper, dict) or wrapper.get(FORMAT_KEY) != kind:
        found = wrapper.get(FORMAT_KEY) if isinstance(wrapper, dict) else type(wrapper).__name__
        article = "an" if kind[:1].lower() in tuple("aeiou") else "a"
        raise CheckpointError(f"{path} does not hold {article} {kind} checkpoint (found {found!r})")
    data = wrapper.get("payload")
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise CheckpointError(f"{path} is a damaged {kind} checkpoint: no payload")
    content = data.numpy().tobytes()
    if hashlib.sha256(content).hexdigest() != wrapper.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its content does not match its checksum")
    payload = _safe_load(io.BytesIO(content), path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is a damaged {kind} checkpoint: no content")
    return payload


def _safe_load(source: Path | io.BytesIO, path: Path) -> Any:
    is_archive = zipfile.is_zipfile(source)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    if not is_archive:  # torch.load would blame a text file's "unsafe objects"
        raise CheckpointError(
            f"{path} is not a loadable vmonf checkpoint: it is not a torch archive "
            "(vmonf writes zip archives; this file is something else, or truncated)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickles: we raise instead
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged archive fails in many ways (decode, index, zip...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if first_line.startswith("Weights only load failed"):
            # torch goes on to suggest weights_only=False: not for a file we refuse.
            detail = "it holds objects that only an unsafe load would accept"
        else:  # torch's own words, labelled: alone they can be as bare as "101"
            detail = f"torch.load failed with {type(exc).__name__}" + (
                f": {first_line}" if first_line else ""
            )
        raise CheckpointError(
            f"{path} is not a loadable vmonf checkpoint (truncated, corrupted or unsafe): {detail}"
        ) from None


def to_plain(value: object) -> object:
    """numpy values -> tensors/Python scalars, which ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def from_plain(value: object) -> object:
    """Inverse of :func:`to_plain` for arrays: tensors -> numpy."""
    return value.numpy() if isinstance(value, torch.Tensor) else value


def plain_setting(value: object) -> object:
    """A hyper-parameter as ``torch.load(weights_only=True)`` reads it: numpy scalars as
    numbers, paths as str, arrays as lists, inside tuples, lists and dicts too;
    callables (e.g. a callback) and numpy random generators (a ``random_state``) are not
    data and become None."""
    if callable(value) or isinstance(value, NUMPY_GENERATORS):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return type(value)(plain_setting(v) for v in value)
    if isinstance(value, dict):
        return {k: plain_setting(v) for k, v in value.items()}
    return to_plain(value)
