"""Two interleaving half circles (scikit-learn's ``make_moons``) with an exact density.

Class 0: (cos t, sin t); class 1: (1 - cos t, 0.5 - sin t); t ~ U(0, pi); plus
isotropic N(0, noise^2 I). p(x | k) = (1/pi) int_0^pi N(x; c_k(t), noise^2 I) dt is
computed by Gauss-Legendre quadrature in t with ~4 pi / noise nodes (the
integrand is a bump of width about noise, as the arcs have unit speed):
converged to ~1e-9 nats within two units of the arcs.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.special import logsumexp, roots_legendre

from vmonf.datasets._numerics import in_chunks, log_isotropic_normal
from vmonf.datasets.base import FloatArray, IntArray, ToyDistribution, check_length

__all__ = ["Moons", "moons_arcs", "moons_log_density", "moons_n_nodes"]

_NODES_PER_STD = 4.0
_MIN_NODES = 32
_MAX_ENTRIES = 2**22  # points x nodes evaluated at once


def moons_arcs(t: FloatArray) -> FloatArray:
    """Noise-free points on both arcs at parameters ``t`` (T,): shape (2, T, 2)."""
    cos, sin = np.cos(t), np.sin(t)
    return np.stack([np.column_stack([cos, sin]), np.column_stack([1.0 - cos, 0.5 - sin])])


def moons_n_nodes(noise: float) -> int:
    """Number of quadrature nodes used for a given ``noise``."""
    return max(_MIN_NODES, int(np.ceil(_NODES_PER_STD * np.pi / noise)))


@functools.lru_cache(maxsize=8)
def _arc_nodes(n_nodes: int) -> tuple[FloatArray, FloatArray]:
    """Gauss-Legendre nodes on both arcs (2 * n_nodes, 2) and their log weights (2 * n_nodes,)."""
    u, w = roots_legendre(n_nodes)
    centres = moons_arcs(0.5 * np.pi * (u + 1.0)).reshape(2 * n_nodes, 2)
    # (1/pi) * (pi/2) sum_j w_j N(x; c(t_j)) = sum_j (w_j / 2) N(x; c(t_j))
    return centres, np.tile(np.log(w / 2.0), 2)


def moons_log_density(X: FloatArray, noise: float, n_nodes: int) -> FloatArray:
    """log p(x | k) in nats for both moons, shape (N, 2), with ``n_nodes`` quadrature nodes."""
    centres, log_w = _arc_nodes(n_nodes)

    def block(Xb: FloatArray) -> FloatArray:
        log_terms = log_isotropic_normal(Xb, centres, noise) + log_w
        return logsumexp(log_terms.reshape(len(Xb), 2, n_nodes), axis=2)

    return in_chunks(block, X, max(1, _MAX_ENTRIES // (2 * n_nodes)))


class Moons(ToyDistribution):
    """scikit-learn-style two moons with Gaussian noise of std ``noise`` (default 0.1)."""

    name = "moons"

    def __init__(self, *, noise: float = 0.1) -> None:
        noise = check_length(noise, "noise")
        super().__init__(n_classes=2, params={"noise": noise})
        self._noise = noise
        self._n_nodes = moons_n_nodes(noise)

    def _sample(self, n: int, rng: np.random.Generator) -> tuple[FloatArray, IntArray]:
        y = rng.integers(2, size=n)
        t = rng.uniform(0.0, np.pi, size=n)
        X = moons_arcs(t)[y, np.arange(n)] + self._noise * rng.standard_normal((n, 2))
        return X, y

    def _log_joint(self, X: FloatArray) -> FloatArray:
        return moons_log_density(X, self._noise, self._n_nodes) + self._log_class_prior()
