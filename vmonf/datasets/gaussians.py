"""Isotropic Gaussian mixtures: ``eight_gaussians`` and Locatello et al.'s ``skewed_gmm``.

Both share one sampler and one exact log density; ``skewed_gmm`` adds a
volume-preserving warp x2 <- x2 + 0.04 x1^2 - 4, so its density is the mixture
density at the un-warped point (unit Jacobian).
"""

from __future__ import annotations

import itertools

import numpy as np

from vmonf._validation import check_positive_int
from vmonf.datasets._numerics import log_isotropic_normal
from vmonf.datasets.base import FloatArray, IntArray, ToyDistribution, check_length

__all__ = [
    "EightGaussians",
    "IsotropicGaussianMixture",
    "SkewedGMM",
    "skewed_gmm_means",
    "skewed_gmm_variance",
]

SKEWED_GMM_MODES = (3, 5, 6, 9)
_SKEW_CURVATURE = 0.04  # x2 <- x2 + 0.04 x1^2 - 4
_SKEW_SHIFT = -4.0


class IsotropicGaussianMixture(ToyDistribution):
    """Equal-weight mixture of N(mean_k, std^2 I), optionally seen through a warp.

    Subclasses may override ``_warp``/``_unwarp`` with a volume-preserving map
    (unit Jacobian determinant); the density is then p_gmm(unwarp(x)).
    """

    def __init__(self, *, means: FloatArray, std: float, params: dict[str, object]) -> None:
        super().__init__(n_classes=len(means), params=params)
        self._means = np.asarray(means, dtype=np.float64)
        self._std = std

    @property
    def means(self) -> FloatArray:
        """Component means before any warp, shape (n_classes, 2)."""
        return self._means.copy()

    @property
    def std(self) -> float:
        """Standard deviation of every coordinate of every component."""
        return self._std

    def _warp(self, Z: FloatArray) -> FloatArray:
        return Z

    def _unwarp(self, X: FloatArray) -> FloatArray:
        return X

    def _sample(self, n: int, rng: np.random.Generator) -> tuple[FloatArray, IntArray]:
        y = rng.integers(self.n_classes, size=n)
        Z = self._means[y] + self._std * rng.standard_normal((n, self.n_features))
        return self._warp(Z), y

    def _log_joint(self, X: FloatArray) -> FloatArray:
        return log_isotropic_normal(self._unwarp(X), self._means, self._std) + (
            self._log_class_prior()
        )


class EightGaussians(IsotropicGaussianMixture):
    """Eight N(mu_k, noise^2 I) at angles 2 pi k / 8 on a circle of ``radius``.

    Defaults: radius 2, noise (std) 0.2 — well separated (chord 1.53 = 7.7 std).
    """

    name = "eight_gaussians"

    def __init__(self, *, radius: float = 2.0, noise: float = 0.2) -> None:
        radius = check_length(radius, "radius")
        noise = check_length(noise, "noise")
        angles = 2.0 * np.pi * np.arange(8) / 8.0
        means = radius * np.column_stack([np.cos(angles), np.sin(angles)])
        super().__init__(means=means, std=noise, params={"radius": radius, "noise": noise})


def skewed_gmm_means(n_modes: int) -> FloatArray:
    """Locatello et al.'s mode means, shape (n_modes, 2), before the warp.

    9 modes: the grid {-10, 0, 10}^2; otherwise the first ``n_modes`` rows of
    ``1.5 * RandomState(821).uniform(-16, 16, (6, 2))`` (the authors' generator).
    """
    n_modes = _check_n_modes(n_modes)
    if n_modes == 9:
        return np.array(list(itertools.product((-10.0, 0.0, 10.0), repeat=2)))
    return 1.5 * np.random.RandomState(821).uniform(-16.0, 16.0, size=(6, 2))[:n_modes]


def skewed_gmm_variance(n_modes: int) -> float:
    """Per-coordinate variance 15 / f(M): f(3)=8, f(5)=10, f(M>=6)=3 M^2."""
    n_modes = _check_n_modes(n_modes)
    factor = {3: 8.0, 5: 10.0}.get(n_modes, 3.0 * n_modes**2)
    return 15.0 / factor


def _check_n_modes(n_modes: object) -> int:
    n_modes = check_positive_int(n_modes, "n_modes")
    if n_modes not in SKEWED_GMM_MODES:
        raise ValueError(f"n_modes must be one of {SKEWED_GMM_MODES}, got {n_modes}")
    return n_modes


class SkewedGMM(IsotropicGaussianMixture):
    """Locatello et al. (2018) synthetic data: a GMM bent by x2 <- x2 + 0.04 x1^2 - 4.

    True entropies: 4.564 / 4.825 / 2.654 / 2.249 nats for 3 / 5 / 6 / 9 modes.
    """

    name = "skewed_gmm"

    def __init__(self, *, n_modes: int = 3) -> None:
        n_modes = _check_n_modes(n_modes)
        super().__init__(
            means=skewed_gmm_means(n_modes),
            std=float(np.sqrt(skewed_gmm_variance(n_modes))),
            params={"n_modes": n_modes},
        )

    def _warp(self, Z: FloatArray) -> FloatArray:
        return np.column_stack([Z[:, 0], Z[:, 1] + _SKEW_CURVATURE * Z[:, 0] ** 2 + _SKEW_SHIFT])

    def _unwarp(self, X: FloatArray) -> FloatArray:
        return np.column_stack([X[:, 0], X[:, 1] - _SKEW_CURVATURE * X[:, 0] ** 2 - _SKEW_SHIFT])
