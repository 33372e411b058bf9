"""``CompetitiveMixture``: Locatello et al.'s competitive training as a scikit-learn estimator."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor, nn

from competitive.assignment import hard_assign, min_count, mixing_weights, training_weights
from competitive.discriminators import Discriminators, build_discriminators, train_discriminators
from competitive.generators import (
    FlowGenerators,
    Generators,
    KMeansGenerators,
    NoExactLikelihoodError,
    VAEGenerators,
)
from vmonf._dtypes import float32_default
from vmonf._validation import (
    SeedLike,
    check_array,
    check_betas,
    check_bool,
    check_choice,
    check_positive_float,
    check_positive_int,
    user_stacklevel,
)
from vmonf.base import (
    DIVERGENCE_MARGIN,
    MixtureEstimator,
    divergence_floor,
    kmeans_clusters,
    probabilities,
)
from vmonf.distributed import gather_rows
from vmonf.mixture import draw_components
from vmonf.resume import Checkpointer
from vmonf.training import MAX_BATCH, FitClock, NonFiniteLossError, TrainConfig, map_chunks

__all__ = [
    "ASSIGNMENTS",
    "GENERATORS",
    "INITS",
    "CompetitiveMixture",
    "CompetitiveModel",
    "resolve_assignment",
]

GENERATORS = ("flow", "vae", "kmeans")
ASSIGNMENTS = ("exact", "discriminator")
INITS = ("uniform", "random_split", "kmeans", "bootstrap")
#: A ``tol`` that stochastically trained generators reach (``tol="auto"`` for them).
TYPICAL_TOL = 0.02
#: Settings that shape a CompetitiveMixture's model: a warm start keeps them as fitted.
WARM_ARCHITECTURE = (
    "n_components", "generator", "n_layers", "hidden_features", "n_hidden_layers",
    "activation", "max_log_scale", "linear", "base_df", "latent_features",
    "discriminator_hidden", "discriminator_layers",
)  # fmt: skip


def resolve_assignment(assignment: str, generator: str) -> str:
    """The rule an ``assignment`` setting names for ``generator``s: ``"auto"`` is exact
    likelihoods, or the discriminators' estimate for VAEs (which have none)."""
    if assignment == "auto":
        return "discriminator" if generator == "vae" else "exact"
    return assignment


@dataclass
class _Progress:
    """Where a fit stands: owners of the training points (N_train,), finished rounds,
    convergence (kept current, so a fit that fails keeps its last assignment)."""

    owners: Tensor
    assigned: bool = False  # owners come from an assignment (else a placeholder)
    n_rounds: int = 0
    converged: bool = False
    out_of_time: bool = False  # max_time stopped the rounds


class CompetitiveModel(nn.Module):
    """What a fitted :class:`CompetitiveMixture` holds: generators, optional discriminators,
    log mixing weights (K,) and the discriminators' log normalisers (K,)."""

    log_weights: Tensor  # buffers (K,)
    log_norm: Tensor

    def __init__(self, generators: Generators, discriminators: Discriminators | None) -> None:
        super().__init__()
        self.generators = generators
        self.discriminators = discriminators
        k = generators.n_components
        self.register_buffer("log_weights", torch.full((k,), -math.log(k)))
        self.register_buffer("log_norm", torch.zeros(k))


class CompetitiveMixture(MixtureEstimator):
    """Competitive training of K generators (Locatello et al. 2018, Algorithm 1).

    After pre-training (``init``), each round trains every generator on the points
    it owns (one batched computation with an (N, K) one-hot mask) for
    ``max_epochs`` epochs, then re-assigns every point to the generator with the
    highest likelihood estimate: the exact log p_k(x) (``assignment="exact"``) or
    the discriminators' density-ratio estimate (``"discriminator"``). It stops when
    no more than ``tol * N`` points change owner, or after ``max_rounds`` rounds
    (always ``max_rounds`` with ``tol=None``).
    Mixing weights are the shares of points won.

    ``predict`` applies the assignment rule that trained the generators (the argmax of
    the likelihood estimates, plus log max(pi_k, min share) with ``assign_with_weights``),
    and ``predict_proba`` is the softmax of those scores. It is the Bayes posterior
    pi_k p_k(x) / p(x) of the mixture density that ``score_samples`` and ``sample`` use
    only with exact assignment, ``assign_with_weights`` and every pi_k at or above the
    floor; a component below it keeps the floor's probability, so that load balancing
    can win it points back.

    Args:
        n_components: number of generators K.
        generator: ``"flow"`` (exact likelihood), ``"vae"`` (no exact likelihood:
            ``score_samples`` raises; use the KDE protocol) or ``"kmeans"`` (the
            degenerate generator x = mu_k + eps with eps ~ N(0, I) in the standardised
            coordinates every generator works in: competitive training is k-means on
            the standardised points, not on X's raw scale).
        assignment: ``"exact"`` (argmax log p_k(x); flows and k-means only),
            ``"discriminator"`` (argmax of the normalised (1 - D_k)/D_k) or ``"auto"``
            (default: exact, discriminator for VAEs).
        assign_with_weights: add log pi_k, floored at the log of the minimum share
            that load balancing keeps (``min_share``), to the scores before the argmax.
            After ``init="uniform"`` the generators start alike and the first one ahead
            can take every point through its weight (a warning says so): pair it with
            ``init="kmeans"``.
        init: ``"uniform"`` (pre-train every generator on all points),
            ``"random_split"`` (each on a random 1/K of them), ``"kmeans"`` (each on
            one k-means cluster of the standardised points), ``"bootstrap"`` (each on
            a bootstrap of N/K points: bagging) or an (N,) array of initial owners.
        pretrain_epochs: epochs of pre-training.
        max_rounds: rounds of Algorithm 1 (0 = keep the pre-trained generators with
            equal weights: bagging or a single model, see :mod:`competitive.baselines`;
            at least 1 for a warm start).
        tol: converged when at most ``tol * N`` points change owner in a round; None:
            no early stop, every one of the ``max_rounds`` rounds runs (a fixed
            training budget, as in :mod:`competitive.studies`). ``"auto"`` (default):
            0 for ``generator="kmeans"`` (Lloyd's steps settle exactly), 0.02 for
            flows and VAEs: a few points near their boundaries keep changing owner
            from round to round (stochastic training: 2-3 % on pinwheel after 20
            rounds), so ``tol=0`` rarely converges with them.
        min_share: load balancing: a generator winning fewer than ``min_share * N``
            points keeps training on its best ``min_share * N`` points with mixing
            weight 0 (default 0.1 / K).
        n_layers, hidden_features, n_hidden_layers, activation, max_log_scale,
            linear, base_df: flow architecture (see :class:`vmonf.ComponentFlows`);
            ``hidden_features``, ``n_hidden_layers`` and ``activation`` also shape the
            VAEs' encoder and decoder (defaults: width 64 and tanh for flows, 50 and
            ReLU for VAEs; ReLU flows extrapolate into tails held-out points fall in,
            up to 100-700 nats too low on skewed_gmm and pinwheel with the other defaults).
        latent_features, decoder_noise: VAE latent size; sample p(x|z) or its mean.
        discriminator_hidden, discriminator_layers, discriminator_epochs,
            discriminator_batch_size, discriminator_learning_rate,
            discriminator_betas: defaults 2-500-500-1 ReLU MLP, 2 epochs, batch 32,
            Adam 8e-4 with beta1 0.5 (the settings the project's references record
            for the competitive-training paper; its appendix itself says only "a
            similar architecture" to its 2 x 50 VAEs and Adam 0.005, beta 0.5, batch
            32), real = all training points, fake = as many samples of each generator.
        keep_discriminators: continue training the same discriminators every round
            instead of fresh ones.
        max_epochs: generator epochs per round (the paper: 10).
        max_time: wall-clock budget of the whole fit in seconds (None = no limit; as
            :class:`vmonf.VMoNF`, without a process's one-off optimiser import and
            the ``callback``'s time).
        batch_size, learning_rate, adam_betas, weight_decay, lr_schedule: generator
            optimiser (Adam, one optimisation from pre-training through every round:
            its moments carry over). ``"cosine"`` runs once over pre-training, then
            once over all ``max_rounds`` rounds with ``tol=None``; with a ``tol`` the
            fit may stop at any round, so every round runs its own schedule and the
            fit always ends annealed.
        validation_fraction: share of points held out (not trained on) to monitor
            ``history_["val_score"]``; 0 (the default) trains on all of X.
        random_state, verbose, device, dtype, n_threads, compile, checkpoint,
            checkpoint_every, checkpoint_seconds: as :class:`vmonf.VMoNF`
            (``fit(X, resume=True)``); ``compile`` applies to the generators' training.
        warm_start: as scikit-learn's ``GaussianMixture``: each ``fit`` of a fitted model
            continues from the previous fit (its generators and standardisation, and its
            discriminators when ``keep_discriminators`` and discriminator assignment)
            instead of pre-training: it assigns X's points by the ``assignment`` rule
            (round 0), then runs up to ``max_rounds`` (>= 1) more rounds with a fresh
            optimiser; ``init`` and ``pretrain_epochs`` are ignored then. The data must
            have the same features; the architecture settings must stay as fitted. Not
            with a ``checkpoint``.
        callback: ``callback(estimator, round)`` after every round (round 0 = after
            pre-training, or a warm start's first assignment); inside it the public
            methods use the current model. Its time is not counted against ``max_time``
            (it is part of ``fit_time_``).

    Fitted attributes: ``weights_`` (K,), ``labels_`` ((N,), the owner of each row of X;
    held-out rows get the final assignment rule's choice, -1 where no rule was
    trained), ``history_`` (per round: ``share`` (K,), ``n_changed``, ``epochs`` (the
    generators' epochs in the round), ``val_score`` (with ``validation_fraction`` > 0:
    held-out mean log p(x), nats; an ELBO bound for VAEs),
    ``round_time`` and ``time`` (s, training only: the callback's time left out)),
    ``n_iter_`` (rounds), ``converged_`` (False, with a ConvergenceWarning, while
    assignments still changed at the last round (``tol`` set) or time ran out, or when
    the fit diverged: its mean training score more than log K + 1 nats below the
    untrained model's, a warm start's starting model's), ``pretrain_time_`` (s; 0 after a
    warm start),
    ``fit_time_`` (s, wall time, with the time before a resume),
    ``n_features_in_``, ``feature_names_in_`` (a data frame's column names, when fitted on
    one), ``fitted_params_`` (the settings of the fit, which predictions and
    :meth:`save` keep to: ``set_params`` changes the next fit).
    """

    _checkpoint_kind = "CompetitiveMixture"
    _warm_architecture = WARM_ARCHITECTURE
    _uses_labels = False  # unsupervised: fit(X, y) ignores y, as scikit-learn's KMeans
    model_: CompetitiveModel

    def __init__(
        self,
        n_components: int = 3,
        *,
        generator: str = "flow",
        assignment: str = "auto",
        assign_with_weights: bool = False,
        init: str | Any = "uniform",
        pretrain_epochs: int = 10,
        max_rounds: int = 20,
        tol: float | str | None = "auto",
        min_share: float | None = None,
        n_layers: int = 6,
        hidden_features: int | None = None,
        n_hidden_layers: int = 2,
        activation: str | None = None,
        max_log_scale: float = 3.0,
        linear: bool = True,
        base_df: float | None = None,
        latent_features: int = 5,
        decoder_noise: bool = True,
        discriminator_hidden: int = 500,
        discriminator_layers: int = 2,
        discriminator_epochs: int = 2,
        discriminator_batch_size: int = 32,
        discriminator_learning_rate: float = 8e-4,
        discriminator_betas: tuple[float, float] = (0.5, 0.999),
        keep_discriminators: bool = False,
        max_epochs: int = 10,
        max_time: float | None = None,
        batch_size: int = 256,
        learning_rate: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        validation_fraction: float = 0.0,
        random_state: SeedLike = None,
        verbose: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        n_threads: int | None = 1,
        compile: bool = False,
        warm_start: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = 100,
        checkpoint_seconds: float | None = 60.0,
        callback: Callable[[CompetitiveMixture, int], None] | None = None,
    ) -> None:
        self.n_components = n_components
        self.generator = generator
        self.assignment = assignment
        self.assign_with_weights = assign_with_weights
        self.init = init
        self.pretrain_epochs = pretrain_epochs
        self.max_rounds = max_rounds
        self.tol = tol
        self.min_share = min_share
        self.n_layers = n_layers
        self.hidden_features = hidden_features
        self.n_hidden_layers = n_hidden_layers
        self.activation = activation
        self.max_log_scale = max_log_scale
        self.linear = linear
        self.base_df = base_df
        self.latent_features = latent_features
        self.decoder_noise = decoder_noise
        self.discriminator_hidden = discriminator_hidden
        self.discriminator_layers = discriminator_layers
        self.discriminator_epochs = discriminator_epochs
        self.discriminator_batch_size = discriminator_batch_size
        self.discriminator_learning_rate = discriminator_learning_rate
        self.discriminator_betas = discriminator_betas
        self.keep_discriminators = keep_discriminators
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.adam_betas = adam_betas
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.dtype = dtype
        self.n_threads = n_threads
        self.compile = compile
        self.warm_start = warm_start
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.callback = callback

    # -- validation ----------------------------------------------------------------------
    def _validate_params(self) -> None:
        check_choice(self.generator, "generator", GENERATORS)
        check_choice(self.assignment, "assignment", (*ASSIGNMENTS, "auto"))
        if self.assignment == "exact" and self.generator == "vae":
            raise ValueError(
                "assignment='exact' needs generators with an exact likelihood; VAEs have "
                "none: use assignment='discriminator'"
            )
        if check_positive_float(self.base_df, "base_df", allow_none=True) and (
            self.generator != "flow"
        ):
            raise ValueError(
                "base_df sets the flows' base distribution; "
                f"{ {'vae': 'VAE', 'kmeans': 'k-means'}[self.generator] } generators have none"
            )
        if self.hidden_features is not None:
            check_positive_int(self.hidden_features, "hidden_features")
        check_positive_int(self.discriminator_hidden, "discriminator_hidden")
        check_positive_int(self.discriminator_layers, "discriminator_layers", minimum=0)
        for name in ("assign_with_weights", "keep_discriminators", "decoder_noise", "linear"):
            check_bool(getattr(self, name), name)
        if isinstance(self.init, str):
            check_choice(self.init, "init", INITS)
        check_positive_int(self.pretrain_epochs, "pretrain_epochs")
        check_positive_int(self.max_rounds, "max_rounds", minimum=0)
        if self.warm_start and self.max_rounds == 0 and hasattr(self, "model_"):
            raise ValueError(
                "warm_start=True with max_rounds=0 would train nothing (a warm start skips "
                "pre-training): give max_rounds >= 1"
            )
        if isinstance(self.tol, str) and self.tol != "auto":
            raise ValueError(f"tol must be a fraction in [0, 1), None or 'auto', got {self.tol!r}")
        if not isinstance(self.tol, str) and self.tol is not None:
            tol = check_positive_float(self.tol, "tol", allow_zero=True)
            if tol >= 1.0:
                raise ValueError(f"tol must be < 1, got {tol}")
        if self.min_share is not None:
            share = check_positive_float(self.min_share, "min_share", allow_zero=True)
            if share * self.n_components >= 1.0:
                raise ValueError(
                    f"min_share must be < 1 / n_components = {1 / self.n_components:.4g}, "
                    f"got {share}"
                )
        check_positive_int(self.discriminator_epochs, "discriminator_epochs")
        check_positive_int(
            self.discriminator_batch_size, "discriminator_batch_size", maximum=MAX_BATCH
        )
        check_positive_float(self.discriminator_learning_rate, "discriminator_learning_rate")
        check_betas(self.discriminator_betas, "discriminator_betas")
        # Architectures and optimiser settings are checked by their constructors.
        self._generator_config(1, None)
        self._discriminator_config(None)

    def _tol(self) -> float | None:
        """``tol`` with ``"auto"`` resolved for the generator."""
        if self.tol == "auto":
            return 0.0 if self.generator == "kmeans" else TYPICAL_TOL
        return None if self.tol is None else float(self.tol)

    def _min_share(self) -> float:
        share = self._fitted_setting("min_share")
        return 0.1 / self._fitted_setting("n_components") if share is None else float(share)

    def _generator_config(
        self, epochs: int, max_time: float | None, round_index: int | None = None
    ) -> TrainConfig:
        """Pre-training's config, or with ``round_index`` a round's: with ``tol=None``
        the rounds follow one learning-rate schedule over all ``max_rounds`` of them."""
        schedule: dict[str, int] = {}
        if round_index is not None and self._tol() is None:
            schedule = {
                "lr_schedule_epochs": epochs * self.max_rounds,
                "lr_schedule_start": epochs * round_index,
            }
        return TrainConfig(
            max_epochs=epochs,
            max_time=max_time,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            adam_betas=check_betas(self.adam_betas, "adam_betas"),
            weight_decay=self.weight_decay,
            lr_schedule=self.lr_schedule,
            verbose=self.verbose,
            desc=f"{self.generator} generators",
            **schedule,
        )

    def _discriminator_config(self, max_time: float | None) -> TrainConfig:
        return TrainConfig(
            max_epochs=self.discriminator_epochs,
            max_time=max_time,
            batch_size=self.discriminator_batch_size,
            learning_rate=self.discriminator_learning_rate,
            adam_betas=check_betas(self.discriminator_betas, "discriminator_betas"),
            lr_schedule="constant",
            verbose=self.verbose,
            desc="discriminators",
        )

    # -- building ----------------------------------------------------------------------
    def _build_generators(self) -> Generators:
        d, k = self.n_features_in_, self.n_components
        if self.generator == "kmeans":
            return KMeansGenerators(d, k)
        if self.generator == "vae":
            return VAEGenerators(
                d,
                k,
                hidden_features=50 if self.hidden_features is None else self.hidden_features,
                n_hidden_layers=self.n_hidden_layers,
                latent_features=self.latent_features,
                activation="relu" if self.activation is None else self.activation,
                decoder_noise=self.decoder_noise,
            )
        return FlowGenerators(
            d,
            k,
            n_layers=self.n_layers,
            hidden_features=64 if self.hidden_features is None else self.hidden_features,
            n_hidden_layers=self.n_hidden_layers,
            activation="tanh" if self.activation is None else self.activation,
            max_log_scale=self.max_log_scale,
            linear=self.linear,
            base_df=self.base_df,
        )

    def _build_discriminators(self) -> Discriminators:
        return build_discriminators(
            self.n_features_in_, self.n_components, self.discriminator_hidden,
            self.discriminator_layers, self._torch_device, self._torch_dtype,
        )  # fmt: skip

    def _build(self, with_discriminators: bool | None = None) -> CompetitiveModel:
        """An untrained model; discriminators by default when the settings train them
        (``assignment="discriminator"``, ``max_rounds >= 1``)."""
        if with_discriminators is None:
            with_discriminators = not self._exact_assignment(fitted=False) and self.max_rounds > 0
        with float32_default():  # the seed's weights, whatever the caller's default dtype
            generators = self._build_generators()
            discriminators = self._build_discriminators() if with_discriminators else None
            model = CompetitiveModel(generators, discriminators)
        return model.to(device=self._torch_device, dtype=self._torch_dtype)

    @classmethod
    def _upgrade_params(cls, params: dict[str, Any], version: int) -> dict[str, Any]:
        if version < 2 and params.get("hidden_features") == 0:
            params["hidden_features"] = None  # what format 1 built: the default width
        return params

    def _build_to_load(self, state: dict[str, Tensor]) -> CompetitiveModel:
        # A fit that failed before its first assignment saved no discriminators.
        return self._build(any(key.startswith("discriminators.") for key in state))

    # -- hooks ---------------------------------------------------------------------------
    def _log_joint(self, u: Tensor) -> Tensor:
        return self.model_.log_weights + self.model_.generators.log_prob(u)

    def _min_features(self) -> int:
        return 2 if self.generator == "flow" else 1

    def _density_module(self) -> nn.Module:
        return self.model_.generators  # the discriminators only estimate p_k

    def _n_weight_parameters(self) -> int:
        fitted = self._fitted_setting
        return fitted("n_components") - 1 if fitted("max_rounds") > 0 else 0  # shares won

    def _exact_assignment(self, fitted: bool = True) -> bool:
        """Whether points go to the argmax of exact likelihoods (``"auto"``: unless the
        generators are VAEs), by the fitted settings or (``fitted=False``) the current."""
        setting = self._fitted_setting if fitted else partial(getattr, self)
        return resolve_assignment(setting("assignment"), setting("generator")) == "exact"

    def _can_assign(self) -> bool:
        return self._exact_assignment() or self.model_.discriminators is not None

    def _likelihood_scores(self, u: Tensor) -> Tensor:
        """Log-likelihood estimates (N, K): exact, or the discriminators' (standardised units)."""
        model = self.model_
        if self._exact_assignment():
            return model.generators.log_prob(u)
        return self._discriminator_log_ratio(u)

    def _discriminator_log_ratio(self, u: Tensor) -> Tensor:
        """The discriminators' normalised estimate of log p_k(u) - log p_data(u), (N, K)."""
        model = self.model_
        if model.discriminators is None:
            raise ValueError(
                "no discriminators were trained: they need assignment='discriminator' (or "
                "'auto' with VAEs), max_rounds >= 1 and a fit that reached its first assignment"
            )
        return model.discriminators.log_ratio(u) - model.log_norm

    def _assignment_prior(self) -> Tensor | float:
        """log pi_k added before the argmax (``assign_with_weights``), floored at
        ``min_share``: a component load balancing keeps training can win points back."""
        if not self._fitted_setting("assign_with_weights"):
            return 0.0
        share, log_weights = self._min_share(), self.model_.log_weights
        return log_weights.clamp_min(math.log(share)) if share > 0 else log_weights

    def _scores(self, u: Tensor) -> Tensor:
        """What assignments maximise (N, K): likelihood estimates plus the prior."""
        return self._likelihood_scores(u) + self._assignment_prior()

    def _log_proba(self, u: Tensor) -> Tensor:
        return torch.log_softmax(self._scores(u), dim=1)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        components = draw_components(self.model_.log_weights, n, generator)
        return self.model_.generators.sample_components(components, generator), components

    def _fitted_state(self) -> dict[str, Any]:
        return {
            "weights_": self.weights_,
            "labels_": self.labels_,
            "history_": self.history_,
            "n_iter_": self.n_iter_,
            "converged_": self.converged_,
            "pretrain_time_": self.pretrain_time_,
        }

    # -- public API ----------------------------------------------------------------------
    def score_samples(self, X: object) -> np.ndarray:
        """Exact log p(x) of each row, (N,), nats, user's units (flows and k-means only)."""
        if self._fitted_setting("generator") == "vae":
            raise NoExactLikelihoodError(
                "VAE generators have no exact likelihood, so score_samples is undefined; "
                "evaluate samples with the KDE protocol instead: "
                "vmonf.metrics.kde_log_likelihood(model.sample(n)[0], X_test, n_test=None) "
                "(n_test=None scores every row of X_test; the protocol's default, 500, "
                "the first 500)"
            )
        return super().score_samples(X)

    def log_ratio(self, X: object) -> np.ndarray:
        """Discriminators' estimate of log p_k(x) - log p_data(x), (N, K), nats.

        The normalised density-ratio trick (see :mod:`competitive.discriminators`);
        the difference of log densities is the same in any units. Compare it with
        the exact ``log p_k - log p_data``, not with log p_k alone.
        """
        return self._chunked(self._discriminator_log_ratio, self._validate_X(X))

    def elbo(self, X: object) -> np.ndarray:
        """log sum_k pi_k exp(bound_k(x)), (N,), nats, user's units: exact log p(x) for
        flows; for VAEs a stochastic lower bound, the log of a one-sample importance
        estimate of p(x) whose expectation is <= log p(x)
        (:meth:`~competitive.generators.VAEGenerators.log_likelihood_bound`). Its noise is
        drawn from a fixed seed: the same X gives the same values, and torch's global RNG
        is left alone."""
        u = self._validate_X(X)
        with self._seeded(0):
            return self._chunked(self._bound, u)

    def _bound(self, u: Tensor) -> Tensor:
        joint = self.model_.log_weights + self.model_.generators.log_likelihood_bound(u)
        return torch.logsumexp(joint, dim=1) + self.standardizer_.log_abs_det()

    # -- fitting -------------------------------------------------------------------------
    def _split(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Train and held-out indices; no shuffling when nothing is held out."""
        n_val = round(self.validation_fraction * n)
        if n_val < 1 or n - n_val < self.n_components:
            return torch.arange(n), None
        order = torch.randperm(n, generator=generator)
        return order[n_val:], order[:n_val]

    def _initial_weights(
        self, n: int, train_idx: Tensor, x_train: Tensor, generator: torch.Generator
    ) -> Tensor:
        """(N_train, K) pre-training weights of ``init``."""
        k = self.n_components
        if not isinstance(self.init, str):
            if np.ndim(self.init) != 1:
                raise ValueError(
                    f"init as an array must be 1-D, one owner per row of X; got shape "
                    f"{np.shape(self.init)}"
                )
            owners = check_array(self.init, "init", allow_1d=True)[:, 0]
            if owners.shape[0] != n or np.any(owners != np.round(owners)):
                raise ValueError(f"init as an array must hold {n} integer owners, one per row of X")
            if owners.min() < 0 or owners.max() >= k:
                raise ValueError(f"init owners must lie in [0, {k})")
            owners_t = torch.as_tensor(owners.astype(np.int64))[train_idx]
            return F.one_hot(owners_t, k).to(self._torch_dtype)
        m = train_idx.numel()
        if self.init == "uniform":
            return torch.ones(m, k, dtype=self._torch_dtype)
        if self.init == "kmeans":
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            owners_t = kmeans_clusters(x_train, k, seed).cpu()
            return F.one_hot(owners_t, k).to(self._torch_dtype)
        if self.init == "random_split":
            return F.one_hot(torch.randint(0, k, (m,), generator=generator), k).to(
                self._torch_dtype
            )
        # bootstrap: each generator gets N/K points drawn with replacement (counts = weights)
        draws = torch.randint(0, m, (k, max(1, m // k)), generator=generator)
        counts = torch.zeros(k, m, dtype=self._torch_dtype)
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=self._torch_dtype))
        return counts.T

    def _assignment_scores(
        self,
        x: Tensor,
        generator: torch.Generator,
        clock: FitClock,
        checkpointer: Checkpointer | None,
    ) -> Tensor:
        """Train the discriminators if needed, then the (N, K) likelihood estimates of the
        training points (:meth:`_likelihood_scores`)."""
        model = self.model_
        if not self._exact_assignment(fitted=False):
            if model.discriminators is None or not self.keep_discriminators:
                model.discriminators = self._build_discriminators()
            log_norm = train_discriminators(
                model.discriminators,
                x,
                model.generators,
                self._discriminator_config(clock.remaining(self.max_time)),
                generator,
                checkpointer,
            )
            model.log_norm.copy_(log_norm)
        model.eval()
        with torch.no_grad():  # data-parallel: each rank scores its shard, all get all
            return gather_rows(lambda xs: map_chunks(self._likelihood_scores, xs), x)

    def _mean_score(self, x: Tensor) -> float:
        """Mean per-point score of x (N, D): log p(x), or a VAE's fixed-noise ELBO, nats."""
        self.model_.eval()
        with torch.no_grad(), self._seeded(0):  # a VAE's bound: the same noise each round
            return float(map_chunks(self._bound, x).mean())

    def _notify(self, round_: int, clock: FitClock) -> None:
        if self.callback is not None:
            with clock.excluding():
                self.callback(self, round_)
            self.model_.eval()

    def _fit(
        self, x: Tensor, y: Tensor, generator: torch.Generator, checkpointer: Checkpointer | None
    ) -> None:
        clock = FitClock()  # max_time's clock: the callback's time is left out
        train_idx, val_idx = self._split(x.shape[0], generator)
        x_train = x[train_idx]
        x_val = None if val_idx is None else x[val_idx]
        minimum = min_count(x_train.shape[0], self._min_share())
        warm = cast(CompetitiveModel | None, self._warm_model())
        init = None
        if warm is None:
            init = self._initial_weights(x.shape[0], train_idx.cpu(), x_train, generator)
            init = init.to(x.device)
            # Generators first and alone: one seed pre-trains the same generators whatever
            # the assignment; discriminators are built when first trained (round 0), so a
            # fit that fails before never predicts with untrained ones.
            self.model_ = self._build(with_discriminators=False)
        else:
            if self._exact_assignment(fitted=False) or not self.keep_discriminators:
                warm.discriminators = None  # trained against the previous generators
            self.model_ = warm
        # The untrained model's score (a warm start's: where it starts), for divergence.
        initial_score = self._mean_score(x_train)
        self.pretrain_time_ = math.nan  # set when pre-training ends
        history: dict[str, list[Any]] = {
            "share": [], "n_changed": [], "epochs": [], "round_time": [], "time": [],
            **({} if x_val is None else {"val_score": []}),
        }  # fmt: skip
        progress = _Progress(
            owners=torch.zeros(x_train.shape[0], dtype=torch.long, device=x.device)
            if init is None
            else init.argmax(1)
        )
        try:
            self._rounds(x_train, x_val, init, minimum, history, generator, checkpointer,
                         clock, progress)  # fmt: skip
        except NonFiniteLossError:
            progress.converged = False
            self._set_fitted(progress, x_train, train_idx, x_val, val_idx, history)
            raise  # the generators keep their last good state
        self._set_fitted(progress, x_train, train_idx, x_val, val_idx, history)
        self._warn_on_empty_components(warm_started=warm is not None)
        final_score = self._mean_score(x_train)
        if not final_score >= divergence_floor(initial_score, self.n_components):  # or NaN
            self.converged_ = False
            warnings.warn(
                "CompetitiveMixture fit diverged: its mean training score (log-likelihood; "
                f"an ELBO for VAEs) is {initial_score - final_score:.4g} nats per point below "
                f"{'the untrained' if warm is None else 'its starting'} "
                f"model's, more than log K + {DIVERGENCE_MARGIN:g}; lower learning_rate",
                ConvergenceWarning,
                stacklevel=user_stacklevel(),
            )
        elif not progress.converged:
            last = history["n_changed"][-1] if history["n_changed"] else "n/a"
            if progress.out_of_time:
                message = (
                    f"max_time stopped the fit after {progress.n_rounds} round(s) of "
                    f"{self.max_rounds} ({last} points changed owner in the last); raise "
                    "max_time"
                )
            else:
                message = (
                    f"assignments still changed after {progress.n_rounds} round(s) ({last} "
                    f"of {x_train.shape[0]} points in the last); {self._convergence_hint()}"
                )
            warnings.warn(
                f"CompetitiveMixture: {message}",
                ConvergenceWarning,
                stacklevel=user_stacklevel(),
            )

    def _convergence_hint(self) -> str:
        """What to change when assignments still moved at the last round."""
        if self.generator == "kmeans":  # Lloyd's steps settle exactly: rounds will do
            return "raise max_rounds"
        kind = "flows" if self.generator == "flow" else "VAEs"
        tol = self._tol()
        if tol is None or tol < TYPICAL_TOL:
            return (
                f"raise max_rounds or tol (e.g. tol={TYPICAL_TOL:g}: boundary points of "
                f"stochastically trained {kind} keep moving)"
            )
        return "raise max_rounds or tol"

    def _warn_on_empty_components(self, warm_started: bool) -> None:
        """Say so when the rounds left components with no points (mixing weight 0)."""
        empty = np.flatnonzero(self.weights_ == 0).tolist()
        if not empty or self.n_iter_ == 0:
            return
        hint = (
            ": with assign_with_weights=True and init='uniform' the generators start alike "
            "and the first component ahead takes the points through its weight; try "
            "init='kmeans' or assign_with_weights=False"
            if self.assign_with_weights
            and isinstance(self.init, str)
            and self.init == "uniform"
            and not warm_started
            else ""
        )
        warnings.warn(
            f"CompetitiveMixture: component(s) {empty} ended with mixing weight 0 (each "
            f"won fewer than min_share of the points): the mixture uses "
            f"{self.n_components - len(empty)} of its {self.n_components} components{hint}",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def _set_fitted(
        self,
        progress: _Progress,
        x_train: Tensor,
        train_idx: Tensor,
        x_val: Tensor | None,
        val_idx: Tensor | None,
        history: dict[str, list[Any]],
    ) -> None:
        """Fitted attributes; ``labels_`` in X's row order: the training rows' owners
        after the last assignment, other rows (held out, or all of them when no
        assignment ran) by the final rule, -1 where no rule was trained."""
        self.model_.eval()

        def by_rule(x: Tensor) -> Tensor:
            with torch.no_grad():
                return hard_assign(map_chunks(self._scores, x)).cpu()

        n_val = 0 if val_idx is None else val_idx.numel()
        labels = torch.full((train_idx.numel() + n_val,), -1)
        if progress.assigned:
            labels[train_idx.cpu()] = progress.owners.cpu()
        elif self._can_assign():
            labels[train_idx.cpu()] = by_rule(x_train)
        if x_val is not None and val_idx is not None and self._can_assign():
            labels[val_idx.cpu()] = by_rule(x_val)
        self.labels_ = labels.numpy().astype(np.int64)
        self.weights_ = probabilities(self.model_.log_weights)
        self.history_ = history
        self.n_iter_ = progress.n_rounds
        self.converged_ = progress.converged

    def _rounds(
        self,
        x_train: Tensor,
        x_val: Tensor | None,
        init: Tensor | None,
        minimum: int,
        history: dict[str, list[Any]],
        generator: torch.Generator,
        checkpointer: Checkpointer | None,
        clock: FitClock,
        progress: _Progress,
    ) -> None:
        """Pre-training on ``init``'s (N_train, K) weights (None: a warm start, none),
        then rounds of training and re-assignment. Keeps ``progress`` (owners, rounds,
        convergence) current and appends each round to ``history``."""
        model, k, tol = self.model_, self.n_components, self._tol()
        gens = model.generators
        # Pre-training and the rounds are one optimisation: Adam's moments carry over
        # (with a fresh optimiser and schedule every round the K = 9 skewed mixture of
        # the comparison study lost 0.15 nats of held-out KL).
        optimizer_state = None
        if init is not None:
            optimizer_state = gens.fit_weighted(
                x_train,
                init,
                self._generator_config(self.pretrain_epochs, clock.remaining(self.max_time)),
                generator,
                checkpointer,
                compile=self.compile,
            ).optimizer_state
        self.pretrain_time_ = 0.0 if init is None else clock.elapsed()
        if self.max_rounds > 0:
            scores = self._assignment_scores(x_train, generator, clock, checkpointer)
            owners = hard_assign(scores + self._assignment_prior())
            progress.owners, progress.assigned = owners, True
            model.log_weights.copy_(mixing_weights(owners, k, minimum).log())
            self._notify(0, clock)
            for round_index in range(self.max_rounds):
                if self.max_time is not None and clock.elapsed() > self.max_time:
                    progress.out_of_time = True
                    break
                round_started = time.perf_counter()
                trained = gens.fit_weighted(
                    x_train,
                    training_weights(owners, scores, minimum),
                    self._generator_config(
                        self.max_epochs, clock.remaining(self.max_time), round_index
                    ),
                    generator,
                    checkpointer,
                    compile=self.compile,
                    optimizer_state=optimizer_state,
                )
                optimizer_state = trained.optimizer_state
                scores = self._assignment_scores(x_train, generator, clock, checkpointer)
                new = hard_assign(scores + self._assignment_prior(), previous=owners)
                changed = int((new != owners).sum())
                owners = new
                progress.owners, progress.n_rounds = owners, progress.n_rounds + 1
                model.log_weights.copy_(mixing_weights(owners, k, minimum).log())
                history["share"].append(
                    (torch.bincount(owners, minlength=k).double() / owners.numel()).tolist()
                )
                history["n_changed"].append(changed)
                history["epochs"].append(trained.n_epochs)  # fewer if max_time cut it short
                if x_val is not None:
                    history["val_score"].append(self._mean_score(x_val))
                history["round_time"].append(time.perf_counter() - round_started)
                history["time"].append(clock.elapsed())
                self._notify(progress.n_rounds, clock)
                if tol is not None and changed <= tol * x_train.shape[0]:
                    progress.converged = True
                    break
                if trained.stop_reason == "max_time":  # the round itself was cut short
                    progress.out_of_time = True
                    break
            else:
                progress.converged = tol is None  # the fixed rounds all ran
        else:
            progress.converged = True  # nothing to converge: bagging / a single model
