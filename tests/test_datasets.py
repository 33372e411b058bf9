"""Tests for vmonf.datasets: the toys' true densities, samplers and input validation."""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.datasets import make_moons

from vmonf import datasets
from vmonf.datasets.gaussians import skewed_gmm_means, skewed_gmm_variance
from vmonf.datasets.moons import moons_arcs, moons_log_density, moons_n_nodes

# (toy name, parameters, minimum accuracy of predict on own samples)
CASES = {
    "pinwheel": ("pinwheel", {}, 0.98),
    "pinwheel_rate0.4": ("pinwheel", {"rate": 0.4, "n_classes": 3}, 0.98),
    "pinwheel_folded": ("pinwheel", {"tangential_std": 0.3, "rate": 0.6}, 0.9),
    "two_circles_wide": ("two_circles", {"noise": 0.05}, 0.99),
    "rings": ("rings", {}, 0.99),
    "moons": ("moons", {}, 0.99),
    "eight_gaussians": ("eight_gaussians", {}, 0.99),
    "skewed_gmm_3": ("skewed_gmm", {"n_modes": 3}, 0.99),
    "skewed_gmm_5": ("skewed_gmm", {"n_modes": 5}, 0.97),
    "skewed_gmm_9": ("skewed_gmm", {"n_modes": 9}, 0.99),
}
# The folded pinwheel has integrable 1/sqrt singularities along caustics: grid sums of
# its density converge slowly, so it gets a looser integral check, no histogram check,
# and a pointwise check at points with several preimages instead.
INTEGRAL_TOL = {"pinwheel_folded": 0.02}
SMOOTH_CASES = sorted(set(CASES) - {"pinwheel_folded"})
BINS, SUB = 40, 8  # histogram bins per axis, grid cells per bin and axis


def make_toy(case: str) -> datasets.ToyDistribution:
    name, params, _ = CASES[case]
    return datasets.toy(name, **params)


@functools.cache
def grid_density(case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probability mass p(centre) * area of each cell of a (BINS*SUB)^2 grid covering the
    samples, with the grid's x and y edges: (edges_x, edges_y, mass)."""
    toy = make_toy(case)
    X, _ = toy.sample(20_000, seed=123)
    lo, hi = X.min(axis=0), X.max(axis=0)
    lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
    n = BINS * SUB
    edges = [np.linspace(lo[d], hi[d], n + 1) for d in range(2)]
    centres = [0.5 * (e[1:] + e[:-1]) for e in edges]
    gx, gy = np.meshgrid(*centres, indexing="ij")
    p = np.exp(toy.log_prob(np.column_stack([gx.ravel(), gy.ravel()]))).reshape(n, n)
    area = (edges[0][1] - edges[0][0]) * (edges[1][1] - edges[1][0])
    return edges[0], edges[1], p * area


# ----------------------------------------------------------------------------- registry
def test_available_toys_and_registry():
    names = datasets.available_toys()
    assert names == sorted(
        ["pinwheel", "two_circles", "rings", "moons", "eight_gaussians", "skewed_gmm"]
    )
    for name in names:
        toy = datasets.toy(name)
        assert isinstance(toy, datasets.TOYS[name])
        assert isinstance(toy, datasets.ToyDistribution)
        assert toy.name == name
        assert toy.n_features == 2
        assert repr(toy).startswith(type(toy).__name__ + "(")


def test_params_and_repr():
    toy = datasets.toy("pinwheel", n_classes=3)
    assert toy.n_classes == 3
    assert toy.params == {
        "radial_std": 0.3,
        "tangential_std": 0.05,
        "n_classes": 3,
        "rate": 0.25,
        "scale": 0.5,
    }
    toy.params["n_classes"] = 7  # a copy
    assert toy.n_classes == 3 and toy.params["n_classes"] == 3
    assert "n_classes=3" in repr(toy)
    rings = datasets.toy("rings", radii=[1, 2])
    assert rings.n_classes == 2 and rings.params["radii"] == (1.0, 2.0)
    assert datasets.toy("skewed_gmm", n_modes=9).n_classes == 9


# ------------------------------------------------------------------------------ density
@pytest.mark.parametrize("case", sorted(CASES))
def test_density_integrates_to_one(case):
    _, _, mass = grid_density(case)
    assert mass.sum() == pytest.approx(1.0, abs=INTEGRAL_TOL.get(case, 0.005))


@pytest.mark.parametrize("case", SMOOTH_CASES)
def test_density_matches_histogram_of_samples(case):
    ex, ey, mass = grid_density(case)
    n = 100_000
    X, _ = make_toy(case).sample(n, seed=7)
    observed, _, _ = np.histogram2d(X[:, 0], X[:, 1], bins=[ex[::SUB], ey[::SUB]])
    expected = n * mass.reshape(BINS, SUB, BINS, SUB).sum(axis=(1, 3))
    full = expected > 50
    assert full.sum() >= 20
    chi2_per_bin = ((observed[full] - expected[full]) ** 2 / expected[full]).mean()
    assert chi2_per_bin < 1.5, chi2_per_bin


@pytest.mark.parametrize("case", sorted(CASES))
def test_log_joint_predict_and_shapes(case):
    toy = make_toy(case)
    X, y = toy.sample(5_000, seed=1)
    assert X.dtype == np.float64 and X.shape == (5_000, 2)
    assert y.dtype == np.int64 and y.shape == (5_000,)
    assert set(np.unique(y)) == set(range(toy.n_classes))
    log_joint = toy.log_joint(X)
    log_p = toy.log_prob(X)
    assert log_joint.shape == (5_000, toy.n_classes) and log_p.shape == (5_000,)
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(logsumexp(log_joint, axis=1), log_p, rtol=0, atol=1e-10)
    predicted = toy.predict(X)
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, log_joint.argmax(axis=1))
    assert (predicted == y).mean() >= CASES[case][2]


def test_entropy_matches_mean_log_prob():
    toy = datasets.toy("eight_gaussians")
    estimate, se = toy.entropy(n=50_000, seed=3)
    X, _ = toy.sample(50_000, seed=3)
    assert estimate == pytest.approx(-toy.log_prob(X).mean())
    assert 0 < se < 0.01
    # well separated: log 8 + entropy of N(0, 0.2^2 I)
    exact = np.log(8) + 1 + np.log(2 * np.pi * 0.2**2)
    assert abs(estimate - exact) < 4 * se


# ------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("name", datasets.available_toys())
def test_seeding(name):
    toy = datasets.toy(name)
    X1, y1 = toy.sample(100, seed=5)
    X2, y2 = toy.sample(100, seed=5)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    X3, _ = toy.sample(100, seed=6)
    assert not np.allclose(X1, X3)
    X4, _ = toy.sample(100)
    X5, _ = toy.sample(100)
    assert not np.allclose(X4, X5)


# -------------------------------------------------------------------------- skewed GMM
@pytest.mark.parametrize(("n_modes", "entropy"), [(3, 4.564), (5, 4.825), (6, 2.654), (9, 2.249)])
def test_skewed_gmm_entropy(n_modes, entropy):
    estimate, se = datasets.toy("skewed_gmm", n_modes=n_modes).entropy(n=500_000, seed=0)
    assert se < 0.002
    assert estimate == pytest.approx(entropy, abs=0.005)


def test_skewed_gmm_means_and_variance():
    listed = np.array(
        [
            [0.585, -2.994],
            [11.283, 14.151],
            [-17.361, -11.344],
            [-20.192, -15.205],
            [11.610, -8.611],
            [-1.522, -20.925],
        ]
    )
    for m in (3, 5, 6):
        np.testing.assert_allclose(skewed_gmm_means(m), listed[:m], atol=6e-4)
    grid = skewed_gmm_means(9)
    assert sorted(map(tuple, grid.tolist())) == [
        (a, b) for a in (-10.0, 0.0, 10.0) for b in (-10.0, 0.0, 10.0)
    ]
    expected = {3: 1.875, 5: 1.5, 6: 15 / 108, 9: 15 / 243}
    for m, var in expected.items():
        assert skewed_gmm_variance(m) == pytest.approx(var)
        assert datasets.toy("skewed_gmm", n_modes=m).std ** 2 == pytest.approx(var)


def test_skewed_gmm_warp_has_unit_jacobian():
    toy = datasets.toy("skewed_gmm", n_modes=3)
    X = np.array([[0.0, -4.0], [3.0, 1.0], [-7.0, 2.0]])
    z = np.column_stack([X[:, 0], X[:, 1] - 0.04 * X[:, 0] ** 2 + 4.0])
    var = skewed_gmm_variance(3)
    direct = np.log(
        np.mean(
            [np.prod(norm.pdf(z, mean, np.sqrt(var)), axis=1) for mean in skewed_gmm_means(3)],
            axis=0,
        )
    )
    np.testing.assert_allclose(toy.log_prob(X), direct, rtol=1e-12)


# ---------------------------------------------------------------------------- pinwheel
def brute_force_pinwheel(toy, x, n_grid=2**20):
    """log p(x, y=k) and the number of preimages per class, by a dense angle grid.

    Roots are sign changes of the wrapped angle residual, refined linearly; |G'| by
    finite differences. Independent of the package's branch-and-Newton solver.
    """
    p = toy.params
    K, rate, scale = p["n_classes"], p["rate"], p["scale"]
    r, psi = np.hypot(*x) / scale, np.arctan2(x[1], x[0])
    phi = np.linspace(-np.pi, np.pi, n_grid + 1)
    G = phi + rate * np.exp(r * np.cos(phi))
    slope = np.diff(G) / np.diff(phi)
    log_joint, n_roots = [], []
    for k in range(K):
        h = np.mod(G + 2 * np.pi * k / K - psi + np.pi, 2 * np.pi) - np.pi  # in [-pi, pi)
        cross = np.nonzero((np.sign(h[:-1]) != np.sign(h[1:])) & (np.abs(np.diff(h)) < 1))[0]
        root = phi[cross] + h[cross] / (h[cross] - h[cross + 1]) * (phi[1] - phi[0])
        dens = norm.pdf(r * np.cos(root), 1, p["radial_std"])
        dens *= norm.pdf(r * np.sin(root), 0, p["tangential_std"])
        log_joint.append(np.log(np.sum(dens / np.abs(slope[cross])) / (scale**2 * K)))
        n_roots.append(cross.size)
    return np.array(log_joint), np.array(n_roots)


@pytest.mark.parametrize("params", [{}, {"rate": 0.4, "n_classes": 3}])
def test_pinwheel_density_matches_brute_force(params):
    toy = datasets.toy("pinwheel", **params)
    X, _ = toy.sample(8, seed=11)
    X = np.vstack([X, [[0.3, 0.1], [-0.6, 0.4], [0.0, 0.0], [1e-3, -2e-3]]])
    log_joint = toy.log_joint(X)
    reference = np.array([brute_force_pinwheel(toy, x, n_grid=2**18)[0] for x in X])
    relevant = reference > -50  # the brute force loses digits in far tails
    assert relevant.sum() >= len(X)
    np.testing.assert_allclose(log_joint[relevant], reference[relevant], rtol=0, atol=1e-3)


def test_pinwheel_multiple_preimages():
    """Where the circle map folds, all (here three) preimages are summed."""
    toy = datasets.toy("pinwheel", tangential_std=0.3, rate=0.6)
    X = np.array([[-0.032, -0.602], [0.302, 0.563], [0.009, -0.6], [1.0, 0.45]])
    log_joint = toy.log_joint(X)
    for x, row in zip(X, log_joint, strict=True):
        reference, n_roots = brute_force_pinwheel(toy, x, n_grid=2**20)
        assert n_roots.max() == 3
        np.testing.assert_allclose(row, reference, rtol=0, atol=1e-4)
    assert log_joint[:3].max(axis=1).min() > 0.0  # high-density points


def test_pinwheel_far_points_are_finite_and_fast():
    toy = datasets.toy("pinwheel")
    far = np.array([[3.0, 0.0], [0.0, -5.0], [20.0, 20.0], [1e4, 0.0]])
    log_p = toy.log_prob(far)
    assert np.all(np.isfinite(log_p)) and np.all(np.diff(log_p) < 0)
    X, _ = toy.sample(10_000, seed=0)
    start = time.perf_counter()
    toy.log_prob(X)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", datasets.available_toys())
def test_log_density_is_minus_inf_far_beyond_overflow_never_nan(name):
    toy = datasets.toy(name)
    huge = np.array([[1e155, 0.0], [1.7e308, -1.7e308], [0.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        log_p, log_joint = toy.log_prob(huge), toy.log_joint(huge)
    assert not np.isnan(log_p).any() and not np.isnan(log_joint).any()
    assert np.all(log_p[:2] == -np.inf) or np.all(log_p[:2] < -1e300)


# --------------------------------------------------------------------- circles and moons
def test_two_circles_default_density():
    toy = datasets.toy("two_circles")
    # 2-D grid fine enough for eps = 0.005 (cell 0.4 eps)
    g = np.arange(-0.85, 0.85, 0.002) + 0.001
    gx, gy = np.meshgrid(g, g)
    p = np.exp(toy.log_prob(np.column_stack([gx.ravel(), gy.ravel()])))
    assert p.sum() * 0.002**2 == pytest.approx(1.0, abs=0.005)
    # isotropy, and the radial density 2 pi rho p(rho) against a histogram of |x|
    angles = np.linspace(0, 2 * np.pi, 7)
    on_circle = 0.803 * np.column_stack([np.cos(angles), np.sin(angles)])
    np.testing.assert_allclose(toy.log_prob(on_circle), toy.log_prob(on_circle[:1])[0])
    X, y = toy.sample(200_000, seed=2)
    rho = np.hypot(X[:, 0], X[:, 1])
    counts, edges = np.histogram(rho, bins=np.linspace(0.37, 0.83, 185))
    mid = np.linspace(edges[0], edges[-1], 20 * (len(edges) - 1) + 1)
    radial = 2 * np.pi * mid * np.exp(toy.log_prob(np.column_stack([mid, 0 * mid])))
    cdf = np.concatenate([[0], np.cumsum(0.5 * (radial[1:] + radial[:-1]) * np.diff(mid))])
    expected = len(rho) * np.diff(cdf[::20])
    full = expected > 50
    assert ((counts[full] - expected[full]) ** 2 / expected[full]).mean() < 1.5
    assert (toy.predict(X) == y).mean() == 1.0


def test_two_circles_negative_radius_folds():
    """Negative draws of r land at |r|: the radial density keeps all its mass."""
    toy = datasets.toy("two_circles", radii=(0.05,), noise=0.1)
    h = 1e-4
    rho = np.arange(0.5 * h, 1.5, h)
    radial = 2 * np.pi * rho * np.exp(toy.log_prob(np.column_stack([rho, 0 * rho])))
    assert radial.sum() * h == pytest.approx(1.0, abs=1e-6)
    X, _ = toy.sample(100_000, seed=0)
    counts, edges = np.histogram(np.hypot(X[:, 0], X[:, 1]), bins=30, range=(0, 0.3))
    folded_cdf = norm.cdf(edges, 0.05, 0.1) - norm.cdf(-edges, 0.05, 0.1)
    expected = len(X) * np.diff(folded_cdf)
    assert ((counts - expected) ** 2 / expected).mean() < 1.5


@pytest.mark.parametrize("noise", [0.1, 0.03])
def test_moons_quadrature_converged(noise):
    g = np.linspace(-1.5, 2.5, 41)
    X = np.stack(np.meshgrid(g, np.linspace(-1, 1.5, 26)), axis=-1).reshape(-1, 2)
    n = moons_n_nodes(noise)
    used = moons_log_density(X, noise, n)
    reference = moons_log_density(X, noise, 4 * n)
    assert np.max(np.abs(used - reference)) < 1e-4


# ------------------------------------------------------------------------- bad input
def test_bad_toy_name_and_parameters():
    with pytest.raises(ValueError, match="unknown toy 'nope'"):
        datasets.toy("nope")
    with pytest.raises(TypeError, match="toy name must be a string"):
        datasets.toy(3)
    with pytest.raises(TypeError, match=r"unknown parameter.*colour"):
        datasets.toy("pinwheel", colour="red")
    with pytest.raises(TypeError, match=r"unknown parameter.*n_modes"):
        datasets.toy("pinwheel", n_modes=3)


@pytest.mark.parametrize(
    ("name", "params", "error", "match"),
    [
        ("pinwheel", {"radial_std": -0.3}, ValueError, "radial_std"),
        ("pinwheel", {"tangential_std": 0.0}, ValueError, "tangential_std"),
        ("pinwheel", {"n_classes": 0}, ValueError, "n_classes must be >= 1"),
        ("pinwheel", {"n_classes": 2.5}, TypeError, "n_classes must be an integer"),
        ("pinwheel", {"rate": -1.0}, ValueError, "rate"),
        ("pinwheel", {"scale": float("nan")}, ValueError, "scale"),
        ("skewed_gmm", {"n_modes": 4}, ValueError, r"n_modes must be one of \(3, 5, 6, 9\)"),
        ("skewed_gmm", {"n_modes": "3"}, TypeError, "n_modes"),
        ("two_circles", {"noise": -0.1}, ValueError, "noise"),
        ("two_circles", {"radii": ()}, ValueError, "radii"),
        ("rings", {"radii": (1.0, -2.0)}, ValueError, r"radii\[1\]"),
        ("rings", {"radii": 1.0}, TypeError, "radii"),
        ("moons", {"noise": 0}, ValueError, "noise"),
        ("eight_gaussians", {"radius": -2}, ValueError, "radius"),
        # Lengths outside [1e-3, 1e3]: minutes per density, or samples scoring -inf.
        ("moons", {"noise": 1e-4}, ValueError, r"noise must lie in \[0.001, 1000\]"),
        ("pinwheel", {"radial_std": 1e30}, ValueError, "radial_std must lie in"),
        ("pinwheel", {"scale": 1e4}, ValueError, "scale must lie in"),
        ("pinwheel", {"n_classes": 10**6}, ValueError, "n_classes must be <= 1000"),
        ("eight_gaussians", {"noise": 1e-170}, ValueError, "noise must lie in"),
        ("rings", {"radii": (1.0, 1e200)}, ValueError, r"radii\[1\] must lie in"),
        ("two_circles", {"noise": 5e3}, ValueError, "noise must lie in"),
    ],
)
def test_bad_parameter_values(name, params, error, match):
    with pytest.raises(error, match=match):
        datasets.toy(name, **params)


@pytest.mark.parametrize("method", ["log_prob", "log_joint", "predict"])
def test_bad_X(method):
    fn = getattr(datasets.toy("moons"), method)
    with pytest.raises(ValueError, match="NaN"):
        fn(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros(4))
    with pytest.raises(ValueError, match="3 features, but 2 were expected"):
        fn(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="minimum of 1 is required"):
        fn(np.zeros((0, 2)))
    with pytest.raises(TypeError, match="numbers"):
        fn([["a", "b"]])


def test_bad_sample_and_entropy_arguments():
    toy = datasets.toy("rings")
    with pytest.raises(ValueError, match="n must be >= 1"):
        toy.sample(0)
    with pytest.raises(TypeError, match="n must be an integer"):
        toy.sample(2.5)
    with pytest.raises(ValueError, match=r"seed must be in \[0, "):
        toy.sample(10, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        toy.sample(10, seed="a")
    with pytest.raises(ValueError, match="n must be >= 2"):
        toy.entropy(n=1)


def test_moons_arcs_are_scikit_learns():
    """The density and the sampler share moons_arcs: only an outside reference pins it."""
    X, y = make_moons(n_samples=200, noise=0.0, shuffle=False)
    t = np.linspace(0.0, np.pi, 100)
    arcs = moons_arcs(t)
    np.testing.assert_allclose(arcs[0], X[y == 0], atol=1e-12)
    np.testing.assert_allclose(arcs[1], X[y == 1], atol=1e-12)


def test_eight_gaussians_means_sit_at_angles_2pi_k_over_8():
    toy = datasets.toy("eight_gaussians", radius=3.0)
    angles = 2 * np.pi * np.arange(8) / 8
    np.testing.assert_allclose(toy.means, 3.0 * np.column_stack([np.cos(angles), np.sin(angles)]),
                               atol=1e-12)  # fmt: skip
    # and class k is the one around mean k
    X = toy.means + 0.01
    np.testing.assert_array_equal(toy.predict(X), np.arange(8))


def test_pinwheel_with_many_windings_sums_every_preimage():
    """rate 3, wide noise: the circle map winds several times per branch and many
    preimages carry mass; all of them must be summed (the level window is only for
    far tails)."""
    toy = datasets.toy("pinwheel", rate=3.0, n_classes=3, tangential_std=0.8, radial_std=0.5)
    X, _ = toy.sample(6, seed=3)
    log_joint = toy.log_joint(X)
    reference = np.array([brute_force_pinwheel(toy, x, n_grid=2**20)[0] for x in X])
    relevant = reference > -30
    assert relevant.sum() >= 6
    np.testing.assert_allclose(log_joint[relevant], reference[relevant], rtol=0, atol=1e-3)


def test_a_wide_pinwheel_samples_finite_points():
    """radial_std=1000 lies in the accepted range, but exp(f1) overflowed: 248 NaN rows
    in 1000. Beyond r_max the angle is uniform, as the density treats it."""
    X, _ = datasets.toy("pinwheel", radial_std=1000).sample(1000, seed=0)
    assert np.isfinite(X).all()


def test_a_toy_parameter_called_name_is_reported_as_unknown():
    """It clashed with toy()'s own argument: "got multiple values for argument 'name'"."""
    with pytest.raises(TypeError, match="unknown parameter"):
        datasets.toy("moons", name="x")


def test_the_toy_name_may_be_given_by_keyword():
    """toy(name="moons") read as a missing name before ("missing 1 required positional
    argument: 'name'", though the user gave it)."""
    by_keyword = datasets.toy(name="pinwheel", n_classes=3)
    assert isinstance(by_keyword, type(datasets.toy("pinwheel")))
    assert by_keyword.n_classes == 3
    with pytest.raises(TypeError, match=r"needs a toy name; available: .*moons"):
        datasets.toy()
    with pytest.raises(TypeError, match="toy name must be a string, got int"):
        datasets.toy(name=3)
