"""Data-parallel training under torchrun (gloo, 2 CPU processes on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import vmonf.distributed as distributed
from vmonf import VMoNF
from vmonf.checkpoint import load_checkpoint
from vmonf.distributed import ShardedBatches, gather_rows, rank_and_size, shard_range

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "helpers" / "distributed_fit.py"
KINDS = {"vmonf": "VMoNF", "competitive": "CompetitiveMixture", "vmonf_actnorm": "VMoNF"}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "VMONF_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


def torchrun(*argv: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", *argv,
    ]  # fmt: skip
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def weights(path: Path, kind: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, kind)["model"]


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "2"}, r"RANK, MASTER_ADDR, MASTER_PORT are not set: launch with torchrun"),
        ({"WORLD_SIZE": "x"}, "environment variable WORLD_SIZE must be an integer, got 'x'"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1",
             "VMONF_DIST_TIMEOUT": "soon"},
            "VMONF_DIST_TIMEOUT must be a number",
        ),
    ],
)  # fmt: skip
def test_a_stray_or_broken_torchrun_environment_is_named(monkeypatch, env, match):
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "VMONF_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    X = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(ValueError, match=match):
        VMoNF(2, max_epochs=1, n_layers=2, hidden_features=4, init_steps=2).fit(X)


def test_sharding_helpers_in_one_process():
    assert rank_and_size() == (0, 1)
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    batches = ShardedBatches(10, 4, torch.Generator().manual_seed(0))
    seen = [i for batch in batches for i in batch.tolist()]
    assert sorted(seen) == list(range(10)) and batches.global_size == 2
    x = torch.arange(12.0).reshape(6, 2)
    torch.testing.assert_close(gather_rows(lambda t: t * 2, x), x * 2)


class _ThreadRanks:
    """torch.distributed as gather_rows sees it, with one thread per rank: all_gather
    meets at a barrier, as the ranks of a process group meet in the collective."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.local = threading.local()
        self.barrier = threading.Barrier(size, timeout=30)
        self.sent: dict[int, torch.Tensor] = {}

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_rank(self) -> int:
        return self.local.rank

    def get_world_size(self) -> int:
        return self.size

    def all_gather(self, parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        self.sent[self.local.rank] = tensor.clone()
        self.barrier.wait()
        for r, part in enumerate(parts):
            part.copy_(self.sent[r])
        self.barrier.wait()  # every rank has copied before the next collective


@pytest.mark.parametrize("n", [10, 11, 2])  # shards 4+3+3, 4+4+3, 1+1+0
def test_gather_rows_with_three_uneven_shards_returns_every_row_in_order(monkeypatch, n):
    group = _ThreadRanks(3)
    monkeypatch.setattr(distributed, "dist", group)
    x = torch.arange(3.0 * n).reshape(n, 3) ** 1.5
    seen: dict[int, list[float]] = {}
    results: dict[int, torch.Tensor] = {}

    def fn(rows: torch.Tensor) -> torch.Tensor:
        seen[group.local.rank] = rows[:, 0].tolist()
        return torch.stack([rows.sum(1), rows[:, 0] - rows[:, 2]], 1)  # (rows, 2)

    def rank(r: int) -> None:
        group.local.rank = r
        results[r] = gather_rows(fn, x)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    expected = torch.stack([x.sum(1), x[:, 0] - x[:, 2]], 1)
    for r in range(3):
        torch.testing.assert_close(results[r], expected, rtol=0, atol=0, msg=f"rank {r}")
        start, stop = shard_range(n, r, 3)
        assert seen[r] == x[start:stop, 0].tolist()  # each rank computed only its own rows


@pytest.mark.parametrize(
    ("estimator", "n_points"),
    [("vmonf", "301"), ("competitive", "301"), ("vmonf_actnorm", "257")],
)
def test_two_processes_end_with_the_weights_of_one(estimator, n_points, tmp_path):
    one = subprocess.run(
        [sys.executable, str(WORKER), estimator, str(tmp_path / "one.pt"), "--points", n_points],
        env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = torchrun(str(WORKER), estimator, str(tmp_path / "two.pt"), "--points", n_points)
    assert two.returncode == 0, two.stderr
    assert "non-finite" not in two.stderr  # an empty last shard is not a broken update
    a, b = (
        weights(tmp_path / "one.pt", KINDS[estimator]),
        weights(tmp_path / "two.pt", KINDS[estimator]),
    )
    assert a.keys() == b.keys()
    for key in a:  # float64: only the order of the sums differs
        torch.testing.assert_close(b[key], a[key], atol=1e-9, rtol=0, msg=key)


def test_a_seedless_fit_uses_one_seed_on_every_rank(tmp_path):
    run = torchrun(str(WORKER), "vmonf", str(tmp_path / "m.pt"), "--seedless")
    assert run.returncode == 0, run.stderr  # the worker checks the ranks draw the same batches


def test_a_crashing_rank_fails_the_run_with_its_error_not_a_hang(tmp_path):
    run = torchrun(str(WORKER), "vmonf", str(tmp_path / "m.pt"), "--crash-rank", "1")
    assert run.returncode != 0
    assert "rank      : 1" in run.stderr  # torchrun names the rank that failed first
    assert not (tmp_path / "m.pt").exists()


def test_resuming_from_a_folder_only_some_machines_see_is_an_error_not_a_hang(tmp_path):
    state = str(tmp_path / "state.pt")
    first = torchrun(str(WORKER), "vmonf", str(tmp_path / "m.pt"), "--checkpoint", state)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(str(WORKER), "vmonf", str(tmp_path / "m2.pt"), "--checkpoint", state,
                       "--resume", "--unshared-rank", "1")  # fmt: skip
    assert resumed.returncode != 0
    assert "was found by 1 of 2 processes" in resumed.stderr
    assert "Timed out" not in resumed.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_torchrun_a_dead_peer_is_an_error_within_the_timeout(tmp_path):
    """Ranks started by hand (as on several machines): when one dies, the other must
    stop with an error instead of waiting for ever."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "VMONF_DIST_TIMEOUT": "20"}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "vmonf", str(tmp_path / "m.pt"), "--crash-rank", "1"],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in ranks]
    assert ranks[1].returncode != 0 and "injected crash on rank 1" in outputs[1][1]
    assert ranks[0].returncode != 0, "the surviving rank finished as if nothing happened"


def test_vmonf_fit_nproc_2_equals_one_process(tmp_path):
    argv = [
        "fit", "moons", "--n-train", "512", "--n-test", "256", "--epochs", "3",
        "--layers", "2", "--hidden", "8", "--init-steps", "10", "--no-animation", "--quiet",
    ]  # fmt: skip
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        done = subprocess.run(
            [sys.executable, "-m", "vmonf", *argv, "--out", str(out), "--nproc", str(nproc)],
            env=ENV, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("KL(truth || model)") == 1  # only rank 0 reports
        runs[nproc] = weights(out / "model.pt", "VMoNF")
    for key, value in runs[1].items():  # float32
        np.testing.assert_allclose(runs[2][key], value, atol=1e-5, err_msg=key)
