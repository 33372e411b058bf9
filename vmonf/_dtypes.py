"""Modules built the same whatever torch's default dtype."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["float32_default"]

_LOCK = threading.RLock()


@contextmanager
def float32_default() -> Iterator[None]:
    """Within the block torch's default dtype is float32: modules built there draw the
    same initial weights whatever the caller's default (``randn`` and ``uniform_`` give
    other numbers in float64, which a later cast to float32 does not undo). The caller's
    default is restored after.

    The default is process-wide, so blocks of different threads run one at a time, and
    another thread computing meanwhile sees float32: keep the block to the building.
    """
    with _LOCK:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)
