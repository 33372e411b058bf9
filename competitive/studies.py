"""The two comparison studies, one (toy, seed) at a time: what ``vmonf report`` runs.

* **Soft vs hard** — on the same data and seed, with the same number of epochs
  (passes over the training data): the same k-means pre-training, then E epochs of
  training for every flow mixture: VMoNF with the ELBO
  (soft, amortised), with annealed temperature (soft towards hard) and with the
  exact marginal (soft, exact posterior); competitive training with exact and with
  discriminator assignment (hard); scikit-learn's GaussianMixture, one larger flow
  and bagging. Held-out KL to the truth, ARI, accuracy where labels are given,
  components used, fit time.
* **Discriminator vs exact** — discriminators trained on the fitted competitive
  (exact) and VMoNF (ELBO) mixtures, their estimates set beside the exact
  log-ratios (:mod:`competitive.compare`); the same figures after every round of
  competitive runs with discriminator assignment (k-means and the paper's uniform
  pre-training), and the held-out log-likelihood each assignment ends with when
  both start from the same pre-trained flows and run the same rounds.

Every flow mixture uses the same flows (VMoNF's defaults: 8 couplings, 32 wide,
tanh). :func:`run_study` returns plain data (JSON-ready) and, for the first seed,
writes the figures.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from competitive import figures
from competitive.baselines import bagging, single_model
from competitive.compare import RoundTracker, compare_with_exact
from competitive.estimator import CompetitiveMixture
from vmonf import datasets, metrics
from vmonf._validation import check_positive_float, check_positive_int
from vmonf.estimator import VMoNF
from vmonf.reporting import evaluate_on_toy, partial_labels, plot_bounds

__all__ = ["COMPARED", "FULL_CASES", "METHODS", "Case", "StudySettings", "run_study"]

#: Methods of the soft-vs-hard table, in order (name -> kind of assignment).
METHODS = {
    "VMoNF (ELBO)": "soft, amortised q(c|x)",
    "VMoNF (annealed T)": "soft towards hard",
    "VMoNF (exact marginal)": "soft, exact posterior",
    "competitive (exact)": "hard, exact likelihood",
    "competitive (discriminator)": "hard, estimated likelihood",
    "GaussianMixture": "baseline: sklearn, K Gaussians",
    "single flow (larger)": "baseline: one flow, 12 couplings x 64",
    "bagging": "baseline: K flows on bootstraps",
}
#: Fitted mixtures whose discriminator estimates are compared with the exact log-ratios.
COMPARED = ("competitive (exact)", "VMoNF (ELBO)")


class _FlowSettings(TypedDict):
    """Flow settings, as keywords of the estimators' constructors."""

    n_layers: int
    hidden_features: int
    activation: str
    weight_decay: float


#: The flows every mixture uses (VMoNF's defaults), and the larger single flow.
FLOW = _FlowSettings(n_layers=8, hidden_features=32, activation="tanh", weight_decay=1e-4)
LARGE_FLOW = _FlowSettings(n_layers=12, hidden_features=64, activation="tanh", weight_decay=1e-4)
MIN_SHARE_USED = 0.01  # a component is "used" when it owns >= 1 % of held-out points


@dataclass(frozen=True)
class Case:
    """One toy of the suite: data sizes, labels and E, the epochs every flow mixture is
    given after the same k-means pre-training (:func:`pretrain_epochs`)."""

    name: str
    toy: str
    toy_params: dict[str, Any] = field(default_factory=dict)
    n_train: int = 2560
    n_test: int = 4096
    n_labelled: int = 0
    epochs: int = 100
    batch_size: int = 256


# Epochs: what one torch thread of the (shared) 2-core machine gets through in about
# 10 s, measured per toy (0.05-0.33 s per epoch); the 15 s budget caps every fit, as a
# guard: the epochs are the budget.
FULL_CASES = (
    Case("pinwheel", "pinwheel", n_train=2560, epochs=100),
    Case("two_circles", "two_circles", n_train=1056, n_labelled=32, epochs=150, batch_size=128),
    Case("moons", "moons", n_train=2048, epochs=150),
    *(
        Case(
            f"skewed_gmm_{m}", "skewed_gmm", {"n_modes": m}, n_train=4000, epochs=e, batch_size=512
        )
        for m, e in ((3, 100), (5, 60), (6, 50), (9, 35))
    ),
)


#: What ``StudySettings.discriminator`` may set (CompetitiveMixture's ``discriminator_*``).
DISCRIMINATOR_SETTINGS = ("hidden", "layers", "batch_size", "learning_rate", "betas", "epochs")


@dataclass(frozen=True)
class StudySettings:
    """What both studies share: the per-fit time budget (s), data and epoch scales,
    the discriminators (CompetitiveMixture's ``discriminator_*`` parameters; empty =
    the paper's) and competitive rounds."""

    budget: float = 15.0
    data_scale: float = 1.0
    epoch_scale: float = 1.0
    n_test: int | None = None
    discriminator: dict[str, Any] = field(default_factory=dict)
    max_rounds: int = 5
    figure_points: int = 2000

    def __post_init__(self) -> None:
        # Checked here, not after hours of fits. Both studies assign by discriminators
        # over rounds: at least one round is needed.
        check_positive_int(self.max_rounds, "max_rounds")
        check_positive_float(self.budget, "budget")
        check_positive_float(self.data_scale, "data_scale")
        check_positive_float(self.epoch_scale, "epoch_scale")
        check_positive_int(self.figure_points, "figure_points")
        if self.n_test is not None:
            check_positive_int(self.n_test, "n_test")
        unknown = set(self.discriminator) - set(DISCRIMINATOR_SETTINGS)
        if unknown:
            raise ValueError(
                f"unknown discriminator setting(s) {sorted(unknown)}; choose from "
                f"{', '.join(DISCRIMINATOR_SETTINGS)}"
            )
        # The values as the estimator checks them (errors name discriminator_<key>).
        settings = {f"discriminator_{key}": value for key, value in self.discriminator.items()}
        CompetitiveMixture(2, **settings)._validate_params()

    def scaled(self, case: Case) -> Case:
        """``case`` with this study's data size and epochs."""
        return Case(
            case.name,
            case.toy,
            case.toy_params,
            n_train=max(case.n_labelled + 100, round(case.n_train * self.data_scale)),
            n_test=self.n_test or case.n_test,
            n_labelled=case.n_labelled,
            epochs=max(4, round(case.epochs * self.epoch_scale)),
            batch_size=case.batch_size,
        )


# --------------------------------------------------------------------------- estimators


def _steps_per_epoch(case: Case) -> int:
    return math.ceil(case.n_train / case.batch_size)


def pretrain_epochs(case: Case, settings: StudySettings) -> int:
    """Epochs of k-means pre-training, the same for VMoNF and competitive training:
    VMoNF's default pre-training (``init_steps`` optimiser steps), scaled like the
    epochs (``epoch_scale``), in whole epochs."""
    steps = settings.epoch_scale * VMoNF().init_steps
    return max(1, math.ceil(steps / _steps_per_epoch(case)))


def round_epochs(case: Case, settings: StudySettings) -> int:
    """Epochs per competitive round: the case's E epochs shared by ``max_rounds`` rounds."""
    return max(1, case.epochs // settings.max_rounds)


def training_epochs(case: Case, settings: StudySettings) -> int:
    """Epochs after pre-training, the same for every flow mixture: E in whole
    competitive rounds (rounded down, but at least one epoch per round)."""
    return settings.max_rounds * round_epochs(case, settings)


def _competitive(
    case: Case, k: int, seed: int, settings: StudySettings, **params: Any
) -> CompetitiveMixture:
    """Competitive training with VMoNF's flows: :func:`pretrain_epochs` of pre-training,
    then exactly ``max_rounds`` rounds (``tol=None``: no early stop) of
    :func:`round_epochs` each, so that every run trains as long as VMoNF does."""
    return CompetitiveMixture(
        k,
        **FLOW,
        linear=False,
        init=params.pop("init", "kmeans"),
        pretrain_epochs=pretrain_epochs(case, settings),
        max_epochs=round_epochs(case, settings),
        max_rounds=settings.max_rounds,
        tol=None,
        batch_size=case.batch_size,
        learning_rate=2e-3,
        lr_schedule="cosine",
        max_time=settings.budget,
        validation_fraction=0.0,  # every method trains on all the points (VMoNF's default)
        random_state=seed,
        **{f"discriminator_{key}": value for key, value in settings.discriminator.items()},
        **params,
    )


def _vmonf(case: Case, k: int, seed: int, settings: StudySettings, **params: Any) -> VMoNF:
    """VMoNF with its defaults: :func:`pretrain_epochs` of k-means pre-training (its
    default ``init_steps``, rounded up to whole epochs), then :func:`training_epochs`."""
    return VMoNF(
        k,
        init_steps=pretrain_epochs(case, settings) * _steps_per_epoch(case),
        max_epochs=training_epochs(case, settings),
        max_time=settings.budget,
        batch_size=case.batch_size,
        random_state=seed,
        **params,
    )


def _builders(case: Case, k: int, seed: int, settings: StudySettings) -> dict[str, Callable]:
    """name -> () -> unfitted estimator, one per row of the soft-vs-hard table."""
    baseline: dict[str, Any] = dict(  # keywords of bagging and single_model
        epochs=pretrain_epochs(case, settings) + training_epochs(case, settings), linear=False,
        max_time=settings.budget, batch_size=case.batch_size, learning_rate=2e-3,
        lr_schedule="cosine", validation_fraction=0.0, random_state=seed,
    )  # fmt: skip
    return {
        "VMoNF (ELBO)": lambda: _vmonf(case, k, seed, settings),
        "VMoNF (annealed T)": lambda: _vmonf(case, k, seed, settings, temperature="anneal"),
        "VMoNF (exact marginal)": lambda: _vmonf(case, k, seed, settings, objective="marginal"),
        "competitive (exact)": lambda: _competitive(case, k, seed, settings, assignment="exact"),
        "competitive (discriminator)": lambda: _competitive(
            case, k, seed, settings, assignment="discriminator"
        ),
        "GaussianMixture": lambda: GaussianMixture(k, n_init=3, random_state=seed),
        "single flow (larger)": lambda: single_model(**LARGE_FLOW, **baseline),
        "bagging": lambda: bagging(k, **FLOW, **baseline),
    }


def _epochs_trained(model: Any, case: Case, settings: StudySettings) -> int | None:
    """Passes over the training data a fitted flow method made, pre-training included
    (None for GaussianMixture)."""
    if isinstance(model, VMoNF):
        return pretrain_epochs(case, settings) + int(model.n_iter_)
    if isinstance(model, CompetitiveMixture):
        if model.max_rounds == 0:  # a baseline: pre-training is all of it
            return int(model.pretrain_epochs)
        rounds = model.history_.get("epochs")  # absent in models saved before it was kept
        if rounds is None:
            rounds = [round_epochs(case, settings)] * model.n_iter_
        return pretrain_epochs(case, settings) + int(sum(rounds))
    return None


# --------------------------------------------------------------------------- metrics


def _accuracy_via_labels(
    pred_train: np.ndarray, y_fit: np.ndarray, pred_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Accuracy of an unsupervised fit whose clusters are named by the labelled training
    points (Hungarian matching on them); clusters left unnamed count as errors."""
    known = y_fit >= 0
    naming = metrics.best_matching(y_fit[known], pred_train[known])  # cluster -> class
    named = np.array([naming.get(int(c), -1) for c in pred_test])
    return float(np.mean(named == y_test))


def _evaluate(
    model: Any,
    toy: Any,
    data: dict[str, np.ndarray],
    uses_labels: bool,
) -> dict[str, Any]:
    X_test, y_test = data["X_test"], data["y_test"]
    scores = evaluate_on_toy(model, toy, X_test, y_test, labelled=uses_labels)
    pred = model.predict(X_test)
    shares = np.bincount(pred, minlength=int(pred.max()) + 1) / pred.size
    out = {
        "kl_to_truth": scores["kl_to_truth"],
        "log_likelihood": scores["log_likelihood"],
        "ari": scores["ari"],
        "accuracy": scores["accuracy"],
        "components_used": int((shares >= MIN_SHARE_USED).sum()),
    }
    y_fit = data.get("y_fit")
    if y_fit is not None and not uses_labels:
        out["accuracy"] = _accuracy_via_labels(model.predict(data["X"]), y_fit, pred, y_test)
    return out


def _fit(model: Any, X: np.ndarray, y: np.ndarray | None) -> tuple[float, list[str]]:
    """Fit; -> (seconds, the fit's ConvergenceWarnings, e.g. a time cap that bound)."""
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X) if y is None else model.fit(X, y)
    seconds = time.perf_counter() - started
    for w in caught:  # anything else is shown as usual
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return seconds, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


# --------------------------------------------------------------------------- the study


def _tracked_run(
    model: CompetitiveMixture, data: dict[str, np.ndarray]
) -> tuple[RoundTracker, float, list[str]]:
    """:func:`_fit` with a round tracker; the seconds leave the tracking out."""
    tracker = RoundTracker(data["X_test"], true_log_prob=data["true_test"])
    model.set_params(callback=tracker)
    seconds, messages = _fit(model, data["X"], None)
    model.set_params(callback=None)
    return tracker, seconds - tracker.seconds, messages


def _rounds_entry(
    tracker: RoundTracker, disc: CompetitiveMixture, exact: CompetitiveMixture, X_test: np.ndarray
) -> dict[str, Any]:
    """The discriminator run's rounds beside the exact run's (both from the same
    pre-trained flows; with ``tol=None`` both run every round unless time runs out)."""
    return {
        "history": tracker.history,
        "n_changed": disc.history_["n_changed"],
        "n_changed_exact": exact.history_["n_changed"],
        "rounds_exact": int(exact.n_iter_),
        "log_likelihood_discriminator": disc.score(X_test),
        "log_likelihood_exact": exact.score(X_test),
    }


def run_study(
    case: Case, seed: int, settings: StudySettings, figures_dir: Path | None = None
) -> dict[str, Any]:
    """Both studies on one toy and seed; writes figures to ``figures_dir`` when given.

    Returns ``{"case", "seed", "truth", "methods": {name: metrics}, "comparisons":
    {fitted mixture: {"truth"/"mixture": means, "per_component": ..., "train_time"}},
    "rounds": {"kmeans"/"uniform": per-round history and final held-out scores},
    "wall_time"}`` (nats per point, seconds).
    """
    started = time.perf_counter()
    case = settings.scaled(case)
    toy = datasets.toy(case.toy, **case.toy_params)
    k = toy.n_classes
    X, y = toy.sample(case.n_train, seed=seed)
    X_test, y_test = toy.sample(case.n_test, seed=seed + 10_000)
    data = {"X": X, "X_test": X_test, "y_test": y_test, "true_test": toy.log_prob(X_test)}
    if case.n_labelled:
        data["y_fit"] = partial_labels(y, case.n_labelled, k, seed)
    truth = {
        "log_likelihood": metrics.mean_log_likelihood(data["true_test"]),
        "bayes_accuracy": float(np.mean(toy.predict(X_test) == y_test)),
    }
    fitted: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    tracker = None
    for name, build in _builders(case, k, seed, settings).items():
        model = build()
        uses_labels = "y_fit" in data and isinstance(model, VMoNF)
        if name == "competitive (discriminator)":
            tracker, seconds, messages = _tracked_run(model, data)
        else:
            seconds, messages = _fit(model, X, data["y_fit"] if uses_labels else None)
        results[name] = {
            **_evaluate(model, toy, data, uses_labels),
            "fit_time": seconds,
            "n_iter": int(getattr(model, "n_iter_", 0)),  # epochs (VMoNF), rounds, EM steps
            "convergence_warnings": messages,
            "epochs": _epochs_trained(model, case, settings),
            "uses_labels": uses_labels,
        }
        fitted[name] = model

    comparisons = {}
    bounds = plot_bounds(np.concatenate([X, X_test]))
    for name in COMPARED:
        comparison = compare_with_exact(
            fitted[name], X, X_test, true_log_prob=data["true_test"],
            settings=_competitive(case, k, seed, settings, assignment="discriminator"),
            random_state=seed, max_time=settings.budget,
        )  # fmt: skip
        comparisons[name] = {key: stats.summary() for key, stats in comparison.stats.items()} | {
            "per_component": comparison.stats["truth"].as_dict(),
            "train_time": comparison.estimate.train_time,
        }
        if figures_dir is not None:
            _comparison_figures(comparison, case, name, X_test, bounds, figures_dir, settings)

    assert tracker is not None  # set by the run of "competitive (discriminator)" above
    rounds = {
        "kmeans": _rounds_entry(
            tracker,
            fitted["competitive (discriminator)"],
            fitted["competitive (exact)"],
            X_test,
        )
    }
    uniform_disc = _competitive(case, k, seed, settings, init="uniform", assignment="discriminator")
    uniform_tracker, *disc_fit = _tracked_run(uniform_disc, data)
    uniform_exact = _competitive(case, k, seed, settings, init="uniform", assignment="exact")
    exact_fit = _fit(uniform_exact, X, None)
    rounds["uniform"] = _rounds_entry(uniform_tracker, uniform_disc, uniform_exact, X_test) | {
        # not rows of the tables above, but fits the time cap may have stopped too
        "fits": {
            name: {"fit_time": seconds, "convergence_warnings": messages}
            for name, (seconds, messages) in (("discriminator", disc_fit), ("exact", exact_fit))
        }
    }
    if figures_dir is not None:
        exact_owner, disc_owner = uniform_tracker.owners[0]
        shown = slice(0, settings.figure_points)
        figures.plot_disagreement(
            X_test[shown], exact_owner[shown], disc_owner[shown],
            figures_dir / f"{case.name}_disagreement_uniform_pretraining.png",
            n_components=k, bounds=bounds,
            title=f"{case.name}: uniform pre-training, round 0 (held-out points)",
        )  # fmt: skip
    return {
        "case": case.name,
        "seed": seed,
        "k": k,
        "n_train": case.n_train,
        "n_test": case.n_test,
        "n_labelled": case.n_labelled,
        "epochs": training_epochs(case, settings),
        "pretrain_epochs": pretrain_epochs(case, settings),
        "truth": truth,
        "methods": results,
        "comparisons": comparisons,
        "rounds": rounds,
        "wall_time": time.perf_counter() - started,
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def _comparison_figures(
    comparison: Any,
    case: Case,
    model_name: str,
    X_test: np.ndarray,
    bounds: tuple[float, float, float, float],
    out: Path,
    settings: StudySettings,
) -> None:
    stats = comparison.stats["truth"]
    titles = [
        f"k={j}: Spearman {stats.spearman[j]:.2f}, MAE {stats.mae[j]:.2f}"
        for j in range(stats.mae.size)
    ]
    stem = f"{case.name}_{_slug(model_name)}"
    figures.plot_estimate_vs_exact(
        comparison.estimate.log_ratio,
        comparison.exact["truth"],
        out / f"{stem}_estimate_vs_exact.png",
        titles=titles,
        xlabel="exact log p_k - log p_true (nats)",
        max_points=settings.figure_points,
    )
    exact_owner, disc_owner = comparison.owners()
    shown = slice(0, settings.figure_points)
    figures.plot_disagreement(
        X_test[shown], exact_owner[shown], disc_owner[shown], out / f"{stem}_disagreement.png",
        n_components=stats.mae.size, bounds=bounds,
        title=f"{case.name}, {model_name}: argmax of exact log p_k vs of the discriminators",
    )  # fmt: skip
