"""The VMoNF estimator: scikit-learn conventions, units, persistence, seeds, bad input."""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import re
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse
import sklearn.exceptions
import torch
from helpers.frames import Frame
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score

from competitive import CompetitiveMixture
from vmonf import VMoNF, base, datasets, plots, reporting, training
from vmonf._dtypes import float32_default
from vmonf._validation import (
    MAX_SEED,
    check_array,
    check_betas,
    check_bool,
    check_integer_labels,
    check_positive_int,
    check_seed,
)
from vmonf.base import NotFittedError
from vmonf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vmonf.mixture import MixtureOfFlows
from vmonf.preprocessing import Standardizer
from vmonf.training import NonFiniteLossError

FAST = dict(
    max_epochs=4,
    n_layers=2,
    hidden_features=16,
    init_steps=100,
    posterior_hidden=(8,),
    batch_size=64,
    learning_rate=5e-3,
)


def blobs(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    means = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    return means[y] + rng.normal(size=(n, 2)), y


@pytest.fixture(scope="module")
def fitted() -> tuple[VMoNF, np.ndarray, np.ndarray]:
    X, y = blobs()
    params = {**FAST, "max_epochs": 15, "validation_fraction": 0.1}
    return VMoNF(3, random_state=0, **params).fit(X), X, y


def test_fit_returns_self_and_sets_fitted_attributes(fitted):
    model, X, y = fitted
    assert model.n_features_in_ == 2
    assert model.weights_.shape == (3,)
    assert model.n_iter_ == 15
    assert set(model.history_) >= {"loss", "val_loss", "lr", "time", "temperature"}
    assert np.isfinite(model.elbo_)
    assert adjusted_rand_score(y, model.predict(X)) > 0.95
    np.testing.assert_array_equal(model.labels_, model.predict(X))


def test_elbo_attribute_is_the_mean_elbo_in_the_users_units():
    X, _ = blobs()
    model = VMoNF(3, random_state=0, **FAST).fit(X)  # no validation split: on X
    assert model.elbo_ == pytest.approx(model.elbo(X).mean(), abs=1e-5)
    scaled = VMoNF(3, random_state=0, **FAST).fit(100 * X)
    assert scaled.elbo_ == pytest.approx(model.elbo_ - 2 * np.log(100), abs=1e-4)


def test_history_losses_are_in_the_users_units():
    X, _ = blobs(300)
    params = {**FAST, "max_epochs": 2, "validation_fraction": 0.1}
    small, large = (VMoNF(2, random_state=0, **params).fit(s * X) for s in (1.0, 1000.0))
    for key in ("loss", "val_loss"):  # a negative log density: + log 1000 per feature
        np.testing.assert_allclose(
            np.subtract(large.history_[key], small.history_[key]), 2 * np.log(1000.0), rtol=1e-4
        )
    # the last epoch's exact held-out NLL is the model's, scored in the user's units
    held_out = -large.history_["val_loss"][-1]
    assert held_out == pytest.approx(large.score(1000.0 * X), abs=1.0)


def test_output_shapes_and_probabilities(fitted):
    model, X, _ = fitted
    proba = model.predict_proba(X[:10])
    assert proba.shape == (10, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    exact = model.predict_proba(X[:10], posterior="exact")
    np.testing.assert_allclose(exact.sum(1), 1.0, atol=1e-6)
    assert model.score_samples(X[:10]).shape == (10,)
    assert model.predict(X[:10]).dtype == np.int64
    assert np.all(model.elbo(X[:50]) <= model.score_samples(X[:50]) + 1e-4)
    samples, labels = model.sample(7, random_state=0)
    assert samples.shape == (7, 2) and labels.shape == (7,)
    assert np.isfinite(model.bic(X)) and np.isfinite(model.aic(X))
    n_mixture = sum(p.numel() for p in model.model_.mixture.parameters())
    assert model.weights == "uniform"  # no free weights
    assert model.n_parameters() == n_mixture  # q(c|x) does not count
    assert model.aic(X) == pytest.approx(-2 * model.score(X) * len(X) + 2 * n_mixture)
    assert model.score(X) == pytest.approx(model.score_samples(X).mean())


@pytest.mark.parametrize("weights", ["learned", "responsibilities"])
def test_fitted_mixing_weights_count_k_minus_one_parameters(weights):
    X, _ = blobs(300)
    model = VMoNF(3, weights=weights, random_state=0, **FAST).fit(X)
    flows = sum(p.numel() for p in model.model_.mixture.flows.parameters())
    assert model.n_parameters() == flows + 2
    n = len(X)
    expected = -2 * model.score(X) * n + (flows + 2) * math.log(n)
    assert model.bic(X) == pytest.approx(expected)


def test_divergence_is_judged_log_k_plus_the_margin_below_the_untrained_score():
    from vmonf.base import DIVERGENCE_MARGIN, divergence_floor

    assert divergence_floor(0.5, 3) == pytest.approx(0.5 - math.log(3) - DIVERGENCE_MARGIN)


def test_scores_are_in_the_users_units():
    """Scaling the data by s shifts every log density by -D log s (change of variables)."""
    X, _ = blobs(300)
    a = VMoNF(3, random_state=1, dtype="float64", **FAST).fit(X)
    b = VMoNF(3, random_state=1, dtype="float64", **FAST).fit(X * 10.0)
    np.testing.assert_allclose(
        b.score_samples(X * 10.0), a.score_samples(X) - 2 * np.log(10.0), atol=1e-6
    )


def test_same_seed_same_results_different_seed_differs():
    X, _ = blobs(300)
    a = VMoNF(3, random_state=3, **FAST).fit(X)
    b = VMoNF(3, random_state=3, **FAST).fit(X)
    c = VMoNF(3, random_state=4, **FAST).fit(X)
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    for x, y in zip(a.sample(5, random_state=0), b.sample(5, random_state=0), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.score_samples(X), c.score_samples(X))


TINY_COMPETITIVE = dict(
    n_layers=2, hidden_features=8, max_rounds=2, pretrain_epochs=1, max_epochs=1
)


@pytest.mark.parametrize(
    "estimator",
    [
        VMoNF(3, random_state=3, **FAST),
        VMoNF(3, random_state=3, dtype="float64", **FAST),
        CompetitiveMixture(3, random_state=3, **TINY_COMPETITIVE),
    ],
    ids=["vmonf-float32", "vmonf-float64", "competitive"],
)
def test_a_seed_gives_the_same_model_whatever_torchs_default_dtype(estimator):
    """Under a float64 default (this suite's) a float32 VMoNF drew other initial weights
    than under torch's usual float32 default, and ended 1.2 nats apart."""
    X, _ = blobs(300)
    fits = {}
    for default in (torch.float32, torch.float64):
        torch.set_default_dtype(default)  # the autouse fixture restores it
        fitted = clone(estimator).fit(X)
        fits[default] = (fitted.score_samples(X), fitted.sample(5, random_state=0)[0])
        assert torch.get_default_dtype() == default  # and the caller's default is kept
    for a, b in zip(fits[torch.float32], fits[torch.float64], strict=True):
        np.testing.assert_array_equal(a, b)


def test_float32_default_restores_the_callers_default_and_serialises_threads():
    """Two threads' blocks overlapping, the first to enter leaving first, would leave
    the default at float32 (the second restores what it found: the first's)."""
    inside: list[torch.dtype] = []
    first_entered, first_left = threading.Event(), threading.Event()

    def first() -> None:
        with float32_default():
            first_entered.set()
            time.sleep(0.05)  # the second thread tries to enter meanwhile
            inside.append(torch.get_default_dtype())
        first_left.set()

    def second() -> None:
        first_entered.wait(5)
        with float32_default():  # waits for the first block to end
            first_left.wait(5)
            inside.append(torch.get_default_dtype())

    torch.set_default_dtype(torch.float64)
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert inside == [torch.float32, torch.float32]
    assert torch.get_default_dtype() == torch.float64
    with pytest.raises(KeyError), float32_default():
        raise KeyError
    assert torch.get_default_dtype() == torch.float64


def test_save_load_round_trip(fitted, tmp_path):
    model, X, _ = fitted
    path = model.save(tmp_path / "model.pt")
    loaded = VMoNF.load(path)
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    assert loaded.get_params() == {**model.get_params(), "callback": None}
    assert loaded.history_ == model.history_
    assert loaded.fit_time_ == model.fit_time_ > 0
    np.testing.assert_array_equal(loaded.labels_, model.labels_)
    np.testing.assert_array_equal(loaded.weights_, model.weights_)


def test_device_and_dtype_set_after_a_fit_wait_for_the_next_fit(fitted):
    model, X, _ = fitted
    changed = clone(model).set_params(dtype="float64" if model.dtype == "float32" else "float32")
    vars(changed).update({k: v for k, v in vars(model).items() if k.endswith("_")})
    np.testing.assert_array_equal(changed.score_samples(X), model.score_samples(X))
    np.testing.assert_array_equal(changed.sample(5, random_state=1)[0], model.sample(5, 1)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_model_fitted_on_cuda_loads_on_a_cpu_machine_with_device_cpu(fitted, tmp_path):
    model, X, _ = fitted
    payload = load_checkpoint(model.save(tmp_path / "cpu.pt"), "VMoNF")
    payload["params"]["device"] = "cuda"  # what a CUDA fit saves: tensors on CPU
    path = save_checkpoint(payload, tmp_path / "gpu.pt", "VMoNF")
    with pytest.raises(CheckpointError, match=r"load\(path, device='cpu'\)"):
        VMoNF.load(path)
    loaded = VMoNF.load(path, device="cpu")
    assert loaded.device == "cpu"
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))
    for bad in ("gpu", "cuda", "cuda:0"):  # the argument's fault, not the file's
        with pytest.raises(ValueError, match="device") as raised:
            VMoNF.load(path, device=bad)
        assert not isinstance(raised.value, CheckpointError)
    assert VMoNF.load(path, device=torch.device("cpu")).device == torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "error", "message"),
    [
        ("gpu", ValueError, "device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'gpu'"),
        ("cuda:x", ValueError, "got 'cuda:x'"),
        ("cuda:01", ValueError, "got 'cuda:01'"),  # torch.device refuses it
        ("cuda:" + "9" * 20, ValueError, "got 'cuda:99"),
        (torch.device("meta"), ValueError, "got 'meta'"),
        (0, TypeError, "device must be 'cpu', 'cuda', 'cuda:N', 'auto' or a torch.device"),
    ],
)
def test_device_names_as_torch_does(device, error, message):
    X, _ = blobs(60)
    with pytest.raises(error, match=re.escape(message)):
        VMoNF(2, **FAST, device=device).fit(X)
    assert base.device_name(torch.device("cuda", 1)) == "cuda:1"
    assert base.device_name(torch.device("cpu", 0)) == "cpu"
    assert base.device_name("cuda:3") == "cuda:3"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda:1' was requested but CUDA is not"):
            base.torch_device("cuda:1")


def test_a_numbered_gpu_is_refused_under_torchrun(monkeypatch):
    """Every process would use that one GPU; "cuda" gives each its LOCAL_RANK's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert base.torch_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        base.torch_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"under torchrun would put every process on one GPU"):
        base.torch_device("cuda:1")
    assert base.torch_device("cuda") == torch.device("cuda")


def test_a_torch_device_fits_and_saves_as_its_name(tmp_path):
    X, _ = blobs(200)
    model = VMoNF(2, **FAST, device=torch.device("cpu"), random_state=0).fit(X)
    loaded = VMoNF.load(model.save(tmp_path / "m.pt"))
    assert loaded.device == "cpu"
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))


def test_a_model_saves_as_it_was_fitted_not_as_set_params_changed_it_since(fitted, tmp_path):
    model, X, _ = fitted
    changed = clone(model).set_params(dtype="float64" if model.dtype == "float32" else "float32")
    vars(changed).update({k: v for k, v in vars(model).items() if k.endswith("_")})
    loaded = VMoNF.load(changed.save(tmp_path / "m.pt"))
    assert loaded.dtype == model.dtype
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))


def test_files_of_the_previous_format_load_and_save_again(tmp_path):
    X, _ = blobs(200)
    model = VMoNF(3, random_state=0, actnorm=True, **FAST).fit(X)
    payload = load_checkpoint(model.save(tmp_path / "new.pt"), "VMoNF")
    # Format 1: no version, elbo_ in standardised units, no labels_ or fit_time_, and
    # booleans as the integers some callers passed.
    del payload["format"]
    log_det = float(model.standardizer_.log_abs_det())
    payload["fitted"]["elbo_"] -= log_det
    payload["fitted"]["history_"]["loss"] = [v + log_det for v in model.history_["loss"]]
    for name in ("labels_", "fit_time_"):
        del payload["fitted"][name]
    payload["params"]["actnorm"] = 1
    old = save_checkpoint(payload, tmp_path / "old.pt", "VMoNF")
    loaded = VMoNF.load(old)
    assert loaded.elbo_ == pytest.approx(model.elbo_)  # now in the user's units
    np.testing.assert_allclose(loaded.history_["loss"], model.history_["loss"])  # these too
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))
    VMoNF.load(loaded.save(tmp_path / "again.pt"))  # and it saves again


def test_files_of_format_2_upgrade_only_their_history(tmp_path):
    X, _ = blobs(200)
    model = VMoNF(3, random_state=0, **FAST).fit(X)
    payload = load_checkpoint(model.save(tmp_path / "new.pt"), "VMoNF")
    # Format 2: elbo_ already in the user's units, history_'s losses still standardised.
    payload["format"] = 2
    log_det = float(model.standardizer_.log_abs_det())
    payload["fitted"]["history_"]["loss"] = [v + log_det for v in model.history_["loss"]]
    loaded = VMoNF.load(save_checkpoint(payload, tmp_path / "v2.pt", "VMoNF"))
    assert loaded.elbo_ == pytest.approx(model.elbo_, rel=1e-12)  # not shifted twice
    np.testing.assert_allclose(loaded.history_["loss"], model.history_["loss"], rtol=1e-12)


def test_a_1d_array_gets_scikit_learns_reshape_hint_under_its_own_name():
    with pytest.raises(ValueError, match=r"Reshape your data: X_eval\.reshape\(-1, 1\)"):
        check_array(np.zeros(3), "X_eval")


def test_a_validation_split_never_holds_out_a_given_label():
    y = torch.full((400,), -1)
    y[[0, 1, 3]] = torch.tensor([2, 1, 0])
    all_labelled = torch.arange(400) % 3
    for seed in range(20):
        train_idx, val_idx = VMoNF(3, validation_fraction=0.2)._split(
            all_labelled, torch.Generator().manual_seed(seed)
        )  # held-out labels, when needed, but every class keeps one
        assert val_idx.numel() == 80 and set(all_labelled[train_idx].tolist()) == {0, 1, 2}
        train_idx, val_idx = VMoNF(3, validation_fraction=0.3)._split(
            y, torch.Generator().manual_seed(seed)
        )
        assert {0, 1, 3} <= set(train_idx.tolist()) and val_idx.numel() == 120


def test_a_validation_split_holds_out_unlabelled_rows_before_labelled_ones():
    y = torch.cat([torch.full((200,), -1), torch.arange(200) % 3])
    for seed in range(20):
        _, val_idx = VMoNF(3, validation_fraction=0.2)._split(
            y, torch.Generator().manual_seed(seed)
        )
        assert val_idx.numel() == 80 and bool((y[val_idx] == -1).all())


def test_kmeans_clusters_are_renamed_to_the_labels_they_hold():
    from sklearn.cluster import KMeans

    X, blob = blobs(300)
    clusters = KMeans(3, n_init=10, random_state=0).fit_predict(X)  # as the estimator's
    y = torch.full((300,), -1)
    label_of_blob = {}
    for b in range(3):  # a label that is never the blob's k-means cluster number
        first = int(np.flatnonzero(blob == b)[0])
        label_of_blob[b] = (int(clusters[first]) + 1) % 3
        y[first] = label_of_blob[b]
    initial = VMoNF(3, init="kmeans")._initial_labels(torch.as_tensor(X), y, seed=0)
    np.testing.assert_array_equal(initial.numpy(), [label_of_blob[b] for b in blob])


def test_pre_training_gets_a_quarter_of_max_time(monkeypatch):
    import vmonf.estimator

    budgets = []
    real_train = vmonf.estimator.train

    def recording_train(module, objective, data, config, **kwargs):
        budgets.append(config.max_time)
        return real_train(module, objective, data, config, **kwargs)

    monkeypatch.setattr(vmonf.estimator, "train", recording_train)
    X, _ = blobs(300)
    VMoNF(2, random_state=0, **{**FAST, "max_time": 400.0, "init_steps": 5}).fit(X)
    assert budgets[0] == 100.0  # pre-training; the main stage gets what is left
    assert 300.0 < budgets[1] <= 400.0


def test_marginal_restarts_are_selected_on_the_held_out_log_likelihood(monkeypatch):
    import vmonf.estimator

    seen = []
    real_fit_once = VMoNF._fit_once

    def recording_fit_once(self, model, x, y, x_val, *args, **kwargs):
        fit = real_fit_once(self, model, x, y, x_val, *args, **kwargs)
        with torch.no_grad():
            held_out = model.mixture.log_prob(x_val).mean().item()
        seen.append((fit.selection_score, held_out))
        return fit

    monkeypatch.setattr(vmonf.estimator.VMoNF, "_fit_once", recording_fit_once)
    X, _ = blobs(300)
    params = {**FAST, "objective": "marginal", "validation_fraction": 0.2, "n_init": 2}
    VMoNF(3, random_state=0, dtype="float64", **params).fit(X)
    assert len(seen) == 2
    for selection_score, held_out in seen:
        assert selection_score == pytest.approx(held_out, rel=1e-9)


def test_q_carries_each_epochs_temperature_while_it_trains():
    recorded = []

    def record(estimator: VMoNF, epoch: int) -> None:
        recorded.append(float(estimator.model_.posterior.temperature))

    X, _ = blobs(300)
    params = {**FAST, "temperature": "anneal", "temperature_decay": 0.02}
    model = VMoNF(3, random_state=0, callback=record, **params).fit(X)
    np.testing.assert_allclose(recorded, model.history_["temperature"], rtol=1e-6)
    assert recorded[0] > recorded[-1]  # it anneals


def test_annealing_starts_at_one_after_pre_training_and_q_keeps_its_temperature():
    X, _ = blobs(300)
    params = {**FAST, "temperature": "anneal", "temperature_decay": 0.02, "init": "kmeans"}
    model = VMoNF(3, random_state=0, **params).fit(X)
    steps_per_epoch = -(-300 // FAST["batch_size"])
    first = model.history_["temperature"][0]
    assert first == pytest.approx(np.exp(-0.02 * steps_per_epoch))  # not after init_steps too
    assert model.model_.posterior.temperature.item() == pytest.approx(
        model.history_["temperature"][-1]
    )
    stopped = VMoNF(3, random_state=0, validation_fraction=0.2, patience=1,
                    **{**params, "max_epochs": 30}).fit(X)  # fmt: skip
    best = int(np.argmin(stopped.history_["val_loss"]))  # restored: q at that epoch's T
    assert stopped.model_.posterior.temperature.item() == pytest.approx(
        stopped.history_["temperature"][best]
    )


def test_responsibility_weights_count_labels_as_one_hot():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-1, 1, (219, 2)), rng.normal(1, 1, (81, 2))])
    y = np.r_[np.zeros(219, int), np.ones(81, int)]
    model = VMoNF(2, weights="responsibilities", init="labels", random_state=0, **FAST)
    np.testing.assert_allclose(model.fit(X, y).weights_, [0.73, 0.27], atol=1e-6)


def test_pre_training_cut_by_the_time_budget_is_reported():
    X, _ = blobs(600)
    with pytest.warns(ConvergenceWarning, match=r"pre-training stopped .* after \d+ of") as seen:
        VMoNF(3, random_state=0, **{**FAST, "init_steps": 100_000, "max_time": 0.4}).fit(X)
    assert {w.filename for w in seen} == {__file__}  # the user's line, not vmonf's


def test_main_training_cut_by_the_time_budget_is_not_converged():
    X, _ = blobs(300)
    settings = {**FAST, "init_steps": 10, "max_epochs": 100_000, "max_time": 1.0}
    with pytest.warns(ConvergenceWarning, match=r"max_time stopped the VMoNF fit after") as seen:
        model = VMoNF(2, random_state=0, **settings).fit(X)
    assert {w.filename for w in seen} == {__file__}
    assert not model.converged_
    assert 0 < model.n_iter_ < 100_000
    assert np.isfinite(model.score(X))  # a usable model all the same


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_the_one_off_optimizer_warm_up_is_outside_max_time(monkeypatch, tmp_path, with_checkpoint):
    # The first Adam of a process imports torch._dynamo (1.5-2.7 s): inside the budget
    # it left the first fit of a process one epoch. With a checkpoint, fit_time_ is the
    # checkpointer's clock, which must start after it too.
    real_warm_up = training.warm_up_optimizer  # the real import too: alone, this test
    monkeypatch.setattr(  # would otherwise pay it inside the fit
        "vmonf.base.warm_up_optimizer", lambda: (real_warm_up(), time.sleep(3.0))
    )
    X, _ = blobs(300)
    settings = {**FAST, "max_epochs": 3, "max_time": 0.9, "init_steps": 10}
    if with_checkpoint:
        settings["checkpoint"] = tmp_path / "state.pt"
    model = VMoNF(2, random_state=0, **settings).fit(X)
    assert model.fit_time_ < 2.5  # the fit itself (<= 0.9 s and an epoch), not the 3 s
    assert model.n_iter_ == 3


def test_the_callbacks_time_is_not_counted_against_max_time(monkeypatch):
    now = [0.0]  # a clock that only the callback moves, 100 "seconds" per epoch
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def slow_callback(estimator: VMoNF, epoch: int) -> None:
        now[0] += 100.0

    X, _ = blobs(300)
    settings = {**FAST, "max_epochs": 3, "max_time": 50.0, "init_steps": 10}
    model = VMoNF(2, random_state=0, callback=slow_callback, **settings).fit(X)
    assert model.n_iter_ == 3  # not stopped after the first epoch's callback
    assert model.history_["time"] == [0.0, 0.0, 0.0]  # training time, callbacks left out


def test_responsibility_weights_use_q_for_unlabelled_points_under_the_elbo():
    X, y = blobs(300)
    partial = np.where(np.arange(300) % 3 == 0, y, -1)
    model = VMoNF(3, weights="responsibilities", random_state=0, **FAST).fit(X, partial)
    q = model.predict_proba(X)  # the q of the last update: nothing trains after it
    labelled = partial >= 0
    counts = np.bincount(partial[labelled], minlength=3) + q[~labelled].sum(0)
    np.testing.assert_allclose(model.weights_, counts / 300, atol=1e-5)
    exact = model.predict_proba(X, posterior="exact")
    assert not np.allclose(exact[~labelled].sum(0), q[~labelled].sum(0), atol=1e-2)


def test_load_refuses_foreign_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        VMoNF.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable"):
        VMoNF.load(junk)


def test_sklearn_conventions():
    model = VMoNF(4, learning_rate=1e-2)
    assert model.get_params()["n_components"] == 4
    assert clone(model).get_params() == model.get_params()
    assert model.set_params(n_components=2) is model and model.n_components == 2
    with pytest.raises(sklearn.exceptions.NotFittedError, match="not fitted"):
        model.predict(np.zeros((2, 2)))  # scikit-learn's exception, as its tools expect
    X, _ = blobs(200)
    a = VMoNF(3, random_state=0, **FAST)
    np.testing.assert_array_equal(a.fit_predict(X), a.predict(X))


def test_semi_supervised_labels_name_the_components():
    X, y = blobs(600, seed=2)
    y_partial = np.full_like(y, -1)
    for k in range(3):
        y_partial[np.flatnonzero(y == k)[:5]] = k
    model = VMoNF(3, random_state=0, **{**FAST, "max_epochs": 10}).fit(X, y_partial)
    assert (model.predict(X) == y).mean() > 0.97
    picks = model.suggest_labels(X, 5)
    assert picks.shape == (5,) and len(set(picks.tolist())) == 5


@pytest.mark.parametrize("objective", ["marginal"])
@pytest.mark.parametrize("temperature", ["anneal"])
@pytest.mark.parametrize("weights", ["learned", "responsibilities"])
def test_options_run(objective, temperature, weights):
    X, _ = blobs(300)
    model = VMoNF(
        3, objective=objective, temperature=temperature, weights=weights, random_state=0, **FAST
    ).fit(X)
    assert np.isfinite(model.score(X))
    np.testing.assert_allclose(model.weights_.sum(), 1.0, atol=1e-6)
    assert model.history_["temperature"][-1] < 1.0


BAD_FIT = [
    (np.array([[0.0, np.nan], [1.0, 2.0]]), None, {}, ValueError, "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), None, {}, ValueError, "infinite"),
    (np.zeros(5), None, {}, ValueError, "2-D"),
    (np.float64(1.0), None, {}, ValueError, "2-D"),
    (np.zeros((0, 2)), None, {}, ValueError, "minimum of 2 is required"),
    (np.array([["a", "b"]]), None, {}, TypeError, "numbers"),
    (np.array([[1.0, "b"]], dtype=object), None, {}, TypeError, "numbers"),
    # Missing values of nullable data-frame columns (pd.NA: a class of this name) and None
    (
        np.array([[1.0, 2.0], [type("NAType", (), {})(), 3.0]], dtype=object),
        None,
        {},
        ValueError,
        r"X contains NaN or infinite values \(1 row",
    ),
    (np.array([[1.0, None], [2.0, 3.0]], dtype=object), None, {}, ValueError, "contains NaN"),
    (None, None, {}, ValueError, r"must be 2-D .* got shape \(\)"),
    (scipy.sparse.csr_matrix(np.eye(3)), None, {}, TypeError, r"sparse matrix.*toarray"),
    (torch.eye(3).to_sparse(), None, {}, TypeError, r"sparse torch tensor.*to_dense"),
    (torch.empty(3, 2, device="meta"), None, {}, TypeError, "meta tensor"),
    (blobs(10)[0], np.r_[np.zeros(9), np.nan], {}, ValueError, "y contains NaN"),
    (np.arange(10.0)[:, None], None, {}, ValueError, r"1 feature\(s\) .* but VMoNF .* at least 2"),
    (np.c_[np.arange(10.0), np.ones(10)], None, {}, ValueError, "constant column"),
    (np.c_[np.arange(10.0), 1e12 + 1e-5 * np.arange(10)], None, {}, ValueError, "constant col"),
    (blobs(10)[0], None, {"n_components": 11}, ValueError, "larger than the number"),
    (blobs(10)[0], np.full(10, 7), {}, ValueError, r"\[-1, 3\)"),
    (blobs(10)[0], np.full(10, 0.5), {}, TypeError, "integer"),
    (blobs(10)[0], np.full(10, 2**64 - 1, dtype=np.uint64), {}, ValueError, "int64 range"),
    (blobs(10)[0], np.full(10, 1e30), {}, ValueError, "int64 range"),
    (blobs(10)[0], np.zeros(9, dtype=int), {}, ValueError, "9 labels"),
    (blobs(10)[0], None, {"n_components": 0}, ValueError, "n_components"),
    (blobs(10)[0], None, {"learning_rate": -1.0}, ValueError, "learning_rate"),
    (blobs(10)[0], None, {"batch_size": 0}, ValueError, "batch_size"),
    (blobs(10)[0], None, {"max_time": 0}, ValueError, "max_time"),
    (blobs(10)[0], None, {"callback": 5}, TypeError, "callback must be callable"),
    (blobs(10)[0], None, {"patience": "x"}, TypeError, "patience must be an integer"),
    (blobs(10)[0], None, {"objective": "wasserstein"}, ValueError, "objective"),
    (blobs(10)[0], None, {"init": "magic"}, ValueError, "init"),
    (blobs(10)[0], None, {"device": "tpu"}, ValueError, "device"),
    (blobs(10)[0], None, {"validation_fraction": 0.7}, ValueError, "validation_fraction"),
    (blobs(10)[0], None, {"patience": 3}, ValueError, "needs validation_fraction > 0"),
    (blobs(4)[0], None, {"patience": 3, "validation_fraction": 0.1}, ValueError, "holds out none"),
    (blobs(10)[0], None, {"elbo_top_k": 1}, ValueError, "elbo_top_k must be >= 2"),
    (blobs(10)[0], None, {"elbo_top_k": 4}, ValueError, r"elbo_top_k must be <= n_components"),
    (blobs(10)[0], None, {"elbo_top_k": 2.0}, TypeError, "elbo_top_k"),
    (blobs(10)[0], None, {"elbo_top_k": 2, "compile": True}, ValueError, "compile=True"),
    (blobs(10)[0], None, {"n_components": np.int64(3), "elbo_top_k": 4}, ValueError, "<= n_c"),
    (blobs(10)[0], None, {"posterior_hidden": 4}, TypeError, "posterior_hidden"),
    (blobs(10)[0], None, {"random_state": 2**64}, ValueError, r"random_state must be in \[0,"),
    (blobs(10)[0], None, {"posterior_hidden": (8, 0)}, ValueError, "posterior_hidden"),
]


@pytest.mark.parametrize(("X", "y", "params", "error", "match"), BAD_FIT)
def test_bad_fit_input_gives_clear_errors(X, y, params, error, match):
    with pytest.raises(error, match=match):
        VMoNF(**{"n_components": 3, **FAST, **params}).fit(X, y)


def test_boolean_and_half_precision_labels_are_labels():
    X, _ = blobs(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for y in (np.arange(40) % 2 == 0, (np.arange(40) % 2).astype(np.float16)):
            VMoNF(2, random_state=0, **{**FAST, "max_epochs": 1}).fit(X, y)


def test_object_arrays_of_numbers_and_read_only_arrays_are_taken_as_they_are(fitted):
    model, X, _ = fitted
    frozen = X.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on read-only numpy memory
        scores = model.score_samples(frozen)
        np.testing.assert_array_equal(model.score_samples(X.astype(object)), scores)


def test_reversed_strided_and_half_precision_inputs_are_taken_as_they_are(fitted):
    """torch refuses numpy arrays with negative or odd strides and cannot export
    bfloat16: both once crashed inside torch."""
    model, X, _ = fitted
    scores = model.score_samples(X)
    np.testing.assert_array_equal(model.score_samples(X[::-1]), scores[::-1])
    swapped = X[:, ::-1]
    np.testing.assert_array_equal(model.score_samples(swapped[:, ::-1]), scores)
    records = np.zeros(len(X), dtype=[("x", "f8", 2), ("pad", "f4")])  # rows of 20 bytes
    records["x"] = X
    assert records["x"].strides == (20, 8)
    np.testing.assert_array_equal(model.score_samples(records["x"]), scores)
    half = torch.as_tensor(X).to(torch.bfloat16)
    np.testing.assert_array_equal(model.score_samples(half), model.score_samples(half.float()))


def test_a_far_outlier_that_merges_the_other_points_in_float32_is_warned_about():
    """One point at 1e10 stretched the standardisation until the other 199 became 5
    distinct rows in float32, silently; float64 keeps them apart."""
    X = np.random.default_rng(0).normal(size=(200, 2))
    X[0] = 1e10
    discrete = np.c_[np.arange(200) % 50, np.random.default_rng(1).normal(size=200)]
    with pytest.warns(UserWarning, match=r"feature\(s\) \[0, 1\].*extreme values.*float64"):
        VMoNF(2, random_state=0, **{**FAST, "max_epochs": 1}).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (learned weights: q puts 95 % of these points on one component, which fixed
        # uniform weights would warn about)
        one_epoch = {**FAST, "max_epochs": 1, "weights": "responsibilities"}
        VMoNF(2, random_state=0, dtype="float64", **one_epoch).fit(X)
        VMoNF(2, random_state=0, **one_epoch).fit(discrete)


def test_fixed_uniform_weights_say_what_they_cost_when_q_shares_the_points_unequally():
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(size=(900, 2)), rng.normal(size=(100, 2)) + 8.0]  # 90 % / 10 %
    with pytest.warns(UserWarning, match=r"\[0\.(8|9)\d* +0\.1\d*\] of the training points, but"):
        model = VMoNF(2, random_state=0, **FAST).fit(X)
    assert model.weights_.tolist() == [0.5, 0.5]
    fitted = VMoNF(2, random_state=0, **{**FAST, "weights": "responsibilities"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted.fit(X)
    np.testing.assert_allclose(np.sort(fitted.weights_), [0.1, 0.9], atol=0.01)
    # The cost the warning quotes: KL(shares || 1/K), what matched weights gain here.
    gain = fitted.score(X) - model.score(X)
    assert gain == pytest.approx(0.9 * np.log(1.8) + 0.1 * np.log(0.2), abs=0.05)
    balanced = np.r_[rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 8.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VMoNF(2, random_state=0, **FAST).fit(balanced)


def test_bad_predict_input_gives_clear_errors(fitted):
    model, _, _ = fitted
    with pytest.raises(ValueError, match=r"3 features, but \w+ is expecting 2 features"):
        model.predict(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        model.score_samples(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="posterior"):
        model.predict_proba(np.zeros((1, 2)), posterior="guess")
    with pytest.raises(ValueError, match="n_samples"):
        model.sample(0)


def test_restarts_keep_the_best_elbo():
    X, _ = blobs(300)
    one = VMoNF(3, random_state=5, init="random", **FAST).fit(X)
    two = VMoNF(3, random_state=5, init="random", n_init=2, **FAST).fit(X)
    assert two.elbo_ >= one.elbo_


def test_student_t_base_fits_round_trips_and_samples(tmp_path):
    X, _ = blobs()
    model = VMoNF(3, random_state=0, base_df=5.0, **FAST).fit(X)
    assert model.model_.mixture.flows.base_df == 5.0
    assert np.isfinite(model.score_samples(X)).all()
    loaded = VMoNF.load(model.save(tmp_path / "model.pt"))
    assert loaded.get_params()["base_df"] == 5.0
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))
    for x, y in zip(
        model.sample(50, random_state=1), loaded.sample(50, random_state=1), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_top_k_elbo_fits_reproducibly_and_round_trips(tmp_path, monkeypatch):
    X, y = blobs()
    widths = []  # components listed per point at each call
    original = MixtureOfFlows._log_joint_at

    def spy(self, x, components):
        widths.append(components.shape[1])
        return original(self, x, components)

    monkeypatch.setattr(MixtureOfFlows, "_log_joint_at", spy)
    model = VMoNF(3, random_state=0, elbo_top_k=2, **FAST).fit(X)
    assert 2 in widths, "training did not use the top-2 path"  # pre-training lists 1
    again = VMoNF(3, random_state=0, elbo_top_k=2, **FAST).fit(X)
    np.testing.assert_array_equal(model.score_samples(X), again.score_samples(X))
    assert adjusted_rand_score(y, model.predict(X)) > 0.95
    loaded = VMoNF.load(model.save(tmp_path / "model.pt"))
    assert loaded.get_params()["elbo_top_k"] == 2
    # elbo() and elbo_ report the top-2 bound that was trained (the full-K one with a
    # q trained on 2 components can look diverged).
    assert model.converged_ and model.elbo_ == pytest.approx(model.elbo(X).mean(), abs=1e-5)
    # top_k picks the bound: None is q's ELBO over all K (log p - KL(q || p(c|x))).
    np.testing.assert_array_equal(model.elbo(X, top_k="fitted"), model.elbo(X))
    np.testing.assert_array_equal(model.elbo(X, top_k=2), model.elbo(X))
    full = model.elbo(X, top_k=None)
    np.testing.assert_array_equal(model.elbo(X, top_k=3), full)
    proba, log_p = model.predict_proba(X), model.score_samples(X)
    exact = model.predict_proba(X, posterior="exact")
    kl_q = (proba * (np.log(np.clip(proba, 1e-300, None)) - np.log(exact))).sum(axis=1)
    np.testing.assert_allclose(full, log_p - kl_q, rtol=0, atol=1e-5)  # float32 fit
    with pytest.raises(ValueError, match="top_k must be <= 3, got 4"):
        model.elbo(X, top_k=4)
    with pytest.raises(ValueError, match="top_k must be 'fitted', None or an int, got 'all'"):
        model.elbo(X, top_k="all")
    with pytest.raises(TypeError, match="top_k must be an int"):
        model.elbo(X, top_k=2.5)


def test_evaluate_on_toy_measures_the_gap_over_all_components_after_a_top_k_fit():
    toy = datasets.toy("pinwheel", n_classes=3)
    X, y = toy.sample(300, seed=0)
    model = VMoNF(3, random_state=0, elbo_top_k=2, **FAST).fit(X)
    result = reporting.evaluate_on_toy(model, toy, X, y)
    assert result["elbo"] == pytest.approx(model.elbo(X, top_k=None).mean(), abs=1e-12)
    assert result["amortization_gap"] == pytest.approx(
        result["log_likelihood"] - result["elbo"], abs=1e-12
    )


def test_save_load_is_exact_for_data_far_from_zero_in_float32(tmp_path):
    """The standardiser stays float64 whatever torch's default dtype, also through
    load: a float32 mean of data at 1e12 would move every point by the data's scale."""
    X = blobs(200)[0] + 1e12
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # what users have (the suite runs float64)
    try:
        model = VMoNF(3, random_state=0, **{**FAST, "max_epochs": 1}).fit(X)
        loaded = VMoNF.load(model.save(tmp_path / "far.pt"))
    finally:
        torch.set_default_dtype(previous)
    assert loaded.standardizer_.mean.dtype == torch.float64
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_unit_spread_far_from_zero_is_data_not_a_constant_column():
    X = np.random.default_rng(0).normal(size=(200, 2)) + 1e12
    model = VMoNF(2, random_state=0, **{**FAST, "max_epochs": 1}).fit(X)
    assert np.isfinite(model.score(X))


def test_a_numpy_integer_seed_works_like_the_int():
    X = blobs(200)[0]
    params = {**FAST, "max_epochs": 1, "init_steps": 5}
    a = VMoNF(3, random_state=np.int64(7), **params).fit(X)
    b = VMoNF(3, random_state=7, **params).fit(X)
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))


@pytest.mark.parametrize("make", [np.random.RandomState, np.random.default_rng])
def test_a_numpy_random_state_is_drawn_from_as_in_scikit_learn(make, tmp_path):
    """An int or None only before: TypeError for RandomState(0), which scikit-learn users
    pass. Each fit (and sample) draws from it: two fits on one generator differ, and a
    generator made alike gives the same sequence again."""
    X = blobs(200)[0]
    params = {**FAST, "max_epochs": 1, "init_steps": 5}
    rng, again = make(0), make(0)
    a, b = VMoNF(3, random_state=rng, **params), VMoNF(3, random_state=again, **params)
    first, first_again = a.fit(X).score_samples(X), b.fit(X).score_samples(X)
    np.testing.assert_array_equal(first, first_again)
    assert not np.array_equal(a.fit(X).score_samples(X), first)  # the generator moved on
    draws, draws_again = a.sample(5)[0], b.fit(X).sample(5)[0]
    np.testing.assert_array_equal(draws, draws_again)  # both drew their 3rd seed here
    assert not np.array_equal(a.sample(5)[0], draws)
    np.testing.assert_array_equal(
        a.sample(5, random_state=make(1))[0], a.sample(5, random_state=make(1))[0]
    )
    loaded = VMoNF.load(a.save(tmp_path / "m.pt"))  # a generator is state, saved as None
    assert loaded.random_state is None
    np.testing.assert_array_equal(loaded.score_samples(X), a.score_samples(X))
    with pytest.raises(TypeError, match="int, None, or a numpy RandomState or Generator"):
        VMoNF(3, random_state="0", **params).fit(X)


def test_a_failed_fit_leaves_the_previous_fit_whole_not_half_updated():
    X = blobs(200)[0]
    model = VMoNF(3, random_state=0, **{**FAST, "max_epochs": 1, "init_steps": 5}).fit(X)
    before = model.score_samples(X)
    X5, y5 = np.random.default_rng(0).normal(size=(60, 5)), np.zeros(60, dtype=int)
    with pytest.raises(ValueError, match="labelled point of every class"):
        model.set_params(init="labels").fit(X5, y5)  # fails after standardising X5
    assert model.n_features_in_ == 2
    np.testing.assert_array_equal(model.score_samples(X), before)

    def broken_callback(estimator, epoch):
        raise RuntimeError("callback failed")

    fresh = VMoNF(3, random_state=0, callback=broken_callback, **{**FAST, "init_steps": 5})
    with pytest.raises(RuntimeError, match="callback failed"):
        fresh.fit(X)
    with pytest.raises(NotFittedError):
        fresh.predict(X)


def test_standardizer_round_trips_and_standardises():
    scales = torch.tensor([0.1, 5.0, 300.0], dtype=torch.float64)
    x = torch.randn(200, 3, dtype=torch.float64) * scales + 40.0
    standardizer = Standardizer(3).fit(x)
    u = standardizer(x)
    torch.testing.assert_close(u.mean(0), torch.zeros_like(scales), atol=1e-12, rtol=0)
    torch.testing.assert_close(u.std(0, unbiased=False), torch.ones_like(scales))
    torch.testing.assert_close(standardizer.inverse(u), x, rtol=1e-12, atol=1e-10)
    kept = u.clone()
    u.requires_grad_(True)
    back = standardizer.inverse(u)
    torch.testing.assert_close(u.detach(), kept, rtol=0, atol=0)  # u is left alone
    back.sum().backward()
    torch.testing.assert_close(u.grad, standardizer.scale.expand_as(u), rtol=0, atol=0)
    assert standardizer.inverse(u.detach()[:, :1]).shape == u.shape  # broadcasts
    single = standardizer.inverse(u.detach().float())  # samples of a float32 model
    assert single.dtype == torch.float64
    torch.testing.assert_close(single, standardizer.inverse(u.detach().float().double()))


def test_suggest_labels_picks_the_most_uncertain_rows():
    X, _ = blobs(300)
    model = VMoNF(3, random_state=0, **FAST).fit(X)
    proba = model.predict_proba(X)
    entropy = -(proba * np.log(np.clip(proba, 1e-300, None))).sum(1)
    picks = model.suggest_labels(X, 5)
    assert entropy[picks].min() >= np.delete(entropy, picks).max()


def test_pre_training_teaches_q_the_labels_even_with_alpha_zero():
    # With alpha = 0 and the marginal objective, only pre-training trains q on labels.
    X, y = blobs(300)
    model = VMoNF(3, alpha=0.0, objective="marginal", init="labels", random_state=0, **FAST)
    assert (model.fit(X, y).predict(X) == y).mean() > 0.95


def test_val_loss_is_the_exact_held_out_nll(monkeypatch):
    # One blob and K = 2: q(c|x) is far from the exact posterior, so -ELBO > -log p.
    X = np.random.default_rng(0).normal(size=(200, 2))
    monkeypatch.setattr(
        VMoNF, "_split", lambda self, y, g: (torch.arange(150), torch.arange(150, 200))
    )
    model = VMoNF(2, random_state=0, validation_fraction=0.25, **{**FAST, "max_epochs": 2}).fit(X)
    assert -model.history_["val_loss"][-1] == pytest.approx(model.score(X[150:]), abs=1e-6)


def test_marginal_responsibility_weights_use_the_exact_posterior(monkeypatch):
    X, y = blobs(300)
    partial = np.where(np.arange(300) % 3 == 0, y, -1)
    original, checked = VMoNF._mean_responsibility, []

    def spy(self, model, x, labels):
        got = original(self, model, x, labels)
        expected = model.mixture.posterior(x).exp()
        expected[labels >= 0] = torch.nn.functional.one_hot(labels[labels >= 0], 3).to(expected)
        torch.testing.assert_close(got, expected.mean(0), rtol=0, atol=1e-10)
        checked.append(True)
        return got

    monkeypatch.setattr(VMoNF, "_mean_responsibility", spy)
    params = dict(objective="marginal", weights="responsibilities", random_state=0)
    VMoNF(3, **params, **FAST).fit(X, partial)
    assert checked


# Smaller than FAST: these tests need a fitted model, not a good one.
SMALL = {**FAST, "max_epochs": 2, "hidden_features": 8, "init_steps": 5, "random_state": 0}


def test_fit_leaves_the_callers_global_torch_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    VMoNF(2, **SMALL).fit(blobs(200)[0])
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_saved_device_is_where_it_computes_when_auto_would_move_it(tmp_path, monkeypatch):
    model = VMoNF(2, device="cpu", **SMALL).fit(blobs(200)[0])
    model.set_params(device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto would mean cuda
    payload = load_checkpoint(model.save(tmp_path / "m.pt"), "VMoNF")
    assert payload["params"]["device"] == "cpu"


def test_n_components_equal_to_n_samples_is_allowed():
    X = blobs(6)[0]
    VMoNF(6, **SMALL).fit(X)  # no error
    with pytest.raises(ValueError, match="larger than the number"):
        VMoNF(7, **SMALL).fit(X)


def test_validation_fraction_one_half_is_refused():
    with pytest.raises(ValueError, match=r"validation_fraction must be < 0\.5"):
        VMoNF(2, validation_fraction=0.5, **SMALL).fit(blobs(200)[0])


def test_float32_model_refuses_values_beyond_its_arithmetic():
    model = VMoNF(2, dtype="float32", **SMALL).fit(blobs(200)[0])
    with pytest.raises(ValueError, match="standard deviations"):
        model.score_samples(np.array([[1e20, 0.0]]))


@pytest.mark.parametrize("row", [0, 57, 199])
@pytest.mark.parametrize("sign", [1, -1])
def test_a_single_value_beyond_the_dtype_is_refused_wherever_it_lies(monkeypatch, row, sign):
    # The check reads each column's extremes; the rest of the rows are ordinary, and
    # they are scored 16 at a time (row 57 and 199 lie in later chunks).
    model = VMoNF(2, dtype="float32", **SMALL).fit(blobs(200)[0])
    monkeypatch.setattr(training, "EVAL_CHUNK", 16)
    X = blobs(200, seed=1)[0]
    X[row, 1] = sign * 1e20
    with pytest.raises(ValueError, match="standard deviations"):
        model.predict_proba(X)
    X[row, 1] = sign * 1e10  # far out, but within float32 once standardised
    assert np.isfinite(model.predict_proba(X)).all()


@pytest.mark.parametrize("estimator", ["vmonf", "competitive"])
def test_scoring_standardises_a_chunk_at_a_time(monkeypatch, estimator):
    """No standardised copy of all of X: only chunks of EVAL_CHUNK rows pass through the
    standardiser, and the results equal those of one chunk."""
    X = blobs(100)[0]
    cls = VMoNF if estimator == "vmonf" else CompetitiveMixture
    model = cls(
        2,
        max_epochs=1,
        random_state=0,
        **({} if estimator == "competitive" else {"n_layers": 2, "init_steps": 2}),
    ).fit(X)
    whole = {call: getattr(model, call)(X) for call in ("score_samples", "predict_proba", "elbo")}
    seen: list[int] = []
    forward = Standardizer.forward
    monkeypatch.setattr(Standardizer, "forward", lambda s, x: seen.append(len(x)) or forward(s, x))
    monkeypatch.setattr(training, "EVAL_CHUNK", 16)
    for call, expected in whole.items():
        seen.clear()
        np.testing.assert_allclose(getattr(model, call)(X), expected, rtol=1e-5, atol=1e-6)
        assert seen and max(seen) <= 16 and sum(n for n in seen if n > 2) == 100, (call, seen)


def test_labels_must_be_below_n_components_and_the_error_says_how_to_map_them():
    X = blobs(30)[0]
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\).*LabelEncoder"):
        VMoNF(2, **SMALL).fit(X, np.full(30, 2))
    with pytest.raises(TypeError, match=r"integer labels, got dtype <U.*LabelEncoder"):
        VMoNF(2, **SMALL).fit(X, np.array(["setosa", "virginica"] * 15))


def test_a_constant_column_error_names_the_remedy():
    X = np.c_[blobs(30)[0], np.ones(30)]
    with pytest.raises(ValueError, match=r"constant column\(s\) \[2\].*VarianceThreshold"):
        VMoNF(2, **SMALL).fit(X)


def test_validation_boundaries():
    assert check_seed(MAX_SEED) == MAX_SEED
    with pytest.raises(ValueError):
        check_seed(MAX_SEED + 1)
    with pytest.raises(TypeError, match="must be an integer"):
        check_positive_int(True, "n")
    with pytest.raises(ValueError, match="two numbers in"):
        check_betas((0.9, 1.0), "adam_betas")
    assert check_betas((0.0, 0.999), "adam_betas") == (0.0, 0.999)
    with pytest.raises(TypeError, match="True or False"):
        check_bool(2, "compile")
    assert check_bool(1, "compile") is True
    with pytest.raises(ValueError, match="int64 range"):
        check_integer_labels(np.full(3, -1e30))


def test_numpy_integer_settings_fit_as_python_ints_and_absurd_ones_are_refused():
    X, _ = blobs(200)
    settings = {**FAST, "max_epochs": 1, "batch_size": np.int64(64)}
    model = VMoNF(2, n_threads=np.int64(1), random_state=0, **settings).fit(X)
    reference = VMoNF(2, n_threads=1, random_state=0, **{**settings, "batch_size": 64}).fit(X)
    np.testing.assert_array_equal(model.score_samples(X), reference.score_samples(X))
    with pytest.raises(ValueError, match=r"n_threads must be <= 1024, got 100000"):
        VMoNF(2, n_threads=100_000).fit(X)  # torch would crash the process


def test_fit_and_load_arguments_are_named_when_wrong(tmp_path):
    X, _ = blobs(50)
    with pytest.raises(TypeError, match="resume must be True or False"):
        VMoNF(2, **FAST).fit(X, resume="yes")
    with pytest.raises(ValueError, match="checkpoint must name a file, got the directory"):
        VMoNF(2, **FAST, checkpoint=tmp_path).fit(X)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got NoneType"):
        VMoNF.load(None)


def test_set_params_after_a_fit_changes_the_next_fit_not_this_one(tmp_path):
    """A saved file holds the settings the weights were fitted with: saving after
    set_params(n_layers=...) used to write a file that load() refused."""
    X, _ = blobs(300)
    model = VMoNF(3, random_state=0, **FAST).fit(X)
    proba, elbo, bic = model.predict_proba(X), model.elbo(X), model.bic(X)
    model.set_params(n_layers=3, weights="learned", elbo_top_k=2)
    np.testing.assert_array_equal(model.predict_proba(X), proba)
    np.testing.assert_array_equal(model.elbo(X), elbo)  # not the top-2 bound
    assert model.bic(X) == bic  # no learned weights counted
    loaded = VMoNF.load(model.save(tmp_path / "m.pt"))
    assert loaded.get_params()["n_layers"] == FAST["n_layers"]
    np.testing.assert_array_equal(loaded.predict_proba(X), proba)
    model.fit(X)  # the next fit takes the new settings
    assert model.fitted_params_["n_layers"] == 3
    assert len(model.model_.mixture.flows.layers) == 3


def test_feature_names_are_kept_and_checked_as_in_scikit_learn(tmp_path):
    """Columns in another order were scored silently as if in the fitted one."""
    X, _ = blobs(300)
    frame = Frame(X, ["a", "b"])
    model = VMoNF(3, random_state=0, **FAST).fit(frame)
    np.testing.assert_array_equal(model.feature_names_in_, np.array(["a", "b"], dtype=object))
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        np.testing.assert_array_equal(model.score_samples(frame), model.score_samples(X))
    with pytest.raises(ValueError, match=r"feature names should match .* got \['b', 'a'\]"):
        model.score_samples(frame.reorder([1, 0]))
    with pytest.warns(UserWarning, match="X does not have valid feature names, but VMoNF"):
        model.predict(X)
    loaded = VMoNF.load(model.save(tmp_path / "m.pt"))
    np.testing.assert_array_equal(loaded.feature_names_in_, model.feature_names_in_)
    with pytest.raises(ValueError, match="feature names should match"):
        loaded.predict(frame.reorder([1, 0]))
    model.fit(X)  # refitted without names: none kept
    assert not hasattr(model, "feature_names_in_")
    with pytest.warns(UserWarning, match="X has feature names, but VMoNF was fitted without"):
        model.predict(frame)


def test_feature_name_warnings_name_the_callers_line_and_spare_plot_grids(tmp_path):
    X, _ = blobs(300)
    model = VMoNF(3, random_state=0, **FAST).fit(Frame(X, ["a", "b"]))
    for method in (model.score, model.predict, model.bic):  # however deep the check ran
        with pytest.warns(UserWarning, match="does not have valid feature names") as caught:
            method(X)
        assert [Path(w.filename).name for w in caught] == ["test_estimator.py"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the grid a plot makes has no names to check
        plots.plot_density_comparison(None, model.score_samples, (-5, 10, -5, 10),
                                      tmp_path / "d.png", resolution=20)  # fmt: skip


def test_a_fitted_model_pickles_once_its_callback_is_cleared():
    X, _ = blobs(100)
    model = VMoNF(3, random_state=0, callback=lambda est, epoch: None, **FAST).fit(X)
    model.set_params(callback=None)  # what the CLI does before saving
    assert model.fitted_params_["callback"] is None  # the recorder is not kept alive
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.score_samples(X), model.score_samples(X))


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_pickled_model_holds_each_weight_once(tmp_path, interrupted):
    """Trained, every parameter was a view of one packed buffer, and pickle (unlike
    torch.save) wrote that whole buffer once per parameter: 50 times the model."""
    X, _ = blobs(100)
    model = VMoNF(3, random_state=0, **FAST)
    if interrupted:  # a fit that fails keeps its last good model: unpacked too
        with warnings.catch_warnings(), pytest.raises(NonFiniteLossError):
            warnings.simplefilter("ignore")
            model.set_params(learning_rate=1e30).fit(X)
    else:
        model.fit(X)
    weights = sum(p.numel() * p.element_size() for p in model.model_.parameters())
    pickled = pickle.dumps(model)
    assert len(pickled) < 1.5 * weights + 100_000
    again = pickle.loads(pickled)
    np.testing.assert_array_equal(again.score_samples(X), model.score_samples(X))
    before = [p.detach().clone() for p in model.model_.parameters()]
    model.set_params(learning_rate=1e-3, warm_start=True, max_epochs=1).fit(X)  # and trains on
    after = list(model.model_.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert np.isfinite(model.score(X))


def test_a_refit_that_fails_inside_a_callback_leaves_the_outer_fit_training():
    """The failed inner fit restored the outer fit's model, then unpacked it: the outer
    fit's optimiser went on updating a buffer the model no longer used."""
    X, _ = blobs(100)
    seen: list[torch.Tensor] = []

    def refit_badly(estimator: VMoNF, epoch: int) -> None:
        if epoch == 0:
            with pytest.raises(ValueError):
                VMoNF.fit(estimator, np.full_like(X, np.nan))
        seen.append(
            estimator.model_.mixture.flows.layers[0].conditioner.weights[0].detach().clone()
        )

    VMoNF(3, random_state=0, callback=refit_badly, **FAST).fit(X)
    moves = [float((b - a).abs().max()) for a, b in itertools.pairwise(seen)]
    assert len(moves) >= 2 and all(move > 0 for move in moves)


@pytest.mark.parametrize("refit", [False, True])
def test_save_inside_the_callback_is_refused_and_the_fit_rolled_back(tmp_path, refit):
    """Saved mid-fit, a file mixed the new weights with the previous fit's attributes
    (or failed with an AttributeError on a first fit)."""
    X, _ = blobs(100)
    model = VMoNF(3, random_state=0, **FAST)
    if refit:
        model.fit(X)
    before = model.score_samples(X) if refit else None
    model.set_params(callback=lambda est, epoch: est.save(tmp_path / "mid.pt"))
    with pytest.raises(ValueError, match=r"save\(\) is not available while fit\(\) runs"):
        model.fit(X[:60] * 3)
    assert not (tmp_path / "mid.pt").exists() and not hasattr(model, "_fitting")
    if refit:
        np.testing.assert_array_equal(model.score_samples(X), before)
    model.set_params(callback=None).fit(X).save(tmp_path / "after.pt")
    copies = []  # a copy taken inside a fit is not flagged, but holds no finished fit
    model.set_params(callback=lambda est, epoch: copies.append(copy.deepcopy(est)))
    model.fit(X[:60])
    copies[0].set_params(callback=None)
    with pytest.raises(ValueError, match="holds an unfinished fit"):
        copies[0].save(tmp_path / "copy.pt")


def test_restarts_of_the_exact_marginal_are_chosen_by_log_likelihood(monkeypatch):
    """n_init keeps the restart with the best trained objective: for objective="marginal"
    the exact log-likelihood, which here is not the restart with the best ELBO."""
    from vmonf import datasets

    X, _ = datasets.toy("skewed_gmm", n_modes=6).sample(1000, seed=0)
    restarts = []
    fit_once = VMoNF._fit_once

    def spy(self, *args, **kwargs):
        fit = fit_once(self, *args, **kwargs)
        restarts.append(fit)
        return fit

    monkeypatch.setattr(VMoNF, "_fit_once", spy)
    settings = dict(max_epochs=8, init_steps=30, init="random", batch_size=256, random_state=1)
    model = VMoNF(6, objective="marginal", n_init=4, **settings).fit(X)
    best = max(restarts, key=lambda fit: fit.train_log_likelihood)
    assert model.model_ is best.model
    assert max(restarts, key=lambda fit: fit.elbo) is not best  # the case that matters


@pytest.mark.parametrize("posterior", ["amortized", "exact"])
def test_probabilities_sum_to_one_in_float64(posterior, fitted):
    """float32 responsibilities and weights, renormalised in float64: numpy's choice and
    scikit-learn's log_loss accept them (they refuse rows off by 1e-7)."""
    model, X = fitted[0], fitted[1]
    proba = model.predict_proba(X, posterior=posterior)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.weights_.sum(), 1.0, rtol=0, atol=1e-12)
    np.random.default_rng(0).choice(len(model.weights_), p=model.weights_)


def test_a_saved_model_keeps_no_training_state_path(tmp_path):
    """The checkpoint file belongs to the run that fitted the model: a loaded model
    refitted with it would silently overwrite that run's training state."""
    X, _ = blobs(300)
    state = tmp_path / "run" / "train_state.pt"
    settings = {**FAST, "max_epochs": 1, "init_steps": 5}
    model = VMoNF(2, random_state=0, checkpoint=state, **settings).fit(X)
    assert state.exists()
    loaded = VMoNF.load(model.save(tmp_path / "model.pt"))  # a Path is no plain data: not kept
    assert loaded.checkpoint is None
    assert model.checkpoint == state  # the fitted estimator itself is left alone
    before = state.stat().st_mtime_ns
    loaded.fit(X)
    assert state.stat().st_mtime_ns == before


def test_sample_draws_from_the_estimators_random_state_as_sklearn_does(fitted):
    model = fitted[0]  # random_state=0
    first, again = model.sample(20), model.sample(20)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[0], model.sample(20, random_state=0)[0])
    assert not np.array_equal(first[0], model.sample(20, random_state=1)[0])
    unseeded = clone(model).set_params(random_state=None).fit(fitted[1])
    assert not np.array_equal(unseeded.sample(20)[0], unseeded.sample(20)[0])


@pytest.mark.parametrize("estimator", ["vmonf", "competitive"])
def test_samples_come_back_in_the_users_units(estimator):
    from competitive import CompetitiveMixture

    X = blobs(600)[0] / 4.0 * np.array([10.0, 0.1]) + np.array([100.0, -50.0])
    if estimator == "vmonf":
        model = VMoNF(3, random_state=0, **FAST).fit(X)
    else:
        model = CompetitiveMixture(3, init="kmeans", max_rounds=1, tol=None, random_state=0,
                                   n_layers=2, hidden_features=16, max_epochs=4).fit(X)  # fmt: skip
    samples, _ = model.sample(4000, random_state=0)
    # Standardised samples would sit at (0, 0) with unit spread.
    assert (np.abs(samples.mean(0) - X.mean(0)) < 0.25 * X.std(0)).all()
    np.testing.assert_allclose(samples.std(0) / X.std(0), 1.0, atol=0.3)


@pytest.mark.parametrize("dtype", [np.float64, np.dtype("float64"), torch.float64, "float64"])
def test_dtype_may_be_given_as_a_numpy_or_torch_dtype(dtype, tmp_path):
    """Only the strings before: ValueError for dtype=np.float64."""
    X = blobs(200)[0]
    model = VMoNF(3, random_state=0, dtype=dtype, **{**FAST, "max_epochs": 1, "init_steps": 5})
    assert model.fit(X).get_params()["dtype"] is dtype  # kept as given, as sklearn's clone needs
    assert model._fitted_dtype == torch.float64
    assert VMoNF.load(model.save(tmp_path / "m.pt")).dtype == "float64"


@pytest.mark.parametrize("dtype", [None, np.float16, torch.int64, "double", object()])
def test_other_dtypes_are_refused_by_name(dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'float64'\)"):
        VMoNF(3, dtype=dtype, **FAST).fit(blobs(100)[0])


# --------------------------------------------------------------------------- warm start


def test_warm_start_continues_from_the_previous_fit():
    """Training longer needed a new fit from scratch (no warm_start; resume=True with a
    larger max_epochs was refused as other settings)."""
    X = blobs(300)[0]
    params = {**FAST, "max_epochs": 3, "init_steps": 20}
    cold = VMoNF(3, random_state=0, **params).fit(X)
    warm = VMoNF(3, random_state=0, warm_start=True, **params).fit(X)
    np.testing.assert_array_equal(warm.score_samples(X), cold.score_samples(X))  # 1st: as cold
    first_state = {k: v.clone() for k, v in warm.model_.state_dict().items()}
    standardizer = warm.standardizer_
    before = warm.score(X)
    warm.set_params(max_epochs=6).fit(X[:200])  # other rows: the first fit's units kept
    assert warm.n_iter_ == 6 and len(warm.history_["loss"]) == 6
    assert warm.score(X) > before  # it went on improving instead of starting over
    torch.testing.assert_close(warm.standardizer_.mean, standardizer.mean)
    # The previous fit's objects are not changed in place (a copy was trained).
    assert warm.standardizer_ is not standardizer
    # Continued from the first fit's weights: a fit of 0 more steps would give them back.
    resumed = VMoNF(3, random_state=0, warm_start=True, **{**params, "max_epochs": 1})
    resumed.fit(X)
    state = {k: v.clone() for k, v in resumed.model_.state_dict().items()}
    resumed.set_params(learning_rate=1e-30, weight_decay=0.0).fit(X)
    for name, value in resumed.model_.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(first_state[k], v) for k, v in warm.model_.state_dict().items())


def test_warm_start_keeps_an_annealed_temperature():
    X = blobs(300)[0]
    params = {**FAST, "max_epochs": 4, "init_steps": 20, "temperature": "anneal",
              "temperature_decay": 0.05}  # fmt: skip
    model = VMoNF(3, random_state=0, warm_start=True, **params).fit(X)
    ended = float(model.model_.posterior.temperature)
    assert ended < 0.5
    model.fit(X)
    assert model.history_["temperature"][0] <= ended  # it did not start again at T = 1


def test_warm_start_refuses_what_it_cannot_continue(tmp_path):
    X = blobs(300)[0]
    params = {**FAST, "max_epochs": 1, "init_steps": 5}
    model = VMoNF(3, random_state=0, warm_start=True, **params).fit(X)
    scores = model.score_samples(X)
    with pytest.raises(ValueError, match="warm_start: X has 3 features, the previous fit 2"):
        model.fit(np.column_stack([X, X[:, 0] ** 2]))
    with pytest.raises(ValueError, match=r"hidden_features changed .*hidden_features=16 there"):
        model.set_params(hidden_features=9).fit(X)
    model.set_params(hidden_features=FAST["hidden_features"])
    # Same shapes, other model: refused too (learned weights were kept, frozen, as uniform).
    for change in ({"weights": "learned"}, {"activation": "relu"}):
        with pytest.raises(ValueError, match=f"warm_start: {next(iter(change))} changed"):
            model.set_params(**change).fit(X)
        model.set_params(**{name: VMoNF().get_params()[name] for name in change})
    np.testing.assert_array_equal(model.score_samples(X), scores)  # left as it was
    with pytest.raises(ValueError, match="warm_start=True cannot be combined with a checkpoint"):
        VMoNF(3, warm_start=True, checkpoint=tmp_path / "s.pt", **params).fit(X)
    with pytest.raises(TypeError, match="warm_start"):
        VMoNF(3, warm_start="yes", **params).fit(X)


def test_a_refit_from_a_callback_and_a_copy_taken_there_carry_no_warm_state():
    """The warm start's source lived on the estimator: a refit from a callback deleted it
    under the outer fit (AttributeError), even with warm_start=False."""
    X = blobs(200)[0]
    copies = []

    def refit_once(estimator, epoch):
        if epoch == 0 and not copies:
            copies.append(copy.deepcopy(estimator))
            estimator.fit(X)

    params = {**FAST, "max_epochs": 2, "init_steps": 5}
    for warm_start in (False, True):
        copies.clear()
        model = VMoNF(3, random_state=0, warm_start=warm_start, callback=refit_once, **params)
        model.fit(X).fit(X)  # the second fit warm-starts when asked to
        assert np.isfinite(model.score(X))
        assert not any(name.startswith("_warm") for name in vars(copies[0]))
