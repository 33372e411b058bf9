"""``VMoNF``: the variational mixture of normalizing flows as a scikit-learn estimator."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from numbers import Integral
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning
from sklearn.semi_supervised import LabelSpreading
from torch import Tensor

from vmonf._dtypes import float32_default
from vmonf._validation import (
    SeedLike,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_widths,
    user_stacklevel,
)
from vmonf.base import (
    DIVERGENCE_MARGIN,
    MixtureEstimator,
    divergence_floor,
    kmeans_clusters,
    probabilities,
)
from vmonf.flows import ComponentFlows
from vmonf.mixture import WEIGHT_MODES, MixtureOfFlows
from vmonf.model import VariationalMixture
from vmonf.objectives import marginal_nll
from vmonf.posterior import PosteriorNet, TemperatureSchedule
from vmonf.resume import Checkpointer
from vmonf.training import (
    FitClock,
    NonFiniteLossError,
    Objective,
    TrainConfig,
    TrainResult,
    eval_chunk,
    evaluate,
    train,
)

__all__ = ["VMoNF"]

INITS = ("auto", "kmeans", "labels", "propagate", "random")
OBJECTIVES = ("elbo", "marginal")


class _Fit(NamedTuple):
    """One training run's outcome, in mean nats per point, standardised units: ``elbo``
    on the validation split (the training data without one); the exact log-likelihoods
    on the training data before and after training (what divergence is judged on: the
    ELBO of a short fit whose q is still wrong can fall far below the untrained model's
    while log p(x) rises, and held-out data would also flag plain overfitting)."""

    model: VariationalMixture
    history: dict[str, list[float]]
    n_epochs: int
    elbo: float
    train_log_likelihood: float
    initial_train_log_likelihood: float
    selection_score: float  # what restarts are compared on: the trained objective
    out_of_time: bool = False  # max_time stopped the main stage before max_epochs


def _history_in_user_units(
    history: dict[str, list[float]], log_abs_det: float
) -> dict[str, list[float]]:
    """Per-epoch history with its losses (nats per point, computed on standardised data)
    moved to the user's units: a loss is a negative log density, so -log|det|."""
    return {
        key: [float(v) - log_abs_det if key in ("loss", "val_loss") else float(v) for v in values]
        for key, values in history.items()
    }


#: Settings that shape a VMoNF's model: a warm start keeps them as fitted.
WARM_ARCHITECTURE = (
    "n_components", "weights", "n_layers", "hidden_features", "n_hidden_layers",
    "activation", "max_log_scale", "actnorm", "linear", "base_df", "posterior_hidden",
)  # fmt: skip


class VMoNF(MixtureEstimator):
    """Variational Mixture of Normalizing Flows (Pires & Figueiredo, 2020).

    K affine-coupling flows p_k and an MLP posterior q(c|x) are trained jointly on
    the ELBO, summed exactly over K; points with a label y >= 0 use the labelled
    loss -(log pi_y + log p_y(x)) + alpha CE(q(.|x), y) instead.

    Args:
        n_components: number of flows K.
        objective: ``"elbo"`` (amortised q, the paper) or ``"marginal"`` (exact
            -log p(x), i.e. soft EM; q is distilled from the exact posterior).
        weights: mixing weights, ``"uniform"`` (the paper's fixed 1/K; a fit warns when
            q's shares of the points make that cost more than 0.05 nats per point),
            ``"learned"`` or ``"responsibilities"`` (after every epoch, the mean
            responsibility: one-hot at a point's label, else q(c|x) for the ELBO or the
            exact p(c|x) for the marginal objective; as GaussianMixture's M-step).
        init: ``"kmeans"`` (pre-train each flow and q on a k-means cluster),
            ``"labels"`` (pre-train on the labelled points, as in the paper),
            ``"propagate"`` (spread the labels to every point along a k-nearest-
            neighbour graph, then pre-train on all points), ``"random"`` (none) or
            ``"auto"`` (propagate when every class has a label, else k-means). Where
            classes touch in the kNN graph (few points in many dimensions) propagation
            can mislabel and training keeps it: compare ``"kmeans"`` on held-out labels.
        n_init: restarts; the one with the best final objective is kept: the ELBO, or
            with ``objective="marginal"`` the exact log-likelihood (on the held-out
            points when ``validation_fraction`` > 0, else on the training points).
        init_steps: optimiser steps of pre-training.
        n_layers, hidden_features, n_hidden_layers, activation, max_log_scale,
            actnorm, linear, base_df: architecture of each flow (see
            :class:`ComponentFlows`; ``base_df``: Student-t base degrees of freedom,
            None = Gaussian base). The defaults overfit a few hundred points or fewer
            (``benchmarks/tabular.py``: on wine's 124 points, -325 nats per held-out
            point against a GaussianMixture's -21): there, start from ``n_layers=2,
            hidden_features=8, linear=True, base_df=5, validation_fraction=0.2,
            patience=20``.
        posterior_hidden: hidden widths of q's MLP.
        temperature: ``"constant"`` or ``"anneal"`` (T = exp(-temperature_decay *
            step), floored at ``min_temperature``) for q's softmax.
        alpha: weight of the labelled cross-entropy.
        max_epochs, max_time, batch_size, learning_rate, weight_decay, lr_schedule:
            optimisation (``max_time``: seconds per restart, pre-training included,
            the ``callback`` not counted; None = no limit; a process's first fit also
            pays a one-off 1-3 s import of torch's optimiser code, outside the budget).
        validation_fraction: share of points held out (unlabelled ones first; labelled
            ones only when those run short, and never every label of a class) to monitor
            the exact NLL (``history_["val_loss"]``) and to compare restarts on
            (``n_init``); with ``patience``, training stops after that many epochs
            without improvement and the best epoch is restored. The held-out NLL
            usually worsens for a few epochs right after k-means pre-training, while q
            and the flows leave the k-means clusters (pinwheel, 1000 points, 20 % held
            out: -0.75 after epoch 1, -0.55 after epoch 2, better than epoch 1 only from
            epoch 7): ``patience=5`` stopped at epoch 6 there and restored epoch 1
            (held-out log-likelihood 0.57 against 0.98 after all 200 epochs, 0.88 with
            ``patience`` 10 or 20), so give it 10 or more.
        random_state: an int (reproducible fits), None (fresh randomness), or a numpy
            ``RandomState``/``Generator`` that each fit and ``sample`` draws a seed from,
            as in scikit-learn (a saved model stores None for it).
        verbose (progress bars in a terminal or a Jupyter notebook; none when output
            goes to a file or pipe), device (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"auto"`` or a ``torch.device``; under torchrun ``"cuda"``: each process its
            local GPU; ``save`` stores the kind, "cuda" for "cuda:1"), dtype
            (``"float32"``/``"float64"``, or the numpy or torch dtype), n_threads
            (torch threads while fitting and scoring; 1 is fastest for small flows on
            few cores, None = leave as is).
        elbo_top_k: None (default) for the exact ELBO over all K components; an int
            k >= 2 to train each unlabelled point on its k most probable components
            under q(c|x) only, q renormalised over them (still a lower bound on log
            p(x)). Each flow then runs on about k/K of the batch: for many
            components, a step costs about k flows instead of K.
        compile: run the training steps through ``torch.compile`` (dynamic shapes).
            On CPU a step of a K = 5 flow mixture takes 0.62-0.89x the time, after
            45-75 s of compilation at a process's first fit (about 25 s with a warm
            on-disk cache): it pays off only for long fits (README, "Speed").
        checkpoint: file for resumable training state (None = none): written
            atomically every ``checkpoint_every`` steps or ``checkpoint_seconds``
            seconds, whichever comes first, and on Ctrl-C; ``fit(X, resume=True)``
            continues from it (see :mod:`vmonf.resume`).
        callback: ``callback(estimator, epoch)`` after every training epoch; inside
            it the estimator's public methods (``score_samples``, ``predict``...) use
            the model being trained (e.g. to record animation frames). Its time is
            not counted against ``max_time`` (it is part of ``fit_time_``).
        warm_start: as scikit-learn's ``GaussianMixture``: each ``fit`` of a fitted model
            starts from the previous fit (its flows, q, mixing weights, temperature and
            standardisation) instead of pre-training, and trains ``max_epochs`` more
            epochs with a fresh optimiser and learning-rate schedule; ``n_init`` is
            ignored then. The data must have the same features; the architecture
            settings must stay as fitted. Not with a ``checkpoint``. With
            ``validation_fraction`` > 0 give an int ``random_state``: else each fit
            holds out other points, some of which the previous fit trained on.

    Fitted attributes: ``weights_`` (K,), ``history_`` (per-epoch lists),
    ``n_iter_`` (epochs), ``n_features_in_``, ``labels_`` ((N,), the most probable
    component of each row of X under q(c|x)), ``elbo_`` (mean ELBO, nats, user's units, on
    the validation split, or on the training data when ``validation_fraction=0``; with
    ``elbo_top_k`` the top-k bound),
    ``converged_`` (False when the ELBO is non-finite, the fit diverged (its
    log-likelihood on the training data more than log K + 1 nats below the untrained
    model's) or ``max_time`` stopped it before ``max_epochs``), ``fit_time_`` (s, with the
    time before a resume), ``feature_names_in_`` (a data frame's column names, when fitted
    on one), ``fitted_params_``
    (the settings of the fit, which predictions and :meth:`save` keep to: ``set_params``
    changes the next fit).
    """

    _checkpoint_kind = "VMoNF"
    _warm_architecture = WARM_ARCHITECTURE
    model_: VariationalMixture

    def __init__(
        self,
        n_components: int = 3,
        *,
        objective: str = "elbo",
        weights: str = "uniform",
        init: str = "auto",
        n_init: int = 1,
        init_steps: int = 300,
        n_layers: int = 8,
        hidden_features: int = 32,
        n_hidden_layers: int = 2,
        activation: str = "tanh",
        max_log_scale: float = 3.0,
        actnorm: bool = False,
        linear: bool = False,
        base_df: float | None = None,
        posterior_hidden: tuple[int, ...] = (32, 32),
        temperature: str = "constant",
        temperature_decay: float = 1e-3,
        min_temperature: float = 0.05,
        alpha: float = 1.0,
        elbo_top_k: int | None = None,
        max_epochs: int = 200,
        max_time: float | None = None,
        batch_size: int = 256,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
        lr_schedule: str = "cosine",
        validation_fraction: float = 0.0,
        patience: int | None = None,
        random_state: SeedLike = None,
        verbose: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        n_threads: int | None = 1,
        compile: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = 100,
        checkpoint_seconds: float | None = 60.0,
        callback: Callable[[VMoNF, int], None] | None = None,
        warm_start: bool = False,
    ) -> None:
        self.n_components = n_components
        self.objective = objective
        self.weights = weights
        self.init = init
        self.n_init = n_init
        self.init_steps = init_steps
        self.n_layers = n_layers
        self.hidden_features = hidden_features
        self.n_hidden_layers = n_hidden_layers
        self.activation = activation
        self.max_log_scale = max_log_scale
        self.actnorm = actnorm
        self.linear = linear
        self.base_df = base_df
        self.posterior_hidden = posterior_hidden
        self.temperature = temperature
        self.temperature_decay = temperature_decay
        self.min_temperature = min_temperature
        self.alpha = alpha
        self.elbo_top_k = elbo_top_k
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.dtype = dtype
        self.n_threads = n_threads
        self.compile = compile
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.callback = callback
        self.warm_start = warm_start

    # -- hooks -------------------------------------------------------------------------
    def _validate_params(self) -> None:
        check_choice(self.objective, "objective", OBJECTIVES)
        check_choice(self.weights, "weights", WEIGHT_MODES)
        check_choice(self.init, "init", INITS)
        check_positive_int(self.n_init, "n_init")
        check_positive_int(self.init_steps, "init_steps", minimum=0)
        check_choice(self.temperature, "temperature", ("constant", "anneal"))
        check_positive_float(self.temperature_decay, "temperature_decay", allow_zero=True)
        check_positive_float(self.min_temperature, "min_temperature")
        check_positive_float(self.alpha, "alpha", allow_zero=True)
        check_widths(self.posterior_hidden, "posterior_hidden")
        if self.patience is not None:
            check_positive_int(self.patience, "patience")  # its own error first
            if not self.validation_fraction:
                raise ValueError(
                    "patience stops on the held-out NLL: it needs validation_fraction > 0"
                )
        if self.elbo_top_k is not None:
            # With one component q(c|x) would get no gradient from unlabelled points.
            check_positive_int(self.elbo_top_k, "elbo_top_k", minimum=2)
            if isinstance(self.n_components, Integral) and self.elbo_top_k > self.n_components:
                raise ValueError(
                    f"elbo_top_k must be <= n_components ({self.n_components}), "
                    f"got {self.elbo_top_k}"
                )
            if self.compile:
                raise ValueError(
                    "elbo_top_k cannot be combined with compile=True: the regrouped batch "
                    "has data-dependent shapes"
                )
        # Architecture and optimisation settings are checked by their constructors.
        self._train_config(max_epochs=1)
        self._schedule()

    def _schedule(self, start: float = 1.0) -> TemperatureSchedule:
        """q's temperature over the main stage, from ``start`` (a warm start continues
        the exponential from the temperature the previous fit ended at)."""
        if self.temperature == "constant":
            return TemperatureSchedule("constant")
        return TemperatureSchedule(
            "exponential", start, self.temperature_decay, self.min_temperature
        )

    def _train_config(self, **overrides: Any) -> TrainConfig:
        settings = {
            "max_epochs": self.max_epochs,
            "max_time": self.max_time,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "lr_schedule": self.lr_schedule,
            "patience": self.patience,
            "verbose": self.verbose,
            "desc": "VMoNF",
        }
        return TrainConfig(**{**settings, **overrides})

    def _build(self) -> VariationalMixture:
        d = self.n_features_in_
        with float32_default():  # the seed's weights, whatever the caller's default dtype
            flows = ComponentFlows(
                d,
                self.n_components,
                n_layers=self.n_layers,
                hidden_features=self.hidden_features,
                n_hidden_layers=self.n_hidden_layers,
                activation=self.activation,
                max_log_scale=self.max_log_scale,
                actnorm=self.actnorm,
                linear=self.linear,
                base_df=self.base_df,
            )
            posterior = PosteriorNet(
                d, self.n_components, tuple(self.posterior_hidden), self.activation
            )
            model = VariationalMixture(MixtureOfFlows(flows, self.weights), posterior)
        return model.to(device=self._torch_device, dtype=self._torch_dtype)

    def _log_joint(self, u: Tensor) -> Tensor:
        return self.model_.mixture.log_joint(u)

    def _log_proba(self, u: Tensor) -> Tensor:
        return self.model_.posterior(u)

    def _density_module(self) -> ComponentFlows:
        return self.model_.mixture.flows  # q(c|x) does not enter p(x)

    def _n_weight_parameters(self) -> int:
        fitted = self._fitted_setting
        return 0 if fitted("weights") == "uniform" else fitted("n_components") - 1

    def _sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.model_.mixture.sample(n, generator)

    def _fitted_state(self) -> dict[str, Any]:
        return {
            "weights_": self.weights_,
            "history_": self.history_,
            "n_iter_": self.n_iter_,
            "elbo_": self.elbo_,
            "converged_": self.converged_,
            "labels_": getattr(self, "labels_", None),  # absent from files of format 1
        }

    # -- fitting -----------------------------------------------------------------------
    def _split(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Train and held-out indices. Held-out rows are unlabelled ones first (held-out
        labels would go unused: validation scores the exact NLL); when there are too few,
        labelled ones too, but never the first of each class (every class keeps a label)."""
        n = y.numel()
        n_val = round(self.validation_fraction * n)
        order = torch.randperm(n, generator=generator)
        if n_val < 1 or n - n_val < self.n_components:
            return order, None
        y_order = y.cpu()[order]
        labelled = y_order >= 0
        first = torch.zeros_like(labelled)
        for c in y_order[labelled].unique():
            first[int((y_order == c).nonzero()[0])] = True
        # Rank rows for holding out: unlabelled, then labelled but not a class's first.
        rank = torch.where(labelled, 1, 0) + torch.where(first, 2, 0)
        candidates = torch.argsort(rank, stable=True)[:n_val]
        candidates = candidates[~first[candidates]]
        if candidates.numel() == 0:  # every candidate was a class's only label
            return order, None
        held = torch.zeros(n, dtype=torch.bool)
        held[candidates] = True
        return order[~held], order[held]

    def _initial_labels(self, x: Tensor, y: Tensor, seed: int) -> Tensor | None:
        """Labels to pre-train on (-1 = skip), or None for no pre-training."""
        labelled = y >= 0
        has_every_class = bool(torch.unique(y[labelled]).numel() == self.n_components)
        init = self.init
        if init == "auto":
            init = "propagate" if has_every_class else "kmeans"
        if init == "random" or self.init_steps == 0:
            return None
        if init in ("labels", "propagate") and not labelled.any():
            raise ValueError(f"init={init!r} needs labelled points (y >= 0)")
        if init == "labels":
            return y
        if init == "propagate":
            return _propagate_labels(x, y)
        clusters = kmeans_clusters(x, self.n_components, seed)
        if labelled.any():
            # Rename clusters to agree with the given labels, then keep the labels.
            overlap = np.zeros((self.n_components, self.n_components))
            np.add.at(overlap, (clusters[labelled].cpu().numpy(), y[labelled].cpu().numpy()), 1)
            rows, cols = linear_sum_assignment(-overlap)
            rename = torch.as_tensor(cols[np.argsort(rows)], device=x.device)
            clusters = torch.where(labelled, y, rename[clusters])
        return clusters

    def _fit_once(
        self,
        model: VariationalMixture,
        x: Tensor,
        y: Tensor,
        val: Tensor | None,
        generator: torch.Generator,
        seed: int,
        checkpointer: Checkpointer | None,
        warm: bool = False,
    ) -> _Fit:
        """Pre-train (optionally; never a ``warm`` model, a previous fit's) and train
        ``model``; the ELBOs are on ``val`` if given, else on ``x``."""
        clock = FitClock()  # max_time's clock: the callback's time is left out

        def negative_bound(batch: tuple[Tensor, ...], _: int) -> Tensor:
            return -model.elbo(batch[0], top_k=self.elbo_top_k).mean()

        def negative_log_likelihood(batch: tuple[Tensor, ...], _: int) -> Tensor:
            return marginal_nll(model.mixture.log_joint(batch[0])).mean()

        def mean_score(objective: Objective, points: Tensor) -> float:  # standardised units
            model.eval()
            return -evaluate(objective, (points,), 0)

        initial_log_likelihood = mean_score(negative_log_likelihood, x)
        init_labels = None if warm else self._initial_labels(x, y, seed)
        step = 0
        if init_labels is not None:
            keep = init_labels >= 0
            xi, yi = x[keep], init_labels[keep]
            steps_per_epoch = math.ceil(xi.shape[0] / self.batch_size)
            config = self._train_config(
                max_epochs=max(1, math.ceil(self.init_steps / steps_per_epoch)),
                max_time=None if self.max_time is None else 0.25 * self.max_time,
                lr_schedule="constant",
                patience=None,
                desc="VMoNF init",
            )

            def pretrain(batch: tuple[Tensor, ...], _: int) -> Tensor:
                # Every point is labelled, so top_k=1 gives the exact labelled loss with
                # each flow run on its own points only: a step costs about one flow.
                # alpha is floored at 1 so q learns the initial labels even when alpha = 0.
                xb, yb = batch
                loss = model.loss(
                    xb, yb, alpha=max(self.alpha, 1.0), objective=self.objective, top_k=1
                )
                return loss.mean()

            pretrained = train(
                model, pretrain, (xi, yi), config, generator=generator,
                checkpointer=checkpointer, clock=clock,
            )  # fmt: skip
            step = pretrained.n_steps
            planned = config.max_epochs * steps_per_epoch
            if pretrained.stop_reason == "max_time" and step < planned:
                # A time budget makes the result depend on the machine's speed: say so.
                warnings.warn(
                    f"VMoNF pre-training stopped at its share of max_time (a quarter) after "
                    f"{step} of {planned} steps",
                    ConvergenceWarning,
                    stacklevel=user_stacklevel(),
                )

        # A warm start continues from the temperature the previous fit ended at.
        start = max(float(model.posterior.temperature), self.min_temperature) if warm else 1.0
        schedule = self._schedule(start)
        main_start = step
        loss_fn = torch.compile(model.loss, dynamic=True) if self.compile else model.loss

        def temperature(step: int) -> float:
            # Pre-training ran at T = 1: annealing starts with the main stage.
            return schedule(step - main_start)

        def objective(batch: tuple[Tensor, ...], step: int) -> Tensor:
            xb, yb = batch
            loss = loss_fn(
                xb,
                yb,
                alpha=self.alpha,
                objective=self.objective,
                temperature=temperature(step),
                top_k=self.elbo_top_k,
            )
            return loss.mean()

        def on_epoch_end(epoch: int, step: int, history: dict[str, list[float]]) -> None:
            history.setdefault("temperature", []).append(temperature(step))
            model.posterior.temperature.fill_(temperature(step))  # q as it is now trained
            if self.weights == "responsibilities":
                model.eval()
                with torch.no_grad():
                    model.mixture.update_weights(self._mean_responsibility(model, x, y))
            if self.callback is not None:
                self.model_ = model
                with clock.excluding():
                    self.callback(self, epoch)

        validation = (
            None if val is None else (val, torch.full_like(val[:, 0], -1, dtype=torch.long))
        )
        result = train(
            model,
            objective,
            (x, y),
            self._train_config(max_time=clock.remaining(self.max_time)),
            generator=generator,
            validation=validation,
            validation_objective=negative_log_likelihood,
            on_epoch_end=on_epoch_end,
            start_step=step,
            checkpointer=checkpointer,
            clock=clock,
        )
        temperatures = result.history.get("temperature") or [temperature(main_start)]
        kept = -1  # the last epoch's weights, or with patience the best epoch's (restored)
        val_loss = np.asarray(result.history.get("val_loss", []), dtype=np.float64)
        if self.patience is not None and np.isfinite(val_loss).any():
            kept = int(np.nanargmin(val_loss))  # train() keeps the first best, never a NaN
        model.posterior.temperature.fill_(temperatures[kept])
        elbo = mean_score(negative_bound, x if val is None else val)
        train_log_likelihood = mean_score(negative_log_likelihood, x)
        if self.objective == "elbo":
            selection_score = elbo
        elif val is None:
            selection_score = train_log_likelihood
        else:
            selection_score = mean_score(negative_log_likelihood, val)
        return _Fit(
            model,
            result.history,
            result.n_epochs,
            elbo,
            train_log_likelihood,
            initial_log_likelihood,
            selection_score,
            out_of_time=result.stop_reason == "max_time" and result.n_epochs < self.max_epochs,
        )

    def _mean_responsibility(self, model: VariationalMixture, x: Tensor, y: Tensor) -> Tensor:
        """(K,) mean over the training points of one-hot(y) where labelled, else q(c|x)
        (``objective="elbo"``: the weights that maximise the bound) or the exact p(c|x)
        (``"marginal"``: the EM update)."""
        total = x.new_zeros(self.n_components)
        chunk = eval_chunk(x.device)
        for xc, yc in zip(x.split(chunk), y.split(chunk), strict=True):
            if self.objective == "elbo":
                r = model.posterior(xc).exp()  # at its stored (current) temperature
            else:
                r = model.mixture.posterior(xc).exp()
            labelled = yc >= 0
            r[labelled] = torch.nn.functional.one_hot(yc[labelled], self.n_components).to(r)
            total += r.sum(0)
        return total / x.shape[0]

    def _fit(
        self, x: Tensor, y: Tensor, generator: torch.Generator, checkpointer: Checkpointer | None
    ) -> None:
        train_idx, val_idx = self._split(y, generator)
        if self.patience is not None and val_idx is None:
            raise ValueError(
                f"patience needs held-out points, and validation_fraction="
                f"{self.validation_fraction} of {y.numel()} points holds out none"
            )
        x_train, y_train = x[train_idx], y[train_idx]
        x_val = None if val_idx is None else x[val_idx]
        labelled = y_train >= 0
        if labelled.any() and self.init in ("labels", "propagate"):
            missing = set(range(self.n_components)) - set(y_train[labelled].tolist())
            if missing:
                raise ValueError(
                    f"init={self.init!r} needs a labelled point of every class; "
                    f"none for {sorted(missing)}"
                )
        warm = cast(VariationalMixture | None, self._warm_model())
        best = None
        for restart in range(self.n_init if warm is None else 1):  # as sklearn: n_init unused
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            model = self._build() if warm is None else warm
            try:
                fitted = self._fit_once(
                    model, x_train, y_train, x_val, generator, seed + restart, checkpointer,
                    warm=warm is not None,
                )  # fmt: skip
            except NonFiniteLossError as exc:
                # Keep the best model so far (a failed one holds its last good state).
                if best is None:
                    partial = exc.result or TrainResult()
                    nan = math.nan
                    best = _Fit(model, partial.history, partial.n_epochs, nan, nan, nan, nan)
                self._set_fitted(best, x, warn=False)
                self.converged_ = False  # even when an earlier restart's fit is kept
                raise
            if best is None or fitted.selection_score > best.selection_score:
                best = fitted
        assert best is not None  # n_init >= 1 restarts, each kept, or raised
        self._set_fitted(best, x)

    def _set_fitted(self, fit: _Fit, x: Tensor, warn: bool = True) -> None:
        """Store ``fit`` as the fitted state (``labels_`` of every row of ``x``);
        ``converged_`` is False (with a ConvergenceWarning) when its ELBO or training
        log-likelihood is non-finite, that log-likelihood shows divergence, or max_time
        stopped it before max_epochs."""
        model = fit.model
        self.model_ = model
        log_det = float(self.standardizer_.log_abs_det())  # to the user's units
        self.history_ = _history_in_user_units(fit.history, log_det)
        self.n_iter_ = fit.n_epochs
        self.elbo_ = float(fit.elbo) + log_det
        self.weights_ = probabilities(model.mixture.log_weights())
        log_q = self._chunked(self._log_proba, x)
        self.labels_ = log_q.argmax(axis=1).astype(np.int64)
        if warn and self._fitted_setting("weights") == "uniform":
            _warn_on_unequal_shares(probabilities(log_q).mean(axis=0))
        finite = math.isfinite(fit.elbo) and math.isfinite(fit.train_log_likelihood)
        diverged = finite and fit.train_log_likelihood < divergence_floor(
            fit.initial_train_log_likelihood, self.n_components
        )
        self.converged_ = finite and not diverged and not fit.out_of_time
        if not warn or self.converged_:
            return
        if finite and not diverged:
            message = (
                f"max_time stopped the VMoNF fit after {fit.n_epochs} of {self.max_epochs} "
                "epochs; raise max_time"
            )
        elif diverged:
            message = (
                "VMoNF fit diverged: its log-likelihood on the training data is "
                f"{fit.initial_train_log_likelihood - fit.train_log_likelihood:.4g} nats per "
                "point below the "
                f"untrained model's, more than log K + {DIVERGENCE_MARGIN:g}; lower learning_rate"
            )
        else:
            message = "VMoNF fit ended with a non-finite ELBO or log-likelihood"
        warnings.warn(message, ConvergenceWarning, stacklevel=user_stacklevel())

    def _upgrade_fitted(self, version: int) -> None:
        log_det = float(self.standardizer_.log_abs_det())
        if version < 2:  # elbo_ was saved in standardised units
            self.elbo_ += log_det
        if version < 3:  # and history_'s losses up to format 2
            self.history_ = _history_in_user_units(self.history_, log_det)

    # -- VMoNF-specific API ------------------------------------------------------------
    def predict_proba(self, X: object, posterior: str = "amortized") -> np.ndarray:
        """Responsibilities (N, K): q(c|x) (``"amortized"``) or the exact p(c|x) (``"exact"``)."""
        check_choice(posterior, "posterior", ("amortized", "exact"))
        if posterior == "amortized":
            return super().predict_proba(X)
        u = self._validate_X(X)
        return probabilities(self._chunked(self.model_.mixture.posterior, u))

    def predict(self, X: object, posterior: str = "amortized") -> np.ndarray:
        """Most probable component under q(c|x) or the exact posterior, (N,) int64."""
        return self.predict_proba(X, posterior).argmax(axis=1).astype(np.int64)

    def elbo(self, X: object, *, top_k: int | str | None = "fitted") -> np.ndarray:
        """ELBO of each row, (N,), nats, in the user's units (<= score_samples).

        ``top_k``: ``"fitted"`` (default) the bound the fit trained: the ELBO over all K
        components, or with ``elbo_top_k`` the top-k bound (q renormalised over each
        row's ``elbo_top_k`` likeliest components); None the ELBO of q over all K
        components, ``log p(x) - KL(q(c|x) || p(c|x))``; an int k in [1, K] the top-k
        bound. Only the ELBO over all K measures q's amortisation gap.
        """
        u = self._validate_X(X)
        k: int | None = None
        if isinstance(top_k, str) and top_k == "fitted":
            k = self._fitted_setting("elbo_top_k")
        elif isinstance(top_k, str):
            raise ValueError(f"top_k must be 'fitted', None or an int, got {top_k!r}")
        elif top_k is not None:
            k = check_positive_int(top_k, "top_k", maximum=self.model_.mixture.n_components)
        log_det = self.standardizer_.log_abs_det()
        return self._chunked(lambda c: self.model_.elbo(c, top_k=k) + log_det, u)

    def suggest_labels(self, X: object, n: int = 10) -> np.ndarray:
        """Indices of the ``n`` rows whose q(c|x) has the highest entropy (most worth labelling)."""
        n = check_positive_int(n, "n")
        proba = self.predict_proba(X)
        entropy = -(proba * np.log(np.clip(proba, 1e-300, None))).sum(axis=1)
        return np.argsort(-entropy, kind="stable")[: min(n, proba.shape[0])]


#: Nats per point that fixed uniform weights may cost before a fit says so.
UNIFORM_WEIGHTS_COST = 0.05


def _warn_on_unequal_shares(shares: np.ndarray) -> None:
    """Warn when q(c|x) shares the training points (K,) so unequally that the fixed
    uniform weights cost more than ``UNIFORM_WEIGHTS_COST``: about KL(shares || 1/K)
    nats per point against weights equal to the shares (exactly so for separated
    components)."""
    k = shares.shape[0]
    cost = float(np.sum(shares * np.log(np.clip(shares * k, 1e-300, None))))
    if cost <= UNIFORM_WEIGHTS_COST:
        return
    warnings.warn(
        f"q(c|x) gives the components {np.array2string(shares, precision=3)} of the training "
        f"points, but weights='uniform' keeps every mixing weight at 1/K = {1 / k:.3g}: "
        f"score_samples and sample then cost about {cost:.2g} nats per point against "
        "weights equal to those shares. weights='responsibilities' (or 'learned') fits "
        "them, as GaussianMixture does",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _propagate_labels(x: Tensor, y: Tensor, n_neighbors: int = 10) -> Tensor:
    """Labels for every row of x (N, D) spread from the labelled ones (y >= 0) along a
    k-nearest-neighbour graph (scikit-learn's LabelSpreading); labelled rows keep theirs.

    alpha = 0.99 lets labels travel far along thin manifolds: scikit-learn's default
    (0.2) left 10-18 % of two_circles and over half of pinwheel wrongly labelled."""
    spreading = LabelSpreading(
        kernel="knn", n_neighbors=min(n_neighbors, x.shape[0] - 1), alpha=0.99, max_iter=1000
    )
    spreading.fit(x.double().cpu().numpy(), y.cpu().numpy())
    spread = torch.as_tensor(spreading.transduction_, device=y.device, dtype=y.dtype)
    return torch.where(y >= 0, y, spread)
