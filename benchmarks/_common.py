"""Shared by the benchmarks: machine description, process pool, JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vmonf.reporting import versions

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads_per_fit": 1,
        **versions(),
    }


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph on one line (for ``--help``)."""
    return " ".join((doc or "").split("\n\n")[0].split())


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_parallel(fn: Callable[..., dict], jobs: Iterable[tuple], n_workers: int) -> list[dict]:
    """Run ``fn(*job)`` for every job, ``n_workers`` processes of one torch thread each."""
    jobs = list(jobs)
    if n_workers <= 1:
        _init_worker()
        return [fn(*job) for job in jobs]
    with ProcessPoolExecutor(n_workers, initializer=_init_worker) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


def write_results(name: str, payload: dict[str, Any], table: str) -> Path:
    """Write results/<name>.json and results/<name>.md; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return path
