"""Interrupted runs: periodic atomic checkpoints, exact resume, SIGINT and SIGKILL."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vmonf.resume as resume_module
from competitive import CompetitiveMixture
from vmonf import VMoNF
from vmonf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vmonf.resume import (
    KIND,
    Checkpointer,
    TrainingInterrupted,
    fingerprint,
    identity_difference,
    rng_state,
    set_rng_state,
)
from vmonf.training import TrainConfig, train

VMONF = dict(
    n_components=3,
    max_epochs=6,
    n_layers=2,
    hidden_features=8,
    posterior_hidden=(8,),
    init_steps=12,
    batch_size=64,
    learning_rate=5e-3,
    random_state=0,
    dtype="float64",
)


def blobs(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    return means[rng.integers(0, 3, n)] + rng.normal(size=(n, 2))


class Stop(Exception):
    """Raised by a callback to cut a fit short, as a crash would."""


def stop_at(n_calls: int):
    calls = []

    def callback(estimator, epoch) -> None:
        calls.append(epoch)
        if len(calls) == n_calls:
            raise Stop

    return callback


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


def without_times(history: dict[str, list]) -> dict[str, list]:
    return {k: v for k, v in history.items() if k not in ("time", "round_time")}


# --------------------------------------------------------------------------- the loop


def regression(seed: int = 1):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(200, 2)
    y = (x[:, :1] - 2 * x[:, 1:]).sin()

    def objective(batch, step):
        xb, yb = batch
        return (module(xb) - yb).square().mean()

    return module, objective, (x, y)


@pytest.mark.parametrize("every", [1, 7, 13])  # mid-epoch, across epochs (7 steps each)
def test_a_stage_resumed_from_any_checkpoint_ends_like_an_uninterrupted_one(tmp_path, every):
    config = TrainConfig(max_epochs=5, batch_size=32, learning_rate=0.02, patience=100)

    def run(checkpointer=None, crash_at=None):
        module, objective, data = regression()
        steps = []

        def crashing(batch, step):
            steps.append(step)
            if step == crash_at:
                raise Stop
            return objective(batch, step)

        result = train(
            module, crashing, data, config, generator=torch.Generator().manual_seed(3),
            validation=data, validation_objective=objective, checkpointer=checkpointer,
        )  # fmt: skip
        return module, result

    reference, expected = run()
    path = tmp_path / "state.pt"
    with pytest.raises(Stop):
        run(Checkpointer(path, "id", every_steps=every, every_seconds=None), crash_at=30)
    saved = load_checkpoint(path, KIND)["progress"]["loop"]["step"]
    assert 30 - every <= saved <= 30  # at most one interval of work lost
    resumed, result = run(Checkpointer(path, "id", every_steps=every, resume=True))
    assert_same_weights(reference, resumed, atol=0)
    assert without_times(result.history) == without_times(expected.history)
    assert result.n_steps == expected.n_steps


def test_checkpoint_is_written_atomically_and_a_failed_write_keeps_the_old_file(
    tmp_path, monkeypatch
):
    path = tmp_path / "state.pt"
    checkpointer = Checkpointer(path, "id")
    checkpointer.write(progress={"step": 1})
    before = path.read_bytes()

    real_save = torch.save

    def torn_save(obj, handle, *args, **kwargs):
        if isinstance(handle, io.BytesIO):  # the content is serialised in memory first
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"half a file")  # then the write to disk breaks halfway
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.write(progress={"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


# --------------------------------------------------------------------------- estimators


@pytest.mark.parametrize(
    ("params", "n_calls"),
    [
        ({}, 3),  # in the training stage
        ({"n_init": 2, "validation_fraction": 0.2, "patience": 50}, 8),  # second restart
        ({"weights": "responsibilities", "temperature": "anneal"}, 2),
    ],
)
def test_vmonf_resumed_fit_equals_an_uninterrupted_one(tmp_path, params, n_calls):
    X = blobs()
    reference = VMoNF(**VMONF, **params).fit(X)
    path = tmp_path / "state.pt"
    with pytest.raises(Stop):
        VMoNF(**VMONF, **params, checkpoint=path, checkpoint_every=5,
              callback=stop_at(n_calls)).fit(X)  # fmt: skip
    resumed = VMoNF(**VMONF, **params, checkpoint=path, checkpoint_every=5).fit(X, resume=True)
    assert_same_weights(reference.model_, resumed.model_)
    np.testing.assert_allclose(resumed.score_samples(X), reference.score_samples(X), atol=1e-6)
    assert without_times(resumed.history_) == without_times(reference.history_)


def test_fit_time_of_a_resumed_fit_counts_the_time_before_the_interruption(tmp_path):
    X = blobs()
    path = tmp_path / "state.pt"
    stop = stop_at(3)

    def slow_then_stop(estimator, epoch) -> None:
        time.sleep(0.5 if epoch == 0 else 0.0)  # then a checkpoint, then Stop
        stop(estimator, epoch)

    with pytest.raises(Stop):
        VMoNF(**VMONF, checkpoint=path, checkpoint_every=1, callback=slow_then_stop).fit(X)
    started = time.perf_counter()
    resumed = VMoNF(**VMONF, checkpoint=path).fit(X, resume=True)
    this_session = time.perf_counter() - started
    assert resumed.fit_time_ >= this_session + 0.5
    assert VMoNF.load(resumed.save(tmp_path / "m.pt")).fit_time_ == resumed.fit_time_


def test_resuming_a_finished_fit_replays_it(tmp_path):
    X = blobs()
    path = tmp_path / "state.pt"
    first = VMoNF(**VMONF, checkpoint=path).fit(X)
    again = VMoNF(**VMONF, checkpoint=path).fit(X, resume=True)
    assert_same_weights(first.model_, again.model_, atol=0)


def test_a_fit_resumes_with_the_same_dtype_given_another_way(tmp_path):
    """dtype="float64" and np.float64 are one setting: the resume was refused as a fit
    "for other settings (dtype)"."""
    X = blobs()
    path = tmp_path / "state.pt"
    params = {**VMONF, "dtype": "float64"}
    with pytest.raises(Stop):
        VMoNF(**params, checkpoint=path, callback=stop_at(2)).fit(X)
    resumed = VMoNF(**{**params, "dtype": np.float64}, checkpoint=path).fit(X, resume=True)
    reference = VMoNF(**params).fit(X)
    assert_same_weights(reference.model_, resumed.model_)


def test_a_fit_resumes_with_the_same_device_given_as_a_torch_device(tmp_path):
    X = blobs()
    path = tmp_path / "state.pt"
    with pytest.raises(Stop):
        VMoNF(**VMONF, device="cpu", checkpoint=path, callback=stop_at(2)).fit(X)
    resumed = VMoNF(**VMONF, device=torch.device("cpu"), checkpoint=path).fit(X, resume=True)
    assert_same_weights(VMoNF(**VMONF).fit(X).model_, resumed.model_)


@pytest.mark.parametrize("random_state", [None, np.random.RandomState(5)])
def test_a_seedless_fit_resumes_with_its_stored_seed(tmp_path, random_state):
    """Also with a numpy RandomState, whose state moved since: the resumed fit is the
    interrupted one, not a fit for other settings."""
    X = blobs()
    params = {**VMONF, "random_state": random_state}
    path = tmp_path / "state.pt"
    with pytest.raises(Stop):
        VMoNF(**params, checkpoint=path, callback=stop_at(2)).fit(X)
    seed = load_checkpoint(path, KIND)["seed"]
    resumed = VMoNF(**params, checkpoint=path).fit(X, resume=True)
    reference = VMoNF(**{**params, "random_state": seed}).fit(X)
    assert_same_weights(reference.model_, resumed.model_)


def test_competitive_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    X = blobs()
    params = dict(
        n_components=3, assignment="discriminator", n_layers=2, hidden_features=8,
        discriminator_hidden=16, discriminator_batch_size=64, pretrain_epochs=2,
        max_epochs=2, max_rounds=3, batch_size=64, learning_rate=5e-3, random_state=0,
        dtype="float64",
    )  # fmt: skip
    reference = CompetitiveMixture(**params).fit(X)
    path = tmp_path / "state.pt"
    with pytest.raises(Stop):
        CompetitiveMixture(**params, checkpoint=path, checkpoint_every=3,
                           callback=stop_at(2)).fit(X)  # fmt: skip
    resumed = CompetitiveMixture(**params, checkpoint=path).fit(X, resume=True)
    assert_same_weights(reference.model_, resumed.model_)
    assert resumed.history_["n_changed"] == reference.history_["n_changed"]


def test_resume_refuses_other_data_or_settings_and_needs_a_path(tmp_path):
    X = blobs()
    path = tmp_path / "state.pt"
    VMoNF(**VMONF, checkpoint=path).fit(X)
    with pytest.raises(ValueError, match=r"written for other data \(X or y\) \(start"):
        VMoNF(**VMONF, checkpoint=path).fit(X + 1.0, resume=True)
    with pytest.raises(ValueError, match=r"written for other settings \(hidden_features\)"):
        VMoNF(**{**VMONF, "hidden_features": 4}, checkpoint=path).fit(X, resume=True)
    with pytest.raises(ValueError, match=r"data \(X or y\) and other settings \(alpha, n_la"):
        VMoNF(**{**VMONF, "alpha": 2.0, "n_layers": 3}, checkpoint=path).fit(X[1:], resume=True)
    # Settings that do not change the computation may differ.
    VMoNF(**VMONF, checkpoint=path, verbose=True, n_threads=2).fit(X, resume=True)
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        VMoNF(**VMONF).fit(X, resume=True)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"checkpoint": 3}, TypeError, "checkpoint must be a file path"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every"),
        ({"checkpoint_seconds": -1.0}, ValueError, "checkpoint_seconds"),
    ],
)
def test_bad_checkpoint_settings(tmp_path, params, error, match):
    with pytest.raises(error, match=match):
        VMoNF(**{**VMONF, "checkpoint": tmp_path / "s.pt", **params}).fit(blobs())


@pytest.mark.parametrize("estimator", ["VMoNF", "CompetitiveMixture"])
def test_a_fresh_fit_never_overwrites_a_file_that_is_not_a_training_state(tmp_path, estimator):
    X = blobs()
    model_file, notes = tmp_path / "model.pt", tmp_path / "notes.txt"
    VMoNF(**VMONF).fit(X).save(model_file)
    saved = model_file.read_bytes()
    notes.write_text("my notes")
    competitive = dict(n_components=2, n_layers=2, hidden_features=8, pretrain_epochs=1,
                       max_epochs=1, max_rounds=1, random_state=0)  # fmt: skip
    cls, params = (VMoNF, VMONF) if estimator == "VMoNF" else (CompetitiveMixture, competitive)
    for path in (model_file, notes):
        with pytest.raises(ValueError, match=r"is not a vmonf training state.*another checkpoint"):
            cls(**params, checkpoint=path).fit(X)
    assert model_file.read_bytes() == saved and notes.read_text() == "my notes"
    state = tmp_path / "state.pt"  # an earlier fit's training state is replaced
    cls(**params, checkpoint=state).fit(X)
    cls(**params, checkpoint=state).fit(X[1:])


def test_a_damaged_training_state_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a loadable"):
        VMoNF(**VMONF, checkpoint=path).fit(blobs(), resume=True)


def _ctrl_c(estimator, epoch):
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def sigint_handler():
    """SIGINT's handler as in an interactive Python (a background job ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_saves_the_state_and_raises_training_interrupted(tmp_path, sigint_handler):
    X = blobs()
    path = tmp_path / "state.pt"
    with pytest.raises(TrainingInterrupted, match="saved to"):
        VMoNF(**VMONF, checkpoint=path, checkpoint_every=10**6, callback=_ctrl_c).fit(X)
    assert load_checkpoint(path, KIND)["progress"] is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = VMoNF(**VMONF, checkpoint=path).fit(X, resume=True)
    assert_same_weights(VMoNF(**VMONF).fit(X).model_, resumed.model_)


def test_a_process_that_ignores_sigint_keeps_ignoring_it(tmp_path, sigint_handler):
    """nohup and background jobs ignore Ctrl-C: a fit must not start catching it (the
    suite failed when run as a background job: the handler 'restored' was SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    X = blobs()
    model = VMoNF(**VMONF, checkpoint=tmp_path / "state.pt", callback=_ctrl_c).fit(X)
    assert model.n_iter_ == VMONF["max_epochs"]  # ran to the end
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# --------------------------------------------------------------------------- the command

FIT = [
    "fit", "moons", "--n-train", "1024", "--n-test", "256", "--epochs", "60",
    "--layers", "2", "--hidden", "8", "--init-steps", "10", "--no-animation", "--quiet",
    "--checkpoint-every", "5",
]  # fmt: skip


def _interactive_sigint() -> None:
    # The child starts as from a terminal, even when the suite runs as a background job
    # (which ignores SIGINT, and its children inherit that).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def vmonf(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "vmonf", *argv], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_interactive_sigint,
    )  # fmt: skip


def saved_step(path: Path) -> int:
    progress = load_checkpoint(path, KIND)["progress"]
    return -1 if progress is None else int(progress["loop"]["step"])


def wait_for_step(process: subprocess.Popen, path: Path, step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists():  # replaced atomically: whenever it exists, it loads
            seen = saved_step(path)
            if seen >= step:
                return seen
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint at step {step} within {timeout} s")


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "model.pt", "VMoNF")["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("whole")
    process = vmonf(*FIT, "--out", str(out))
    assert process.wait(timeout=300) == 0, process.communicate()
    return model_weights(out)


def test_sigkill_mid_training_then_resume_loses_at_most_one_interval(tmp_path, uninterrupted):
    process = vmonf(*FIT, "--out", str(tmp_path))
    seen = wait_for_step(process, tmp_path / "train_state.pt", 40)
    process.kill()  # SIGKILL: no chance to clean up
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert saved_step(tmp_path / "train_state.pt") >= seen  # loadable, and nothing went back
    assert not (tmp_path / "model.pt").exists()
    resumed = vmonf(*FIT, "--out", str(tmp_path), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    weights = model_weights(tmp_path)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0, msg=key)


def test_sigint_exits_cleanly_with_a_checkpoint_and_a_hint(tmp_path, uninterrupted):
    process = vmonf(*FIT, "--out", str(tmp_path))
    wait_for_step(process, tmp_path / "train_state.pt", 30)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err and "--resume" in err
    assert math.isfinite(saved_step(tmp_path / "train_state.pt"))
    resumed = vmonf(*FIT, "--out", str(tmp_path), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    weights = model_weights(tmp_path)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0, msg=key)


def test_fingerprint_is_equal_exactly_when_the_settings_compute_the_same():
    X = np.zeros((3, 2))
    same = [
        {"posterior_hidden": [8], "random_state": np.int64(0)},
        {"posterior_hidden": (8,), "random_state": 0},
    ]
    assert fingerprint(X, settings=same[0]) == fingerprint(X, settings=same[1])
    big = np.zeros((2000, 3))
    other = big.copy()
    other[1000, 1] = 1.0  # numpy's repr of either array elides this row
    assert repr(big) == repr(other)
    assert fingerprint(X, settings={"init": big}) != fingerprint(X, settings={"init": other})


def test_rng_states_round_trip_cpu_and_cuda(monkeypatch):
    state = rng_state()
    first = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    set_rng_state(state["cpu"])  # training states written before CUDA's were saved
    assert torch.equal(torch.rand(3), first)
    # The CUDA states travel too once CUDA is in use (no GPU here: the calls are faked).
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.ones(4, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    set_rng_state(rng_state())
    assert len(restored) == 1 and torch.equal(restored[0][0], torch.ones(4, dtype=torch.uint8))


def test_training_states_keep_the_cuda_rngs_once_cuda_is_in_use(tmp_path, monkeypatch):
    # No GPU here: CUDA's RNG calls are faked, as in the round trip above.
    cuda_states = [torch.full((4,), 7, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    path = tmp_path / "s.pt"
    stage = Checkpointer(path, "id", every_steps=None, every_seconds=None).open_stage()
    stage.save(3, {"loop": {"step": 3}}, torch.device("cpu"))  # the stage in progress
    assert torch.equal(load_checkpoint(path, KIND)["progress"]["rng"]["cuda"][0], cuda_states[0])
    stage.finish({"n": 1}, nn.Linear(2, 2), torch.Generator())  # ... and when it is finished
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    Checkpointer(path, "id", resume=True).open_stage().replay(nn.Linear(2, 2), torch.Generator())
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_states[0])


def test_checkpoints_are_synced_before_the_rename_and_readable_by_others(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(source, target):
        events.append("replace")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = save_checkpoint({"step": 1}, tmp_path / "model.pt", "K")
    assert events == ["fsync", "replace", "fsync"]  # the file's data, then the folder entry
    assert path.stat().st_mode & 0o777 == 0o644
    assert load_checkpoint(path, "K") == {"step": 1}


@pytest.mark.parametrize("writer", ["json", "npz", "png", "gif"])
def test_results_cached_data_and_figures_are_written_atomically(tmp_path, monkeypatch, writer):
    """The JSON results, the cached image arrays and the figures go through the same
    atomic write as checkpoints: a failure mid-write leaves the old file and no
    temporary file (a PNG was once truncated in place)."""
    from vmonf import plots
    from vmonf.datasets import image_data
    from vmonf.reporting import write_json

    path = tmp_path / {"json": "m.json", "npz": "d.npz", "png": "f.png", "gif": "a.gif"}[writer]
    written: list[bytes] = []

    def write(value: int) -> None:
        if writer == "json":
            write_json({"v": value}, path)
        elif writer == "npz":
            image_data._save_npz_atomic(path, v=np.array([value]))
        elif writer == "png":
            plots.plot_samples(np.full((3, 2), float(value)), None, path, dpi=20)
        else:
            frames = np.linspace(0.0, value, 32).reshape(2, 4, 4)
            plots.animate_density(frames, (0.0, 1.0, 0.0, 1.0), path, dpi=20, vmax=3.0)
        written.append(path.read_bytes())

    def read() -> int:
        if writer == "json":
            return int(path.read_text().split(":")[1].strip(" \n}"))
        if writer == "npz":
            return int(np.load(path)["v"][0])
        return written.index(path.read_bytes()) * 2 + 1  # 1 or 3, as written

    old_umask = os.umask(0o077)  # a new file gets what open() would give it ...
    try:
        write(1)
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o640)  # ... and a replaced one keeps its mode
    write(1)
    assert path.stat().st_mode & 0o777 == 0o640
    del written[1:]
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write(2)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert read() == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    write(3)
    assert read() == 3


def test_checkpoint_is_due_after_exactly_every_steps(tmp_path):
    cp = Checkpointer(tmp_path / "s.pt", "id", every_steps=5, every_seconds=None)
    assert not cp.due(4)
    assert cp.due(5)


def test_replaying_a_finished_stage_restores_the_global_rng(tmp_path):
    path = tmp_path / "s.pt"
    cp = Checkpointer(path, "id", every_steps=None, every_seconds=None)
    stage = cp.open_stage()
    torch.manual_seed(1)
    torch.rand(3)
    stage.finish({"n": 1}, nn.Linear(2, 2), torch.Generator().manual_seed(0))
    expected = torch.get_rng_state()
    resumed = Checkpointer(path, "id", resume=True)
    torch.manual_seed(99)
    assert resumed.open_stage().replay(nn.Linear(2, 2), torch.Generator()) == {"n": 1}
    assert torch.equal(torch.get_rng_state(), expected)


def test_fingerprint_tells_shapes_apart():
    assert fingerprint(np.zeros((2, 3)), settings={}) != fingerprint(np.zeros((3, 2)), settings={})


def test_checkpoints_come_every_checkpoint_every_steps(tmp_path, monkeypatch):
    writes = []
    real = resume_module.save_checkpoint

    def counted(*args, **kwargs):
        writes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(resume_module, "save_checkpoint", counted)
    params = {**VMONF, "n_components": 2, "max_epochs": 8, "init_steps": 5}
    VMoNF(**params, checkpoint=tmp_path / "s.pt", checkpoint_every=10, checkpoint_seconds=None).fit(
        blobs(320)  # 5 batches of 64 per epoch: 40 steps
    )
    assert len(writes) <= 12, len(writes)


def test_a_training_state_of_another_format_is_refused(tmp_path, monkeypatch):
    """A state written by a vmonf whose training differs (e.g. before competitive rounds
    carried Adam's state) must not resume into a run that matches neither."""
    import vmonf.resume

    X = blobs()
    path = tmp_path / "state.pt"
    monkeypatch.setattr(vmonf.resume, "TRAINING_STATE_FORMAT", 1)
    VMoNF(**VMONF, checkpoint=path).fit(X)
    monkeypatch.setattr(vmonf.resume, "TRAINING_STATE_FORMAT", 2)
    with pytest.raises(ValueError, match=r"by a vmonf whose training differs \(.* format 1;"):
        VMoNF(**VMONF, checkpoint=path).fit(X, resume=True)


def test_identity_difference_names_what_differs():
    X = np.zeros((3, 2))
    current = fingerprint(X, settings={"alpha": 1.0, "n_layers": 2})
    assert identity_difference(dict(current), current) == "for another fit"
    assert identity_difference("0123abcd", current).startswith(  # a format-2 file's hash
        "by a vmonf whose training differs (training-state format 1 or 2; this one writes"
    )
    other = fingerprint(X + 1, settings={"alpha": 1.0, "n_layers": 3, "linear": True})
    assert identity_difference(other, current) == (
        "for other data (X or y) and other settings (linear, n_layers)"
    )
    vmonf_state = fingerprint(X, settings={"estimator": "VMoNF", "alpha": 1.0})
    competitive = fingerprint(X, settings={"estimator": "CompetitiveMixture", "tol": 0.0})
    assert identity_difference(vmonf_state, competitive) == "for another estimator (VMoNF)"
