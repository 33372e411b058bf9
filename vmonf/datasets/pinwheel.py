"""Pinwheel (Johnson et al. 2016) with a numerically exact density.

Class k ~ U{0..K-1}; f ~ N((1, 0), diag(radial_std^2, tangential_std^2));
theta = 2 pi k / K + rate * exp(f1); x = scale * R(theta) f. (Johnson et al.'s
``einsum('ti,tij->tj', f, R)`` applies R(-theta): their wings are the mirror image.)

The map keeps |f| = |x| / scale = r. Writing f = r (cos phi, sin phi), the output
angle is psi = 2 pi k / K + G_r(phi) with the circle map
G_r(phi) = phi + rate * exp(r cos phi), so

    p(x | k) = sum over phi with G_r(phi) = psi - 2 pi k / K (mod 2 pi) of
               N(f(phi)) / (scale^2 |G_r'(phi)|).

G_r' = 1 - rate r sin(phi) exp(r cos phi) is positive on [-pi, 0] and has at most
two zeros on (0, pi), so [-pi, pi] splits into four monotone branches
[-pi, 0], [0, a], [a, b], [b, pi]. On each branch every level
psi - 2 pi k / K + 2 pi m in its range has exactly one root, found by safeguarded
Newton to machine precision: all preimages are summed, nothing is missed.

Two far-out regimes (log p < -150 nats for the defaults) are approximated:
where a branch winds more than ``_MAX_LEVELS`` times only the levels nearest the
Gaussian's mode on that branch are summed (a lower bound made of the dominant
terms); where rate * e^r > ``_MAX_TWIST`` (float64 can no longer resolve the
output angle) the angle-averaged density (1 / 2 pi scale^2) int N(f(phi)) dphi is used.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp

from vmonf._validation import check_positive_float, check_positive_int
from vmonf.datasets._numerics import in_chunks, log_normal
from vmonf.datasets.base import MAX_CLASSES, FloatArray, IntArray, ToyDistribution, check_length

__all__ = ["Pinwheel"]

_TWO_PI = 2.0 * np.pi
_SOLVER_TOL = 4e-15  # radians: ~10 ulp of pi
_MAX_SOLVER_STEPS = 100  # Newton or bisection; bisection alone needs ~52
_MAX_LEVELS = 16  # preimages summed per monotone branch
_MAX_TWIST = 1e10  # radians of rate * e^r that float64 still resolves to ~1e-6
_POINTS_PER_BLOCK = 1024
_AVERAGE_NODES = 8192


class Pinwheel(ToyDistribution):
    """Johnson et al.'s pinwheel with ``n_classes`` spiral wings (VMoNF paper: scale 0.5)."""

    name = "pinwheel"

    def __init__(
        self,
        *,
        radial_std: float = 0.3,
        tangential_std: float = 0.05,
        n_classes: int = 5,
        rate: float = 0.25,
        scale: float = 0.5,
    ) -> None:
        radial_std = check_length(radial_std, "radial_std")
        tangential_std = check_length(tangential_std, "tangential_std")
        n_classes = check_positive_int(n_classes, "n_classes", maximum=MAX_CLASSES)
        rate = check_positive_float(rate, "rate", allow_zero=True)
        scale = check_length(scale, "scale")
        params = {
            "radial_std": radial_std,
            "tangential_std": tangential_std,
            "n_classes": n_classes,
            "rate": rate,
            "scale": scale,
        }
        super().__init__(n_classes=n_classes, params=params)
        self._std = np.array([radial_std, tangential_std])
        self._rate = rate
        self._scale = scale
        self._offsets = _TWO_PI * np.arange(self.n_classes) / self.n_classes
        self._r_max = np.log(_MAX_TWIST / self._rate) if self._rate > 0 else np.inf

    # ------------------------------------------------------------------ sampling
    def _sample(self, n: int, rng: np.random.Generator) -> tuple[FloatArray, IntArray]:
        y = rng.integers(self.n_classes, size=n)
        f = rng.standard_normal((n, 2)) * self._std + np.array([1.0, 0.0])
        # Bounded exponent: beyond r_max float64 cannot resolve the angle (exp(f1) even
        # overflowed for a wide radial_std); there, as the density does, the angle is
        # uniform. (No draw at all when no point is that far: the usual toys' samples.)
        theta = self._offsets[y] + self._rate * np.exp(np.minimum(f[:, 0], self._r_max))
        far = np.hypot(f[:, 0], f[:, 1]) > self._r_max
        theta[far] = rng.uniform(0.0, _TWO_PI, size=int(far.sum()))
        cos, sin = np.cos(theta), np.sin(theta)
        rotated = np.column_stack([cos * f[:, 0] - sin * f[:, 1], sin * f[:, 0] + cos * f[:, 1]])
        return self._scale * rotated, y

    # ------------------------------------------------------------------- density
    def _log_joint(self, X: FloatArray) -> FloatArray:
        log_joint = in_chunks(self._log_joint_block, X, _POINTS_PER_BLOCK)
        return log_joint - 2.0 * np.log(self._scale) + self._log_class_prior()

    def _log_joint_block(self, X: FloatArray) -> FloatArray:
        """log sum over preimages of N(f) / |G'| (without 1/scale^2 and 1/K), shape (N, K)."""
        r = np.hypot(X[:, 0], X[:, 1]) / self._scale
        psi = np.arctan2(X[:, 1], X[:, 0])
        out = np.empty((len(X), self.n_classes))
        far = r > self._r_max
        out[far] = self._log_angle_average(r[far])[:, None]
        near = ~far
        if near.any():
            out[near] = self._log_preimage_sum(r[near], psi[near])
        return out

    def _log_gaussian(self, r: FloatArray, phi: FloatArray) -> FloatArray:
        """log N(f; (1, 0), diag(std^2)) at f = r (cos phi, sin phi)."""
        return log_normal(r * np.cos(phi), 1.0, self._std[0]) + log_normal(
            r * np.sin(phi), 0.0, self._std[1]
        )

    def _circle_map(self, r: FloatArray, phi: FloatArray) -> tuple[FloatArray, FloatArray]:
        """G_r(phi) = phi + rate exp(r cos phi) and its derivative G_r'(phi)."""
        twist = self._rate * np.exp(r * np.cos(phi))
        return phi + twist, 1.0 - r * np.sin(phi) * twist

    def _slope_and_curvature(self, r: FloatArray, phi: FloatArray) -> tuple[FloatArray, FloatArray]:
        """G_r'(phi) and G_r''(phi) = -rate r exp(r cos phi) (cos phi - r sin^2 phi)."""
        cos, sin = np.cos(phi), np.sin(phi)
        twist = self._rate * r * np.exp(r * cos)
        return 1.0 - sin * twist, -twist * (cos - r * sin**2)

    def _branches(self, r: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Monotone branches of G_r: (lo, hi), each (N, 4); G decreases only on branch 2.

        G' is minimal on (0, pi) where cos phi = 2r / (1 + sqrt(1 + 4 r^2)); if it is
        negative there, its zeros a < peak < b bound the decreasing branch.
        """
        peak = np.arccos(2.0 * r / (1.0 + np.sqrt(1.0 + 4.0 * r**2)))
        a, b = peak.copy(), peak.copy()
        fold = self._circle_map(r, peak)[1] < 0.0
        if fold.any():
            rf, pf = r[fold], peak[fold]

            def falling_slope(p: FloatArray, idx: IntArray) -> tuple[FloatArray, FloatArray]:
                slope, curvature = self._slope_and_curvature(rf[idx], p)
                return -slope, -curvature

            def rising_slope(p: FloatArray, idx: IntArray) -> tuple[FloatArray, FloatArray]:
                return self._slope_and_curvature(rf[idx], p)

            a[fold] = _solve_increasing(falling_slope, np.zeros_like(pf), pf)
            b[fold] = _solve_increasing(rising_slope, pf, np.full_like(pf, np.pi))
        zero, pi = np.zeros_like(r), np.full_like(r, np.pi)
        return np.column_stack([-pi, zero, a, b]), np.column_stack([zero, a, b, pi])

    def _log_preimage_sum(self, r: FloatArray, psi: FloatArray) -> FloatArray:
        """log sum_phi N(f(phi)) / |G_r'(phi)| over the preimages of each class, (N, K)."""
        n, k = len(r), self.n_classes
        lo, hi = self._branches(r)  # (n, 4)
        g_lo, g_hi = self._circle_map(r[:, None], lo)[0], self._circle_map(r[:, None], hi)[0]
        target = (psi[:, None] - self._offsets)[:, :, None]  # (n, K, 1)
        # levels m with target + 2 pi m in [min G, max G) of the branch: (n, K, 4)
        first = np.ceil((np.minimum(g_lo, g_hi)[:, None, :] - target) / _TWO_PI)
        count = np.ceil((np.maximum(g_lo, g_hi)[:, None, :] - target) / _TWO_PI) - first
        self._window_levels(r, lo, hi, target, first, count)

        counts = count.astype(np.int64).ravel()
        entry = np.repeat(np.arange(counts.size), counts)  # flat (point, class, branch)
        offset = np.arange(entry.size) - np.repeat(np.cumsum(counts) - counts, counts)
        point, cls, branch = np.unravel_index(entry, count.shape)
        level_value = target[point, cls, 0] + _TWO_PI * (first.ravel()[entry] + offset)
        rr = r[point]
        direction = np.sign(g_hi - g_lo)[point, branch]

        def residual(p: FloatArray, idx: IntArray) -> tuple[FloatArray, FloatArray]:
            value, slope = self._circle_map(rr[idx], p)
            return direction[idx] * (value - level_value[idx]), direction[idx] * slope

        phi = _solve_increasing(residual, lo[point, branch], hi[point, branch])
        with np.errstate(divide="ignore"):  # an exact fold point has infinite density
            terms = self._log_gaussian(rr, phi) - np.log(np.abs(self._circle_map(rr, phi)[1]))
        return _grouped_logsumexp(terms, point * k + cls, n * k).reshape(n, k)

    def _window_levels(
        self,
        r: FloatArray,
        lo: FloatArray,
        hi: FloatArray,
        target: FloatArray,
        first: FloatArray,
        count: FloatArray,
    ) -> None:
        """In place: keep <= ``_MAX_LEVELS`` levels per branch, centred on the Gaussian's mode."""
        point, cls, branch = np.nonzero(count > _MAX_LEVELS)
        if point.size == 0:
            return
        rr = r[point]
        mode = self._branch_mode(rr, lo[point, branch], hi[point, branch])
        centre = (self._circle_map(rr, mode)[0] - target[point, cls, 0]) / _TWO_PI
        start = np.floor(centre) - _MAX_LEVELS // 2 + 1
        last_start = first[point, cls, branch] + count[point, cls, branch] - _MAX_LEVELS
        first[point, cls, branch] = np.clip(start, first[point, cls, branch], last_start)
        count[point, cls, branch] = _MAX_LEVELS

    def _branch_mode(self, r: FloatArray, lo: FloatArray, hi: FloatArray) -> FloatArray:
        """argmax of the Gaussian over phi in [lo, hi], a branch on which cos phi is monotone.

        log N is a quadratic in c = cos phi; its maximum is at an end or at the vertex.
        """
        c_lo, c_hi = np.cos(lo), np.cos(hi)
        inv_r, inv_t = self._std**-2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = -inv_r / (r * (inv_t - inv_r))
        vertex = np.where(np.isfinite(vertex), vertex, c_lo)
        vertex = np.clip(vertex, np.minimum(c_lo, c_hi), np.maximum(c_lo, c_hi))
        candidates = np.stack([c_lo, c_hi, vertex])
        sign = np.where(hi <= 0.0, -1.0, 1.0)  # branch [-pi, 0] has negative angles
        phis = sign * np.arccos(np.clip(candidates, -1.0, 1.0))
        best = np.argmax(self._log_gaussian(r, phis), axis=0)
        return np.take_along_axis(phis, best[None], axis=0)[0]

    def _log_angle_average(self, r: FloatArray) -> FloatArray:
        """log (1 / 2 pi) int N(f(phi)) dphi: the limit of the preimage sum for dense windings."""
        phi = np.linspace(-np.pi, np.pi, _AVERAGE_NODES, endpoint=False)
        log_n = self._log_gaussian(r[:, None], phi[None, :])
        return logsumexp(log_n, axis=1) - np.log(_AVERAGE_NODES)


def _solve_increasing(
    fn: Callable[[FloatArray, IntArray], tuple[FloatArray, FloatArray]],
    lo: FloatArray,
    hi: FloatArray,
) -> FloatArray:
    """Elementwise root of an increasing function bracketed by [lo, hi]: safeguarded Newton.

    ``fn(x, idx)`` returns (value, slope) at ``x`` for the elements ``idx``; a Newton
    step that leaves the shrinking bracket is replaced by bisection.
    """
    lo, hi = lo.copy(), hi.copy()
    x = 0.5 * (lo + hi)
    active = np.arange(x.size)
    for _ in range(_MAX_SOLVER_STEPS):
        xa = x[active]
        value, slope = fn(xa, active)
        below = value < 0.0
        lo[active] = la = np.where(below, xa, lo[active])
        hi[active] = ha = np.where(below, hi[active], xa)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = xa - value / slope
        new = np.where((newton >= la) & (newton <= ha), newton, 0.5 * (la + ha))
        x[active] = new
        done = (np.abs(new - xa) <= _SOLVER_TOL) | (ha - la <= _SOLVER_TOL) | (value == 0.0)
        active = active[~done]
        if active.size == 0:
            break
    return x


def _grouped_logsumexp(values: FloatArray, group: IntArray, n_groups: int) -> FloatArray:
    """logsumexp of ``values`` within each group id in [0, n_groups); empty groups give -inf."""
    peak = np.full(n_groups, -np.inf)
    np.maximum.at(peak, group, values)
    safe = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        total = np.bincount(group, weights=np.exp(values - safe[group]), minlength=n_groups)
        return np.log(total) + safe
