"""The shared-memory all-reduce of ranks on one machine (vmonf._shared_memory), in two
real processes with a gloo group: sums, growth, identical results on every rank, the
gloo fallback, and a peer that stops arriving."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vmonf._shared_memory as shared_memory
import vmonf.distributed as distributed

pytestmark = pytest.mark.skipif(
    shared_memory._libc() is None, reason="process-shared semaphores: Linux (glibc) only"
)

SIZES = [(1, torch.float64), (1000, torch.float32), (300_000, torch.float64), (7, torch.float32)]


def _values(rank: int, round_: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * rank + round_)
    return torch.randn(n, generator=generator, dtype=dtype) * 10 ** (rank - round_ % 3)


def _join(rank: int, store: str, timeout: str, enabled: str) -> None:
    os.environ.update(VMONF_DIST_TIMEOUT=timeout, VMONF_SHARED_MEMORY=enabled)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _map_then_fail(path: str, nbytes: int, *, create: bool) -> torch.Tensor:
    _original_map(path, nbytes, create=create)
    raise OSError("no space left on device")  # as a full /dev/shm would


_original_map = shared_memory._map


def _sum_worker(rank: int, store: str, out: str, enabled: str) -> None:
    if enabled == "broken":
        shared_memory._map = _map_then_fail  # type: ignore[assignment]
        enabled = "1"
    _join(rank, store, "60", enabled)
    results = []
    for round_ in range(3):  # calls alternate between the two sets of slots
        for n, dtype in SIZES:
            values = _values(rank, round_, n, dtype)
            distributed.all_reduce_sum(values)
            results.append(values)
    used = distributed._reducer is not None and distributed._reducer[1] is not None
    torch.save({"results": results, "used": used}, f"{out}.{rank}")
    dist.destroy_process_group()


def _run(worker, *args: str) -> None:
    mp.start_processes(worker, args=args, nprocs=2, start_method="spawn", join=True)


@pytest.mark.parametrize("enabled", ["1", "0", "broken"])
def test_two_ranks_get_the_same_exact_sums_through_shared_memory_or_gloo(tmp_path, enabled):
    """ "broken": the buffer cannot be made (gloo takes over, no file is left behind)."""
    before = {p for p in os.listdir("/dev/shm") if p.startswith("vmonf-")}
    out = str(tmp_path / "out")
    _run(_sum_worker, str(tmp_path / "store"), out, enabled)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert [r["used"] for r in ranks] == [enabled == "1"] * 2  # every rank or none
    expected = [
        _values(0, round_, n, dtype) + _values(1, round_, n, dtype)
        for round_ in range(3)
        for n, dtype in SIZES
    ]
    for got0, got1, want in zip(ranks[0]["results"], ranks[1]["results"], expected, strict=True):
        assert got0.dtype == want.dtype
        torch.testing.assert_close(got0, want, rtol=0, atol=0)  # two terms: exact either way
        assert torch.equal(got0, got1)  # replicas stay bitwise identical
    after = {p for p in os.listdir("/dev/shm") if p.startswith("vmonf-")}
    assert after <= before  # the buffer's file is unlinked once every rank has mapped it


def _stalling_worker(rank: int, store: str, out: str) -> None:
    _join(rank, store, "2", "1")
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
    Path(out).write_text(f"{time.perf_counter() - started:.1f}\n{message}")
    dist.destroy_process_group()


def test_a_peer_that_stops_coming_is_an_error_naming_it_within_the_timeout(tmp_path):
    out = tmp_path / "out"
    _run(_stalling_worker, str(tmp_path / "store"), str(out))
    seconds, message = out.read_text().split("\n", 1)
    assert "rank 1 did not reach the all-reduce within 2 s" in message
    assert 1.5 <= float(seconds) < 5


def test_no_semaphores_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert shared_memory._libc() is None
