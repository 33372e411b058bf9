r"""Discriminator-estimated versus exact likelihoods of a fitted mixture of flows.

The competitive scheme assigns points with discriminators: :math:`D_k` tells data
from samples of component k, and the normalised :math:`\log((1 - D_k)/D_k)`
estimates :math:`\log p_k(x) - \log p_{data}(x)` (see :mod:`competitive.discriminators`).
With flows every such quantity is also known exactly, so the estimate can be set
beside it:

* :func:`discriminator_estimate` trains fresh discriminators on a fitted mixture
  (either estimator) exactly as the competitive scheme does;
* :func:`exact_log_ratios` gives the exact targets: ``log p_k - log p_true`` (a toy's
  true density) and ``log p_k - log p_mix`` (the fitted mixture);
* :func:`compare_log_ratios` scores an estimate against a target: per component
  Spearman and Pearson correlation, mean absolute error, bias, the share of points
  where D saturates; overall the agreement of the two argmaxes (on all points, and on
  the points whose exact argmax is decisive) and their ARI;
* :func:`compare_with_exact` does all three; :class:`RoundTracker` does it after
  every round of a competitive run (a ``callback``).

All log densities are in nats; arrays are numpy, (N, K) = points x components.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import stats
from torch import Tensor

from competitive.discriminators import (
    ComponentSampler,
    build_discriminators,
    train_discriminators,
)
from competitive.estimator import CompetitiveMixture
from competitive.generators import NoExactLikelihoodError
from vmonf._validation import SeedLike, check_array, check_positive_float, check_seed
from vmonf.base import MixtureEstimator
from vmonf.metrics import adjusted_rand_index
from vmonf.training import torch_threads

__all__ = [
    "DiscriminatorEstimate",
    "LikelihoodComparison",
    "RatioStats",
    "RoundTracker",
    "compare_log_ratios",
    "compare_with_exact",
    "component_log_prob",
    "discriminator_estimate",
    "exact_log_ratios",
    "own_discriminator_estimate",
]

STAT_NAMES = ("spearman", "pearson", "mae", "bias", "mae_owned", "saturated")
#: Nats by which a point's exact best component must lead the runner-up for the exact
#: argmax to count as decisive (:attr:`RatioStats.decisive_agreement`): a density e = 2.7
#: times the runner-up's.
DECISIVE_MARGIN = 1.0


# --------------------------------------------------------------------------- exact side


def _check_fitted(estimator: object) -> MixtureEstimator:
    if not isinstance(estimator, MixtureEstimator):
        raise TypeError(
            "estimator must be a fitted VMoNF or CompetitiveMixture, got "
            f"{type(estimator).__name__}"
        )
    estimator._check_is_fitted()
    return estimator


class _Components(ComponentSampler, Protocol):
    """The K components of a fitted mixture (its ComponentFlows, or exact generators):
    ``log_prob(u)`` (N, K) and ``sample(n, generator=)`` (K, n, D), both in standardised
    units."""

    def log_prob(self, u: Tensor, /) -> Tensor: ...


def _components(estimator: MixtureEstimator) -> _Components:
    """The K components of a fitted mixture: ``log_prob(u)`` (N, K) and
    ``sample(n, generator=)`` (K, n, D), both in standardised units."""
    model = estimator.model_
    generators = getattr(model, "generators", None)
    if generators is not None:
        if not generators.exact:
            raise NoExactLikelihoodError(
                f"{type(generators).__name__} have no exact likelihood: there is nothing "
                "exact to compare the discriminators with"
            )
        return generators
    mixture = getattr(model, "mixture", None)
    if mixture is None:
        raise TypeError(f"{type(estimator).__name__} holds no mixture of flows")
    return mixture.flows


def component_log_prob(estimator: object, X: object) -> np.ndarray:
    """Exact log p_k(x) of every component at every row of X (N, D): (N, K), nats, user's units."""
    est = _check_fitted(estimator)
    components = _components(est)
    u = est._validate_X(X)
    log_det = est.standardizer_.log_abs_det()
    return est._chunked(lambda c: components.log_prob(c) + log_det, u)


def exact_log_ratios(
    estimator: object, X: object, true_log_prob: object | None = None
) -> dict[str, np.ndarray]:
    """The exact quantities a discriminator estimates at the rows of X (N, D).

    Returns ``{"mixture": log p_k - log p_mix}`` (N, K), the fitted mixture as p_data,
    plus ``"truth": log p_k - log p_true`` when ``true_log_prob`` (N,) is given.

    The discriminators are trained with the *data* as their real class, so ``"truth"``
    is what they estimate. ``"mixture"`` stands in when the truth is unknown: it
    differs from that target by log p_true - log p_mix at each point (the same for
    every k), so argmax agreement and ARI are unaffected, but its errors and bias
    include the model's misfit (the bias moves by about -KL(true || mix)).
    """
    log_pk = component_log_prob(estimator, X)
    out = {"mixture": log_pk - estimator.score_samples(X)[:, None]}  # type: ignore[attr-defined]
    if true_log_prob is not None:
        out["truth"] = log_pk - _check_true_log_prob(true_log_prob, log_pk.shape[0], "X")[:, None]
    return out


def _check_true_log_prob(values: object, n_rows: int, rows_of: str) -> np.ndarray:
    """``true_log_prob`` as finite float64 (n_rows,): one log density per row of ``rows_of``."""
    truth = check_array(values, "true_log_prob", allow_1d=True)
    if truth.shape != (n_rows, 1):
        raise ValueError(
            f"true_log_prob must hold {n_rows} values, one per row of {rows_of}; got shape "
            f"{np.asarray(values).shape}"
        )
    return truth[:, 0]


# --------------------------------------------------------------------------- estimated side


@dataclass(frozen=True)
class DiscriminatorEstimate:
    """Discriminators' view of some points: ``log_ratio`` (N, K), the normalised estimate
    of log p_k - log p_data (nats); ``logits`` (N, K), log D_k / (1 - D_k) before
    normalisation; ``train_time`` (s, 0 for a run's own discriminators)."""

    log_ratio: np.ndarray
    logits: np.ndarray
    train_time: float = 0.0


def _settings(
    estimator: MixtureEstimator, settings: CompetitiveMixture | None
) -> CompetitiveMixture:
    if settings is not None:
        if not isinstance(settings, CompetitiveMixture):
            raise TypeError(f"settings must be a CompetitiveMixture, got {type(settings).__name__}")
        settings._validate_settings()  # errors name the settings' own parameters
        return settings
    if isinstance(estimator, CompetitiveMixture):
        return estimator
    return CompetitiveMixture(estimator.n_components)


def discriminator_estimate(
    estimator: object,
    X_train: object,
    X_eval: object,
    *,
    settings: CompetitiveMixture | None = None,
    random_state: SeedLike = 0,
    max_time: float | None = None,
) -> DiscriminatorEstimate:
    """Train fresh discriminators on a fitted flow mixture as the competitive scheme does.

    Real = the rows of ``X_train`` (N, D), fake = N samples of each component, in the
    estimator's standardised units; architecture and optimiser are ``settings``'
    discriminator parameters (default: the estimator's own if it is a
    :class:`CompetitiveMixture`, else that class's defaults: a 2-500-500-1
    MLP, 2 epochs, batch 32, Adam 8e-4 with beta1 0.5). The ratio is normalised over
    ``X_train`` and evaluated at ``X_eval`` (M, D). ``max_time`` caps the training in
    seconds. The caller's global torch RNG is left untouched; ``random_state`` seeds
    everything (None: a fresh seed, as in scikit-learn).
    """
    est = _check_fitted(estimator)
    components = _components(est)
    config = _settings(est, settings)
    seed = check_seed(random_state, "random_state")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    check_array(X_train, "X_train", min_samples=2)
    # The caller's object, its feature names checked; standardised whole, to train on.
    u_train = est._standardised(est._validate_X(X_train), est._fitted_dtype)
    u_eval = est._validate_X(X_eval)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    with torch_threads(getattr(est, "n_threads", None)), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        discriminators = build_discriminators(
            est.n_features_in_,
            est._fitted_setting("n_components"),  # set_params changes the next fit
            config.discriminator_hidden,
            config.discriminator_layers,
            u_train.device,
            u_train.dtype,
        )
        log_norm = train_discriminators(
            discriminators, u_train, components, config._discriminator_config(max_time), generator
        )
        discriminators.eval()
        logits = est._chunked(discriminators, u_eval)
    return DiscriminatorEstimate(
        log_ratio=-logits - log_norm.double().cpu().numpy(),
        logits=logits,
        train_time=time.perf_counter() - started,
    )


def own_discriminator_estimate(estimator: CompetitiveMixture, X: object) -> DiscriminatorEstimate:
    """The discriminators a competitive run trained itself (assignment="discriminator"), at X."""
    if not isinstance(estimator, CompetitiveMixture):
        raise TypeError(f"estimator must be a CompetitiveMixture, got {type(estimator).__name__}")
    estimate = estimator.log_ratio(X)  # validates X, raises without discriminators
    discriminators = estimator.model_.discriminators
    assert discriminators is not None  # log_ratio raised otherwise
    logits = estimator._chunked(discriminators, estimator._validate_X(X))
    return DiscriminatorEstimate(log_ratio=estimate, logits=logits)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class RatioStats:
    """How well an (N, K) estimate tracks an exact (N, K) target, nats.

    Per component (K,): ``spearman`` and ``pearson`` correlation, ``mae`` (mean
    absolute error), ``bias`` (mean estimate - exact), ``mae_owned`` (MAE on the
    points whose exact argmax is k; NaN if none: ``mae`` and ``bias`` are dominated by
    points far from component k, tens of nats below, where no sample of k fell for
    its discriminator to learn from), ``saturated`` (share of points
    where D_k lies within ``saturation`` of 0 or 1; NaN without logits). Overall:
    ``agreement`` (share of points where the two argmaxes agree), ``ari`` (adjusted
    Rand index of the two partitions), ``decisive_share`` (share of points whose exact
    best component leads the runner-up by at least ``margin`` nats; all points when
    K = 1) and ``decisive_agreement`` (the agreement on those points; NaN if none). On
    the others the exact assignment is close to a tie, decided by differences an
    estimate cannot be expected to resolve (and a near-tie partition, e.g. right after
    every flow was trained on all the data, says little about the estimate).
    """

    spearman: np.ndarray
    pearson: np.ndarray
    mae: np.ndarray
    bias: np.ndarray
    mae_owned: np.ndarray
    saturated: np.ndarray
    agreement: float
    ari: float
    decisive_share: float
    decisive_agreement: float

    def summary(self) -> dict[str, float]:
        """Means over components (NaN-aware) plus ``agreement`` and ``ari``."""
        out: dict[str, float] = {}
        for name in STAT_NAMES:
            values = getattr(self, name)
            out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        return {**out, **self._overall()}

    def _overall(self) -> dict[str, float]:
        return {
            "agreement": self.agreement,
            "ari": self.ari,
            "decisive_share": self.decisive_share,
            "decisive_agreement": self.decisive_agreement,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain lists and floats (JSON-ready)."""
        per = {name: getattr(self, name).tolist() for name in STAT_NAMES}
        return {**per, **self._overall()}


def _correlation(fn: Any, a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return math.nan  # undefined for a constant column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b)[0])


def _check_ratio_array(values: object, name: str) -> np.ndarray:
    """(N, K) finite real log-ratios, N >= 2, as float64 (:func:`check_array`'s checks:
    a complex estimate is refused, not silently cut to its real part)."""
    try:
        shape: tuple[int, ...] | None = np.shape(cast(ArrayLike, values))  # any object
    except ValueError:  # ragged rows: check_array says so
        shape = None
    if shape is not None and (len(shape) != 2 or shape[0] < 2 or shape[1] < 1):
        raise ValueError(f"{name} must be (N, K) with N >= 2, got shape {shape}")
    return check_array(values, name)


def _check_saturation(saturation: object) -> float:
    eps = check_positive_float(saturation, "saturation")
    if eps >= 0.5:
        raise ValueError(f"saturation must be < 0.5, got {eps}")
    return eps


def compare_log_ratios(
    estimate: object,
    exact: object,
    *,
    logits: object | None = None,
    saturation: float = 1e-3,
    margin: float = DECISIVE_MARGIN,
) -> RatioStats:
    """Score an estimate (N, K) of log-ratios against the exact values (N, K), nats.

    ``logits`` (N, K), log D/(1 - D), give the saturation share: D_k(x) < ``saturation``
    or > 1 - ``saturation``. ``margin`` (nats) is the lead over the runner-up that makes
    a point's exact argmax decisive. See :class:`RatioStats`.
    """
    est = _check_ratio_array(estimate, "estimate")
    ref = _check_ratio_array(exact, "exact")
    if est.shape != ref.shape:
        raise ValueError(f"estimate and exact differ in shape: {est.shape} and {ref.shape}")
    eps = _check_saturation(saturation)
    margin = check_positive_float(margin, "margin")
    k = est.shape[1]
    if logits is None:
        saturated = np.full(k, math.nan)
    else:
        lg = _check_ratio_array(logits, "logits")
        if lg.shape != est.shape:
            raise ValueError(f"logits must have shape {est.shape}, got {lg.shape}")
        saturated = (np.abs(lg) > math.log((1.0 - eps) / eps)).mean(axis=0)
    est_owner, exact_owner = est.argmax(axis=1), ref.argmax(axis=1)
    agrees = est_owner == exact_owner
    decisive = _exact_lead(ref) >= margin
    error = est - ref
    mae_owned = np.array(
        [np.abs(error[exact_owner == j, j]).mean() if (exact_owner == j).any() else math.nan
         for j in range(k)]
    )  # fmt: skip
    return RatioStats(
        spearman=np.array([_correlation(stats.spearmanr, est[:, j], ref[:, j]) for j in range(k)]),
        pearson=np.array([_correlation(stats.pearsonr, est[:, j], ref[:, j]) for j in range(k)]),
        mae=np.abs(error).mean(axis=0),
        bias=error.mean(axis=0),
        mae_owned=mae_owned,
        saturated=saturated,
        agreement=float(agrees.mean()),
        ari=adjusted_rand_index(exact_owner, est_owner),
        decisive_share=float(decisive.mean()),
        decisive_agreement=float(agrees[decisive].mean()) if decisive.any() else math.nan,
    )


def _exact_lead(exact: np.ndarray) -> np.ndarray:
    """(N,) nats by which each row's best entry leads its second best (inf if K = 1)."""
    if exact.shape[1] == 1:
        return np.full(exact.shape[0], math.inf)
    top_two = np.partition(exact, -2, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


# --------------------------------------------------------------------------- together


@dataclass(frozen=True)
class LikelihoodComparison:
    """An estimate beside the exact quantities at the same M points.

    ``estimate``: the discriminators' view; ``exact``: ``{"mixture": ..., "truth": ...}``
    (M, K) each (see :func:`exact_log_ratios`); ``stats``: a :class:`RatioStats` per key.
    """

    estimate: DiscriminatorEstimate
    exact: dict[str, np.ndarray]
    stats: dict[str, RatioStats]

    def owners(self) -> tuple[np.ndarray, np.ndarray]:
        """(exact argmax, discriminator argmax), (M,) each."""
        return self.exact["mixture"].argmax(axis=1), self.estimate.log_ratio.argmax(axis=1)


def _compare(
    estimate: DiscriminatorEstimate, exact: dict[str, np.ndarray], saturation: float
) -> LikelihoodComparison:
    scored = {
        key: compare_log_ratios(
            estimate.log_ratio, value, logits=estimate.logits, saturation=saturation
        )
        for key, value in exact.items()
    }
    return LikelihoodComparison(estimate=estimate, exact=exact, stats=scored)


def compare_with_exact(
    estimator: object,
    X_train: object,
    X_eval: object,
    *,
    true_log_prob: object | None = None,
    settings: CompetitiveMixture | None = None,
    random_state: SeedLike = 0,
    max_time: float | None = None,
    saturation: float = 1e-3,
) -> LikelihoodComparison:
    """Train discriminators on a fitted flow mixture (:func:`discriminator_estimate`) and
    compare their estimate at ``X_eval`` (M, D) with the exact log-ratios, against the
    mixture and (with ``true_log_prob`` (M,)) against the truth."""
    # Everything cheap is checked before the discriminators train (seconds to minutes).
    exact = exact_log_ratios(estimator, X_eval, true_log_prob)
    if exact["mixture"].shape[0] < 2:
        raise ValueError("X_eval must have at least 2 rows: correlations need two points")
    _check_saturation(saturation)
    estimate = discriminator_estimate(
        estimator,
        X_train,
        X_eval,
        settings=settings,
        random_state=random_state,
        max_time=max_time,
    )
    return _compare(estimate, exact, saturation)


@dataclass
class RoundTracker:
    """``callback(estimator, round)`` for :class:`CompetitiveMixture`: estimate vs exact each round.

    Round 0 is right after pre-training. A run with discriminator assignment is judged
    by its own discriminators; any other run by fresh ones trained on ``X_train``
    (required then). Statistics are taken at ``X_eval`` against the truth when
    ``true_log_prob`` is given, else against the mixture (whose errors then include the
    model's misfit: see :func:`exact_log_ratios`).

    Attributes: ``history`` (per round: ``round`` and the means of :meth:`RatioStats.summary`),
    ``owners`` (per round: (exact argmax, discriminator argmax) at X_eval), ``seconds``
    (time spent tracking; part of the fit's wall time).
    """

    X_eval: object
    true_log_prob: np.ndarray | None = None
    X_train: object | None = None
    saturation: float = 1e-3
    random_state: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    owners: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        # Checked now, not after pre-training (when the callback first runs); kept as
        # given, so that the estimator checks a data frame's feature names.
        n_eval = check_array(self.X_eval, "X_eval", min_samples=2).shape[0]
        if self.true_log_prob is not None:
            self.true_log_prob = _check_true_log_prob(self.true_log_prob, n_eval, "X_eval")
        if self.X_train is not None:
            check_array(self.X_train, "X_train", min_samples=2)
        _check_saturation(self.saturation)
        seed = check_seed(self.random_state, "random_state")
        if seed is None:
            raise TypeError("random_state must be an int (round r uses random_state + r)")
        self.random_state = seed

    def __call__(self, estimator: CompetitiveMixture, round_: int) -> None:
        if not isinstance(estimator, CompetitiveMixture):
            raise TypeError(
                f"RoundTracker is a CompetitiveMixture callback, got {type(estimator).__name__}"
            )
        n_features = check_array(self.X_eval, "X_eval").shape[1]
        if n_features != estimator.n_features_in_:
            raise ValueError(
                f"X_eval has {n_features} features, but the tracked CompetitiveMixture is "
                f"fitting {estimator.n_features_in_}"
            )
        started = time.perf_counter()
        if estimator.model_.discriminators is not None:
            estimate = own_discriminator_estimate(estimator, self.X_eval)
        elif self.X_train is not None:
            estimate = discriminator_estimate(
                estimator, self.X_train, self.X_eval, random_state=self.random_state + round_
            )
        else:
            raise ValueError(
                "RoundTracker needs X_train to train discriminators for a run without its own"
            )
        exact = exact_log_ratios(estimator, self.X_eval, self.true_log_prob)
        result = _compare(estimate, exact, self.saturation)
        key = "truth" if "truth" in result.stats else "mixture"
        self.history.setdefault("round", []).append(round_)
        for name, value in result.stats[key].summary().items():
            self.history.setdefault(name, []).append(value)
        self.owners.append(result.owners())
        self.seconds += time.perf_counter() - started
