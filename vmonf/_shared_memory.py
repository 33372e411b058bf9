"""Sum-all-reduce of CPU tensors between processes of one machine, through shared memory.

gloo moves every all-reduce through loopback TCP sockets and its own threads: about
1 ms for a K = 5 model's 178,000 gradients between two idle processes on this
project's 2-core machines, about 3 ms inside training, where those threads compete
with the ranks for the cores (one-off probes); in ``benchmarks/speed.py --sections
split`` a data-parallel step took 2.3-4.9 ms longer with gloo. Here each rank copies its
tensor into its own slot of a shared buffer, the ranks meet at a barrier of
process-shared POSIX semaphores (one per ordered pair of ranks), and every rank adds
the slots up in rank order, so that all ranks hold bitwise the same sum (replicas
stay identical). The slots come in two sets used in turn, which is why one barrier
per call is enough: a rank cannot write a set again before every other rank has
passed the next barrier, that is, has finished reading it.

Linux only (glibc's ``sem_*`` through ctypes, tmpfs at /dev/shm). A group opens a
buffer collectively at its first reduction; ranks that cannot all map the same
buffer (several machines, no /dev/shm, a /dev/shm too small) are detected by a token
check and fall back to gloo. ``VMONF_SHARED_MEMORY=0`` on any rank turns it off for
all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import sys
import time
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["SharedMemoryReducer", "open_reducer"]

_SHM_DIR = "/dev/shm"
_ALIGN = 64  # a cache line: no two ranks write the same one
_SEM_BYTES = 64  # sizeof(sem_t) is 32 on 64-bit Linux; padded to a cache line
_TOKEN_BYTES = 16
_MIN_SLOT_BYTES = 1 << 20
_WAIT_SLICE_S = 0.2  # sem_timedwait slices: lets Ctrl-C and the deadline through


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc() -> ctypes.CDLL | None:
    """glibc with its process-shared semaphores typed, or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    for name in ("c", "pthread"):  # glibc < 2.34 keeps sem_* in libpthread
        path = ctypes.util.find_library(name)
        if path is None:
            continue
        lib = ctypes.CDLL(path, use_errno=True)
        if all(hasattr(lib, f) for f in ("sem_init", "sem_post", "sem_timedwait")):
            lib.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
            lib.sem_post.argtypes = [ctypes.c_void_p]
            lib.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
            for f in (lib.sem_init, lib.sem_post, lib.sem_timedwait):
                f.restype = ctypes.c_int
            return lib
    return None


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _data_offset(size: int) -> int:
    """Byte offset of the slots: after the token's line and the size x size semaphores.
    The buffer holds ``_data_offset(size) + 2 * size * slot_bytes`` bytes."""
    return _ALIGN + _aligned(size * size * _SEM_BYTES)


class SharedMemoryReducer:
    """One process group's shared buffer: W x W semaphores and 2 x W slots of
    ``slot_bytes`` each. Build it with :func:`open_reducer` (a collective call)."""

    def __init__(
        self,
        buffer: Tensor,
        libc: ctypes.CDLL,
        rank: int,
        size: int,
        slot_bytes: int,
        timeout: float,
    ) -> None:
        self.buffer, self.libc = buffer, libc
        self.rank, self.size, self.slot_bytes, self.timeout = rank, size, slot_bytes, timeout
        self.calls = 0
        self.failed = False  # after an error the semaphores' counts no longer pair up
        self._data_offset = _data_offset(size)

    def _semaphore(self, sender: int, receiver: int) -> int:
        """Address of the semaphore that ``sender`` posts for ``receiver``."""
        return self.buffer.data_ptr() + _ALIGN + (sender * self.size + receiver) * _SEM_BYTES

    def init_semaphores(self) -> None:
        """Set every semaphore to 0 (once, on the rank that made the buffer)."""
        for sender in range(self.size):
            for receiver in range(self.size):
                if self.libc.sem_init(self._semaphore(sender, receiver), 1, 0):
                    raise OSError(ctypes.get_errno(), "sem_init failed")

    def _slots(self, parity: int, nbytes: int, dtype: torch.dtype) -> list[Tensor]:
        start = self._data_offset + parity * self.size * self.slot_bytes
        return [
            self.buffer[start + r * self.slot_bytes : start + r * self.slot_bytes + nbytes].view(
                dtype
            )
            for r in range(self.size)
        ]

    def fits(self, values: Tensor) -> bool:
        return values.numel() * values.element_size() <= self.slot_bytes

    def all_reduce_(self, values: Tensor) -> Tensor:
        """Sum the contiguous CPU tensor ``values`` over the ranks, in place; returns it."""
        if self.failed:
            raise RuntimeError("an earlier all-reduce of this process group failed")
        nbytes = values.numel() * values.element_size()
        slots = self._slots(self.calls % 2, nbytes, values.dtype)
        self.calls += 1
        flat = values.detach().view(-1)
        slots[self.rank].copy_(flat)
        try:
            self._barrier()
        except BaseException:  # a timeout, Ctrl-C: the next barrier would pair wrongly
            self.failed = True
            raise
        torch.add(slots[0], slots[1], out=flat)
        for slot in slots[2:]:
            flat.add_(slot)
        return values

    def _barrier(self) -> None:
        for other in range(self.size):
            if other != self.rank and self.libc.sem_post(self._semaphore(self.rank, other)):
                raise OSError(ctypes.get_errno(), "sem_post failed")
        deadline = time.monotonic() + self.timeout
        for other in range(self.size):
            if other != self.rank:
                self._wait(self._semaphore(other, self.rank), deadline, other)

    def _wait(self, semaphore: int, deadline: float, other: int) -> None:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise RuntimeError(
                    f"rank {other} did not reach the all-reduce within "
                    f"{self.timeout:g} s (VMONF_DIST_TIMEOUT): it has stopped or hangs"
                )
            until = time.time() + min(deadline - now, _WAIT_SLICE_S)  # sem_* take wall time
            when = _Timespec(int(until), int((until % 1) * 1e9))
            if self.libc.sem_timedwait(semaphore, ctypes.byref(when)) == 0:
                return
            code = ctypes.get_errno()
            if code not in (errno.ETIMEDOUT, errno.EINTR):
                raise OSError(code, "sem_timedwait failed")


def open_reducer(
    min_slot_bytes: int, timeout: float, *, enabled: bool = True
) -> SharedMemoryReducer | None:
    """Collective: every rank of the default group calls it with the same sizes.

    Returns the group's reducer with slots of at least ``min_slot_bytes`` (1 MiB or
    more), or None on every rank when any rank cannot share the buffer or has it
    turned off (``enabled=False``): then use gloo."""
    rank, size = dist.get_rank(), dist.get_world_size()
    libc = _libc() if enabled else None
    slot_bytes = _aligned(max(_MIN_SLOT_BYTES, min_slot_bytes))
    total = _data_offset(size) + 2 * size * slot_bytes
    offer: list[object] = [None]
    buffer: Tensor | None = None
    created: str | None = None
    try:
        if rank == 0 and libc is not None and os.path.isdir(_SHM_DIR):
            token = secrets.token_bytes(_TOKEN_BYTES)
            created = os.path.join(_SHM_DIR, f"vmonf-{os.getpid()}-{token.hex()}")
            try:
                buffer = _map(created, total, create=True)
                buffer[:_TOKEN_BYTES] = torch.frombuffer(bytearray(token), dtype=torch.uint8)
                SharedMemoryReducer(buffer, libc, rank, size, slot_bytes, timeout).init_semaphores()
                offer = [(created, token)]
            except (OSError, RuntimeError):  # e.g. /dev/shm full (ENOSPC from fallocate)
                buffer = None
        dist.broadcast_object_list(offer, src=0)
        if rank != 0 and offer[0] is not None and libc is not None:
            path, expected = cast(tuple[str, bytes], offer[0])
            try:
                buffer = _map(path, total, create=False)
                if bytes(buffer[:_TOKEN_BYTES].tolist()) != expected:
                    buffer = None  # a file of that name, but not rank 0's: another machine
            except (OSError, RuntimeError):
                buffer = None
        ok = torch.tensor([int(buffer is not None)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # also: every rank has mapped it
    finally:  # the mappings keep the memory alive; the name must not outlive this call
        if created is not None and os.path.exists(created):
            os.unlink(created)
    if not ok.item() or buffer is None or libc is None:
        return None
    return SharedMemoryReducer(buffer, libc, rank, size, slot_bytes, timeout)


def _map(path: str, nbytes: int, *, create: bool) -> Tensor:
    """A uint8 tensor over a MAP_SHARED mapping of the tmpfs file ``path``."""
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserves the pages now: after a mere ftruncate, a full tmpfs would show up
            # as SIGBUS at the first write to a slot instead of ENOSPC here.
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
    elif os.path.getsize(path) != nbytes:
        raise OSError(f"{path} is not {nbytes} bytes")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
