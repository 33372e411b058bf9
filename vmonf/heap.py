"""Keep freed heap memory for reuse between training steps (glibc only).

A training step frees its activations and allocates them again in the next step.
With glibc's starting thresholds, blocks above 128 KiB are mapped afresh and the
top of the heap is handed back to the OS whenever 128 KiB (later twice the largest
block freed) lies unused there, so every step pays page faults and zero-filling:
K = 5 flows of 64-wide couplings (655 KB activations) took 700-950 minor faults
and about 2 ms of system time per 18 ms step. :func:`retain_freed_memory` fixes the
two thresholds at the values glibc's own adaptive scheme caps them at on 64-bit
(32 MiB mapping, 64 MiB trimming), so the step reuses its memory (about 5 faults); in
``benchmarks/speed.py``'s ``malloc`` section that step took 0.88-0.93x the time, and
after the couplings became one autograd node, about the same time (14.75 against
14.51 ms; faults 109 -> 0 per step).

It is process-wide and cannot be undone (glibc has no getter for the old values),
which is why it is limited to glibc's own bounds: at most 64 MiB of freed memory
stays with the process. Set ``VMONF_MALLOC_TUNING=0`` to leave malloc untouched.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

MMAP_THRESHOLD = 32 << 20  # bytes: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc sets with that mapping threshold
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (musl and others lack it)
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def retain_freed_memory() -> bool:
    """Fix glibc's mapping and trimming thresholds (once per process); True when applied.

    A no-op returning False off glibc or with ``VMONF_MALLOC_TUNING=0``.
    """
    if os.environ.get("VMONF_MALLOC_TUNING", "1").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
