"""Run under ``torchrun`` by tests/test_distributed.py (with the repository on
PYTHONPATH): one fit, saved by rank 0.

torchrun --nproc-per-node 2 tests/helpers/distributed_fit.py vmonf OUT [--crash-rank R]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from competitive import CompetitiveMixture
from vmonf import VMoNF

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
}  # fmt: skip


def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    return means[rng.integers(0, 3, 301)] + rng.normal(size=(301, 2))  # 301: uneven shards


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("estimator", choices=tuple(SETTINGS))
    parser.add_argument("out")
    parser.add_argument("--crash-rank", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = SETTINGS[args.estimator]()
    if args.crash_rank is not None:

        def crash(estimator: object, epoch: int) -> None:
            if int(os.environ.get("RANK", "0")) == args.crash_rank:
                raise RuntimeError(f"injected crash on rank {args.crash_rank}")

        model.set_params(callback=crash)
    model.fit(data())
    if int(os.environ.get("RANK", "0")) == 0:
        model.set_params(callback=None)
        model.save(args.out)


if __name__ == "__main__":
    main()
