"""Data-parallel throughput: samples per second for 1 vs N processes, and the share of a
step spent communicating.

    python benchmarks/distributed.py [--nproc 1 2] [--epochs 30] [--batch-size 512]

For each process count it launches ``torchrun --standalone`` on this script, which
trains the VMoNF model (K = 5 flows, the estimator's default architecture) on
pinwheel through the one training loop with the same global batch size, timing the
gradient all-reduce separately. Several processes run twice: with the all-reduce
through shared memory (the default on one machine) and through gloo
(``VMONF_SHARED_MEMORY=0``). Prints a markdown table and writes
results/distributed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, summary, write_results

import vmonf.training as training
from vmonf import VMoNF, datasets
from vmonf.distributed import init_from_env, is_main_process, rank_and_size
from vmonf.reporting import markdown_table

K = 5


def worker(out: Path, epochs: int, batch_size: int, n_points: int) -> None:
    """One rank: time ``epochs`` of VMoNF training and the all-reduce inside it."""
    torch.set_num_threads(1)
    init_from_env()
    X, _ = datasets.toy("pinwheel", n_classes=K).sample(n_points, seed=0)
    communication = [0.0]
    reduce = training.all_reduce_gradients

    def timed_reduce(*args: object) -> torch.Tensor:
        started = time.perf_counter()
        result = reduce(*args)
        communication[0] += time.perf_counter() - started
        return result

    training.all_reduce_gradients = timed_reduce
    model = VMoNF(K, max_epochs=epochs, batch_size=batch_size, init_steps=0, random_state=0)
    started = time.perf_counter()
    model.fit(X)
    wall = time.perf_counter() - started
    steps = epochs * -(-n_points // batch_size)
    if is_main_process():
        out.write_text(
            json.dumps(
                {
                    "processes": rank_and_size()[1],
                    "fit_seconds": wall,
                    "samples_per_second": epochs * n_points / wall,
                    "step_ms": 1e3 * wall / steps,
                    "communication_share": communication[0] / wall,
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--n-points", type=int, default=25600)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out is not None:
        worker(args.worker_out, args.epochs, args.batch_size, args.n_points)
        return
    rows, results = [], []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    runs = [(n, shm) for n in args.nproc for shm in ((True, False) if n > 1 else (True,))]
    for nproc, shm in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", __file__, "--worker-out", str(out),
                "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                "--n-points", str(args.n_points),
            ]  # fmt: skip
            shm_env = {**env, "VMONF_SHARED_MEMORY": "1" if shm else "0"}
            subprocess.run(command, env=shm_env, check=True, capture_output=True)
            result = json.loads(out.read_text())
            result["all_reduce"] = "shared memory" if shm else "gloo"
        results.append(result)
    base = results[0]["samples_per_second"]
    for r in results:
        rows.append(
            [
                r["processes"],
                r["all_reduce"] if r["processes"] > 1 else "",
                f"{r['samples_per_second']:.0f}",
                f"{r['samples_per_second'] / base:.2f}x",
                f"{r['step_ms']:.1f}",
                f"{100 * r['communication_share']:.1f} %",
            ]
        )
    table = markdown_table(
        [
            "processes",
            "all-reduce",
            "samples / s",
            "speed-up",
            "ms per global step",
            "communication share",
        ],
        rows,
    )
    print(table)
    settings = {
        "epochs": args.epochs,
        "global_batch_size": args.batch_size,
        "n_points": args.n_points,
        "n_components": K,
        "threads_per_process": 1,
    }
    write_results(
        "distributed", {"machine": machine(), "settings": settings, "results": results}, table
    )


if __name__ == "__main__":
    main()
