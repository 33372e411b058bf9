"""The abstract toy distribution: validation, seeding and everything derived from log p(x, y).

A subclass implements only ``_sample(n, rng)`` and ``_log_joint(X)``; this class
validates inputs and derives ``log_prob``, ``predict`` and ``entropy`` from them.
All densities are in nats, with respect to Lebesgue measure on R^D.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray
from scipy.special import logsumexp

from vmonf._validation import check_array, check_positive_float, check_positive_int, check_seed

__all__ = ["FloatArray", "IntArray", "ToyDistribution", "check_length"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# The lengths a toy is built from (noise, radii, scales). Below 1e-3 a density costs
# ~1e4 quadrature nodes per point (moons' log_prob of 100 points at noise 1e-4 took
# 6 min) or its own samples score -inf; far above 1e3 samples overflow.
MIN_LENGTH, MAX_LENGTH = 1e-3, 1e3
MAX_CLASSES = 1000


def check_length(value: object, name: str) -> float:
    """Return ``value`` as a float in [``MIN_LENGTH``, ``MAX_LENGTH``]."""
    value = check_positive_float(value, name)
    if not MIN_LENGTH <= value <= MAX_LENGTH:
        raise ValueError(
            f"{name} must lie in [{MIN_LENGTH:g}, {MAX_LENGTH:g}] (a toy's lengths), got {value:g}"
        )
    return value


class ToyDistribution(ABC):
    """A labelled distribution p(x, y) with a known density.

    ``y`` is the component (class) that generated ``x``; ``n_classes`` of them.
    Subclasses set ``name`` and call ``super().__init__`` with their validated
    constructor parameters.
    """

    name: ClassVar[str]
    n_features: ClassVar[int] = 2

    def __init__(self, *, n_classes: int, params: Mapping[str, object]) -> None:
        self._n_classes = n_classes
        self._params = dict(params)

    @property
    def n_classes(self) -> int:
        """Number of mixture components / classes."""
        return self._n_classes

    @property
    def params(self) -> dict[str, object]:
        """The constructor parameters (a copy)."""
        return dict(self._params)

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._params.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ public API
    def sample(self, n: int, seed: int | None = None) -> tuple[FloatArray, IntArray]:
        """Draw ``n`` points: X float64 (n, n_features) and labels y int64 (n,).

        The same integer ``seed`` always gives the same output; None draws fresh entropy.
        """
        n = check_positive_int(n, "n")
        rng = np.random.default_rng(check_seed(seed, "seed"))
        X, y = self._sample(n, rng)
        return np.ascontiguousarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)

    def log_joint(self, X: object) -> FloatArray:
        """log p(x, y=k) in nats, shape (N, n_classes); logsumexp over k is ``log_prob``."""
        return self._finite_input_log_joint(self._check_X(X))

    def log_prob(self, X: object) -> FloatArray:
        """The true log density log p(x) in nats, shape (N,)."""
        return self._log_prob(self._check_X(X))

    def predict(self, X: object) -> IntArray:
        """Bayes-optimal labels argmax_k p(y=k | x), shape (N,)."""
        return np.argmax(self.log_joint(X), axis=1).astype(np.int64)

    def entropy(self, n: int = 200_000, seed: int | None = 0) -> tuple[float, float]:
        """Monte-Carlo differential entropy -E[log p(x)] in nats: (estimate, standard error)."""
        n = check_positive_int(n, "n", minimum=2)
        X, _ = self.sample(n, seed=seed)
        log_p = self._log_prob(X)
        return float(-log_p.mean()), float(log_p.std(ddof=1) / np.sqrt(n))

    # ----------------------------------------------------------------- internals
    def _check_X(self, X: object) -> FloatArray:
        return check_array(X, "X", n_features=self.n_features)

    def _log_prob(self, X: FloatArray) -> FloatArray:
        return np.asarray(logsumexp(self._finite_input_log_joint(X), axis=1), dtype=np.float64)

    def _finite_input_log_joint(self, X: FloatArray) -> FloatArray:
        """:meth:`_log_joint`, where a NaN (a square overflowing, then inf - inf, at
        |x| ~ 1e155 or beyond) is what it stands for: density 0, log -inf."""
        with np.errstate(over="ignore", invalid="ignore"):
            log_joint = self._log_joint(X)
        return np.where(np.isnan(log_joint), -np.inf, log_joint)

    def _log_class_prior(self) -> float:
        """log p(y=k) for the uniform class weights every toy here uses."""
        return -float(np.log(self._n_classes))

    @abstractmethod
    def _sample(self, n: int, rng: np.random.Generator) -> tuple[FloatArray, IntArray]:
        """Draw (X (n, D), y (n,)) from ``rng``; inputs are already validated."""

    @abstractmethod
    def _log_joint(self, X: FloatArray) -> FloatArray:
        """log p(x, y=k), shape (N, n_classes), for a validated X."""
