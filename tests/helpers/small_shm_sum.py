"""Two ranks sum 2.4 MB tensors three times; prints what rank 0 got and whether the
shared-memory path was used. Run inside a namespace whose /dev/shm is too small for the
buffer (tests/test_shared_memory.py): the ranks must fall back to gloo, not die of
SIGBUS at the first write to memory that tmpfs cannot supply."""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vmonf.distributed as distributed


def rank_main(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    values = torch.ones(600_000)
    for _ in range(3):
        distributed.all_reduce_sum(values)
    if rank == 0:
        used = distributed._reducer is not None and distributed._reducer[1] is not None
        print(f"sum {values.min().item()} {values.max().item()} shared {used}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    store = tempfile.mkdtemp() + "/store"
    mp.start_processes(rank_main, args=(store,), nprocs=2, start_method="spawn", join=True)
    sys.exit(0)
