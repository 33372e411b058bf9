"""Concentric noisy circles: ``two_circles`` (the VMoNF author's data) and ``rings``.

Class k: r ~ N(radii[k], noise^2), angle ~ U(0, 2 pi), x = r (cos angle, sin angle).
A negative r lands at |r| in the opposite direction, so |x| follows a folded
normal and p(x | k) = [N(|x|; r_k, noise^2) + N(-|x|; r_k, noise^2)] / (2 pi |x|)
exactly (it diverges like 1/|x| at the origin, where |x| is clamped to the
smallest positive float).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vmonf.datasets._numerics import log_normal
from vmonf.datasets.base import FloatArray, IntArray, ToyDistribution, check_length

__all__ = ["RadialMixture", "Rings", "TwoCircles"]


class RadialMixture(ToyDistribution):
    """Equal-weight mixture of isotropic rings with radii ``radii`` and radial std ``noise``."""

    def __init__(self, *, radii: Sequence[float], noise: float) -> None:
        radii = _check_radii(radii)
        noise = check_length(noise, "noise")
        super().__init__(n_classes=len(radii), params={"radii": radii, "noise": noise})
        self._radii = np.array(radii)
        self._noise = noise

    def _sample(self, n: int, rng: np.random.Generator) -> tuple[FloatArray, IntArray]:
        y = rng.integers(self.n_classes, size=n)
        r = self._radii[y] + self._noise * rng.standard_normal(n)
        angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
        return r[:, None] * np.column_stack([np.cos(angle), np.sin(angle)]), y

    def _log_joint(self, X: FloatArray) -> FloatArray:
        rho = np.maximum(np.hypot(X[:, 0], X[:, 1]), np.finfo(np.float64).tiny)[:, None]
        log_radial = np.logaddexp(
            log_normal(rho, self._radii, self._noise),
            log_normal(-rho, self._radii, self._noise),
        )
        return log_radial - np.log(2.0 * np.pi * rho) + self._log_class_prior()


def _check_radii(radii: object) -> tuple[float, ...]:
    if isinstance(radii, str) or not isinstance(radii, Sequence | np.ndarray):
        raise TypeError(
            f"radii must be a sequence of numbers, got {type(radii).__name__} (one radius: "
            "radii=(0.5,), or radii=0.5, on the command line)"
        )
    if len(radii) == 0:
        raise ValueError("radii must hold at least one radius")
    return tuple(check_length(r, f"radii[{i}]") for i, r in enumerate(radii))


class TwoCircles(RadialMixture):
    """The VMoNF paper's two circles: radii (0.8, 0.4), radial noise 0.005."""

    name = "two_circles"

    def __init__(self, *, radii: Sequence[float] = (0.8, 0.4), noise: float = 0.005) -> None:
        super().__init__(radii=radii, noise=noise)


class Rings(RadialMixture):
    """Four rings, radii (0.5, 1.0, 1.5, 2.0), radial noise 0.08 (gaps of 6.25 std)."""

    name = "rings"

    def __init__(
        self, *, radii: Sequence[float] = (0.5, 1.0, 1.5, 2.0), noise: float = 0.08
    ) -> None:
        super().__init__(radii=radii, noise=noise)
