"""The shared-memory all-reduce of ranks on one machine (vmonf._shared_memory), in real
processes with a gloo group: exact sums in rank order, growth, bitwise-identical results
on every rank under jitter, the gloo fallback (turned off on one rank, no buffer to be
had), no file left behind, and a peer that stops arriving."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vmonf._shared_memory as shared_memory
import vmonf.distributed as distributed

ROOT = Path(__file__).parents[1]
HELPER = ROOT / "tests" / "helpers" / "small_shm_sum.py"

pytestmark = pytest.mark.skipif(
    shared_memory._libc() is None, reason="process-shared semaphores: Linux (glibc) only"
)

# (shape, dtype); (300, 1000) float64 outgrows the first 1 MiB slots; "T" = a transposed
# (non-contiguous) view.
SIZES = [((1,), torch.float64), ((1000,), torch.float32), ((300, 1000), torch.float64),
         ((7,), torch.float32), ((40, 3, "T"), torch.float32)]  # fmt: skip


def _values(rank: int, call: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Values whose float sum depends on the order of the terms (magnitudes 1e-3..1e3)."""
    generator = torch.Generator().manual_seed(1000 * rank + call)
    dims = [d for d in shape if d != "T"]
    values = torch.randn(*dims, generator=generator, dtype=dtype) * 10.0 ** ((rank + call) % 7 - 3)
    return values.mT if "T" in shape else values


def _rank_order_sum(
    n_ranks: int, call: int, shape: tuple, dtype: torch.dtype, accumulate: torch.dtype
) -> torch.Tensor:
    terms = [_values(rank, call, shape, dtype).to(accumulate) for rank in range(n_ranks)]
    total = terms[0] + terms[1]
    for term in terms[2:]:
        total = total + term
    return total


def _shm_files() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("vmonf-")}


def _join(rank: int, world: int, store: str, timeout: str, enabled: str) -> None:
    os.environ.update(VMONF_DIST_TIMEOUT=timeout, VMONF_SHARED_MEMORY=enabled)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _map_then_fail(path: str, nbytes: int, *, create: bool) -> torch.Tensor:
    _original_map(path, nbytes, create=create)
    raise OSError("no space left on device")  # as a full /dev/shm would


_original_map = shared_memory._map


def _sum_worker(rank: int, world: int, store: str, out: str, mode: str, calls: int) -> None:
    """Modes: "1" on, "0" off, "off-on-1" turned off on rank 1 only, "broken" the
    buffer cannot be made. Each rank sleeps 0-3 ms at random between the barrier and
    reading the slots, so that a faster rank's next call can overtake it."""
    if mode == "broken":
        shared_memory._map = _map_then_fail  # type: ignore[assignment]
    enabled = {"1": "1", "0": "0", "broken": "1", "off-on-1": "0" if rank == 1 else "1"}[mode]
    _join(rank, world, store, "60", enabled)
    jitter = random.Random(rank)
    barrier = shared_memory.SharedMemoryReducer._barrier

    def late_reader(self: shared_memory.SharedMemoryReducer) -> None:
        barrier(self)
        time.sleep(jitter.uniform(0, 0.003))  # others may run ahead to the next call

    shared_memory.SharedMemoryReducer._barrier = late_reader  # type: ignore[method-assign]
    results = []
    for call in range(calls):  # calls alternate between the two sets of slots
        shape, dtype = SIZES[call % len(SIZES)]
        values = _values(rank, call, shape, dtype)
        returned = distributed.all_reduce_sum(values)
        assert returned is values  # in place, also for a non-contiguous view
        results.append(values.contiguous())
    used = distributed._reducer is not None and distributed._reducer[1] is not None
    torch.save({"results": results, "used": used}, f"{out}.{rank}")
    dist.destroy_process_group()


def _run(worker, world: int, *args) -> None:
    mp.start_processes(worker, args=(world, *args), nprocs=world, start_method="spawn", join=True)


@pytest.mark.parametrize(
    ("world", "mode", "calls"),
    [(2, "1", 15), (3, "1", 120), (2, "0", 10), (2, "off-on-1", 10), (2, "broken", 10)],
)
def test_every_rank_gets_the_exact_rank_order_sum(tmp_path, world, mode, calls):
    before = _shm_files()
    out = str(tmp_path / "out")
    _run(_sum_worker, world, str(tmp_path / "store"), out, mode, calls)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    assert [r["used"] for r in ranks] == [mode == "1"] * world  # every rank or none
    for call in range(calls):
        shape, dtype = SIZES[call % len(SIZES)]
        got = ranks[0]["results"][call]
        if mode == "1":  # the slots added in rank order: bitwise that sum
            want = _rank_order_sum(world, call, shape, dtype, dtype)
            torch.testing.assert_close(got, want.contiguous(), rtol=0, atol=0)
        else:  # gloo's order of the terms is its own: round-off of terms up to 1e3
            want = _rank_order_sum(world, call, shape, dtype, torch.float64).to(dtype)
            atol = 1e-3 if dtype == torch.float32 else 1e-9
            torch.testing.assert_close(got, want.contiguous(), rtol=1e-6, atol=atol)
        for other in ranks[1:]:
            assert torch.equal(other["results"][call], got), f"call {call}: replicas differ"
    assert _shm_files() <= before  # the buffer's file is unlinked, also when opening failed


def _stalling_worker(rank: int, world: int, store: str, out: str) -> None:
    _join(rank, world, store, "2", "1")
    distributed.all_reduce_sum(torch.ones(3))  # opens the buffer: both ranks
    if rank == 1:
        time.sleep(6)  # never comes to the second reduction
        dist.destroy_process_group()
        return
    started = time.perf_counter()
    try:
        distributed.all_reduce_sum(torch.ones(3))
        message = "returned"
    except RuntimeError as error:
        message = str(error)
    try:
        distributed.all_reduce_sum(torch.ones(3))
        message += "\nreturned"
    except RuntimeError as error:
        message += f"\n{error}"
    Path(out).write_text(f"{time.perf_counter() - started:.1f}\n{message}")
    dist.destroy_process_group()


def test_a_peer_that_stops_coming_is_an_error_naming_it_within_the_timeout(tmp_path):
    out = tmp_path / "out"
    _run(_stalling_worker, 2, str(tmp_path / "store"), str(out))
    seconds, first, then = out.read_text().split("\n")
    assert "rank 1 did not reach the all-reduce within 2 s" in first
    assert 1.5 <= float(seconds) < 5
    assert "an earlier all-reduce of this process group failed" in then  # not a mispairing


def _vanishing_worker(rank: int, world: int, store: str, out: str) -> None:
    _join(rank, world, store, "20", "1")
    if rank == 1:
        dist.destroy_process_group()
        os._exit(0)  # gone before the group's first reduction (which opens the buffer)
    try:
        distributed.all_reduce_sum(torch.ones(3))
        message = "returned"
    except RuntimeError as error:
        message = type(error).__name__
    Path(out).write_text(message)
    dist.destroy_process_group()


def test_a_peer_gone_while_the_buffer_opens_leaves_no_file(tmp_path):
    before = _shm_files()
    out = tmp_path / "out"
    _run(_vanishing_worker, 2, str(tmp_path / "store"), str(out))
    assert out.read_text() != "returned"
    assert _shm_files() <= before


def test_no_semaphores_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert shared_memory._libc() is None


def _can_mount_a_small_shm() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8m tmpfs /dev/shm"],
            capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_shm(), reason="needs unshare -rm (user namespaces)")
def test_a_dev_shm_too_small_for_the_buffer_falls_back_to_gloo():
    """An 8 MiB /dev/shm and a 4 x 4 MiB buffer: after a mere ftruncate the first write
    past 8 MiB killed the ranks with SIGBUS; the space is now reserved when opening."""
    script = f"mount -t tmpfs -o size=8m tmpfs /dev/shm && {sys.executable} {HELPER}"
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sum 8.0 8.0 shared False" in done.stdout
