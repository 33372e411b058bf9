"""Run under ``torchrun`` by tests/test_distributed.py (with the repository on
PYTHONPATH): one fit, saved by rank 0.

torchrun --nproc-per-node 2 tests/helpers/distributed_fit.py vmonf OUT [--crash-rank R]
    [--points N] [--seedless] [--checkpoint PATH [--resume] [--unshared-rank R]]

``--unshared-rank R`` gives rank R a checkpoint path of its own (PATH.unshared), as a
machine without the others' shared folder would see it.

``--seedless`` fits with random_state=None and fails unless every rank draws its
batches in the same order (the weights agree anyway: gradients are summed).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

from competitive import CompetitiveMixture
from vmonf import VMoNF, distributed

SETTINGS = {
    "vmonf": lambda: VMoNF(
        3, max_epochs=4, n_layers=2, hidden_features=8, posterior_hidden=(8,), init_steps=8,
        batch_size=64, learning_rate=5e-3, validation_fraction=0.2, random_state=0,
        dtype="float64",
    ),
    "competitive": lambda: CompetitiveMixture(
        3, assignment="discriminator", n_layers=2, hidden_features=8, discriminator_hidden=16,
        discriminator_batch_size=64, pretrain_epochs=2, max_epochs=2, max_rounds=2,
        batch_size=64, learning_rate=5e-3, random_state=0, dtype="float64",
    ),
    # ActNorm initialised from the global batch; no validation split, so that 257 points
    # leave a last global batch of 1 point: one rank's shard is empty.
    "vmonf_actnorm": lambda: VMoNF(
        3, max_epochs=3, n_layers=2, hidden_features=8, posterior_hidden=(8,), init_steps=8,
        batch_size=64, learning_rate=5e-3, actnorm=True, random_state=0, dtype="float64",
    ),
}  # fmt: skip


def data(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    return means[rng.integers(0, 3, n)] + rng.normal(size=(n, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("estimator", choices=tuple(SETTINGS))
    parser.add_argument("out")
    parser.add_argument("--crash-rank", type=int, default=None)
    parser.add_argument("--points", type=int, default=301, help="301: uneven shards")
    parser.add_argument("--seedless", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--unshared-rank", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = SETTINGS[args.estimator]()
    if args.checkpoint is not None:
        unshared = int(os.environ.get("RANK", "0")) == args.unshared_rank
        model.set_params(checkpoint=args.checkpoint + (".unshared" if unshared else ""))
    orders: list[torch.Tensor] = []
    if args.seedless:
        model.set_params(random_state=None)
        original = distributed.ShardedBatches.__init__

        def record(self, n: int, batch_size: int, generator: torch.Generator) -> None:
            orders.append(torch.randperm(n, generator=generator.clone_state()))
            original(self, n, batch_size, generator)

        distributed.ShardedBatches.__init__ = record
    if args.crash_rank is not None:

        def crash(estimator: object, epoch: int) -> None:
            if int(os.environ.get("RANK", "0")) == args.crash_rank:
                raise RuntimeError(f"injected crash on rank {args.crash_rank}")

        model.set_params(callback=crash)
    model.fit(data(args.points), resume=args.resume)
    if args.seedless:
        # Compared through files, not dist.all_gather: a rank that exits right after a
        # gloo collective on Python-made tensors can abort in interpreter teardown
        # ("terminate called without an active exception"), when gloo's thread drops
        # its reference to them without the GIL (torch 2.13, seen in a core dump).
        rank = dist.get_rank()
        torch.save(torch.cat(orders), f"{args.out}.orders.{rank}")  # first epoch of each stage
        dist.barrier()
        if rank == 0:
            everyone = [
                torch.load(f"{args.out}.orders.{r}", weights_only=True)
                for r in range(dist.get_world_size())
            ]
            if not all(torch.equal(other, everyone[0]) for other in everyone):
                raise SystemExit("ranks drew different batch orders")
    if int(os.environ.get("RANK", "0")) == 0:
        model.set_params(callback=None)
        model.save(args.out)


if __name__ == "__main__":
    main()
