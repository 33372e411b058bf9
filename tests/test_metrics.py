"""Tests for vmonf.metrics: likelihoods, KL, clustering scores and the KDE protocol."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from vmonf import metrics
from vmonf.metrics import (
    Estimate,
    KDEResult,
    adjusted_rand_index,
    best_matching,
    cluster_purity,
    clustering_accuracy,
    contingency_table,
    gaussian_kde_log_density,
    kde_bandwidth_grid,
    kde_log_likelihood,
    kl_to_truth,
    kl_to_truth_estimate,
    mean_log_likelihood,
    normalized_mutual_info,
)

TRUE_2D_GAUSSIAN_MEAN_LOG_DENSITY = -math.log(2 * math.pi) - 1.0  # E[log N(x; 0, I_2)]


# --------------------------------------------------------------------------- likelihoods


def test_mean_log_likelihood_basic_and_torch():
    assert mean_log_likelihood([-1.0, -2.0, -3.0]) == pytest.approx(-2.0)
    assert mean_log_likelihood(torch.tensor([-1.0, -3.0])) == pytest.approx(-2.0)
    assert isinstance(mean_log_likelihood(np.array([0.5])), float)


def test_mean_log_likelihood_of_huge_finite_values_does_not_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning included
        assert mean_log_likelihood([1e308, 1e308]) == 1e308  # the plain mean's sum was inf
        assert mean_log_likelihood([-1e308, -1e308]) == -1e308
        assert mean_log_likelihood([1e308, -1e308]) == 0.0


def test_mean_log_likelihood_minus_inf_propagates():
    assert mean_log_likelihood([-1.0, -np.inf]) == -np.inf


@pytest.mark.parametrize(
    ("values", "exc", "match"),
    [
        ([-1.0, np.nan], ValueError, "log_probs contains NaN"),
        ([-1.0, np.inf], ValueError, r"log_probs contains \+inf"),
        ([], ValueError, "log_probs is empty"),
        ([[1.0, 2.0]], ValueError, "log_probs must be 1-D"),
        (["a", "b"], TypeError, "log_probs must hold numbers"),
    ],
)
def test_mean_log_likelihood_rejects_bad_input(values, exc, match):
    with pytest.raises(exc, match=match):
        mean_log_likelihood(values)


def test_kl_to_truth_of_distribution_against_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((1000, 2))
    lp = multivariate_normal(np.zeros(2), np.eye(2)).logpdf(x)
    assert kl_to_truth(lp, lp) == 0.0
    est = kl_to_truth_estimate(lp, lp)
    assert est == Estimate(0.0, 0.0)


def test_kl_to_truth_matches_closed_form_for_shifted_gaussian():
    # KL(N(0, I) || N(mu, I)) = |mu|^2 / 2
    mu = np.array([0.5, -0.3])
    x = np.random.default_rng(1).standard_normal((20_000, 2))
    true_lp = multivariate_normal(np.zeros(2), np.eye(2)).logpdf(x)
    model_lp = multivariate_normal(mu, np.eye(2)).logpdf(x)
    est = kl_to_truth_estimate(true_lp, model_lp)
    exact = 0.5 * float(mu @ mu)
    assert 0 < est.stderr < 0.02
    assert abs(est.value - exact) < 4 * est.stderr
    assert kl_to_truth(true_lp, model_lp) == est.value
    assert float(est) == est.value
    assert est.as_dict() == {"value": est.value, "stderr": est.stderr}


def test_kl_to_truth_with_its_arguments_swapped_warns():
    """It returned a negative KL silently (e.g. -2.0 nats) for model, truth in that order."""
    x = np.random.default_rng(1).standard_normal((2000, 2))
    true_lp = multivariate_normal(np.zeros(2), np.eye(2)).logpdf(x)
    model_lp = multivariate_normal(np.array([1.0, 0.0]), np.eye(2)).logpdf(x)
    with pytest.warns(UserWarning, match="standard errors below 0.*arguments swapped"):
        assert kl_to_truth(model_lp, true_lp) < 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kl_to_truth(true_lp, model_lp) > 0
        same = kl_to_truth_estimate(true_lp, true_lp + 1e-3 * np.sin(x[:, 0]))  # noise only
        assert abs(same.value) < 4 * same.stderr


def test_kl_to_truth_is_infinite_when_model_has_zero_density():
    est = kl_to_truth_estimate([-1.0, -2.0], [-1.0, -np.inf])
    assert est.value == np.inf and est.stderr == np.inf


def test_kl_to_truth_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        kl_to_truth([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="true_log_prob contains -inf"):
        kl_to_truth([-1.0, -np.inf], [-1.0, -2.0])
    with pytest.raises(ValueError, match="model_log_prob contains NaN"):
        kl_to_truth([-1.0, -2.0], [-1.0, np.nan])


# --------------------------------------------------------------------------- clustering


def test_clustering_accuracy_perfect_relabelled_partition_is_one():
    y = np.repeat(np.arange(4), 25)
    relabel = np.array([2, 0, 3, 1])
    assert clustering_accuracy(y, relabel[y]) == 1.0
    assert best_matching(y, relabel[y]) == {2: 0, 0: 1, 3: 2, 1: 3}


def test_clustering_accuracy_is_invariant_to_label_permutation():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 4, 300))
    base = clustering_accuracy(y_true, y_pred)
    for _ in range(5):
        perm = rng.permutation(4)
        assert clustering_accuracy(y_true, perm[y_pred]) == pytest.approx(base)
        assert clustering_accuracy(perm[y_true], y_pred) == pytest.approx(base)


def test_clustering_accuracy_hand_made_example():
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [1, 1, 0, 0, 0, 0]
    # table [[1, 2], [3, 0]]: cluster 1 -> class 0 (2 points), cluster 0 -> class 1 (3 points)
    np.testing.assert_array_equal(contingency_table(y_true, y_pred), [[1, 2], [3, 0]])
    assert best_matching(y_true, y_pred) == {0: 1, 1: 0}
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(5 / 6)


def test_clustering_accuracy_with_more_clusters_than_classes():
    y_true = [0, 0, 1, 1, 1, 1]
    y_pred = [0, 1, 2, 2, 3, 3]
    # one-to-one: one of clusters 0/1 -> class 0 (1 point), one of 2/3 -> class 1 (2 points)
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(3 / 6)
    mapping = best_matching(y_true, y_pred)
    assert len(mapping) == 2
    assert sorted(mapping.values()) == [0, 1]


def test_clustering_accuracy_with_fewer_clusters_than_classes():
    y_true = [0, 1, 2, 2]
    y_pred = [0, 0, 1, 1]
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(3 / 4)
    assert best_matching(y_true, y_pred)[1] == 2


def test_contingency_table_padding_and_purity():
    y_true = [0, 0, 1, 1, 1]
    y_pred = [0, 0, 0, 2, 2]
    table = contingency_table(y_true, y_pred, n_classes=3, n_clusters=4)
    assert table.shape == (3, 4) and table.dtype == np.int64
    np.testing.assert_array_equal(table[:, 0], [2, 1, 0])
    purity = cluster_purity(y_true, y_pred)
    np.testing.assert_allclose(purity[[0, 2]], [2 / 3, 1.0])
    assert np.isnan(purity[1])  # empty cluster
    assert cluster_purity(y_true, y_pred, n_clusters=5).shape == (5,)


def test_clustering_scores_agree_with_sklearn():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 5, 400)
    y_pred = np.where(rng.random(400) < 0.6, y_true, rng.integers(0, 7, 400))
    assert adjusted_rand_index(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, y_pred))
    assert normalized_mutual_info(y_true, y_pred) == pytest.approx(
        normalized_mutual_info_score(y_true, y_pred)
    )
    assert adjusted_rand_index(torch.tensor(y_true), y_pred) == pytest.approx(
        adjusted_rand_score(y_true, y_pred)
    )


@pytest.mark.parametrize(
    ("func", "args", "exc", "match"),
    [
        (clustering_accuracy, ([0, 1], [0]), ValueError, "same length"),
        (adjusted_rand_index, ([[0, 1]], [0, 1]), ValueError, "y_true must be 1-D"),
        (normalized_mutual_info, ([0, 1], [0.5, 1.0]), TypeError, "y_pred must hold integer"),
        (contingency_table, ([0, -1], [0, 1]), ValueError, "y_true must hold non-negative"),
        (best_matching, ([0, 1], ["a", "b"]), TypeError, "y_pred must hold integer"),
        (cluster_purity, ([], []), ValueError, "y_true is empty"),
    ],
)
def test_clustering_rejects_bad_input(func, args, exc, match):
    with pytest.raises(exc, match=match):
        func(*args)


def test_contingency_table_rejects_too_small_sizes():
    with pytest.raises(ValueError, match="n_clusters=2"):
        contingency_table([0, 1, 1], [0, 1, 2], n_clusters=2)
    with pytest.raises(ValueError, match="n_classes"):
        contingency_table([0, 1, 1], [0, 1, 2], n_classes=0)


# --------------------------------------------------------------------------- KDE


def _brute_force_kde(queries: np.ndarray, centres: np.ndarray, h: float) -> np.ndarray:
    sq = ((queries[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    dim = queries.shape[1]
    return (
        logsumexp(-sq / (2 * h * h), axis=1)
        - math.log(centres.shape[0])
        - 0.5 * dim * math.log(2 * math.pi * h * h)
    )


@pytest.mark.parametrize("h", [1e-3, 0.3, 50.0])
def test_gaussian_kde_matches_brute_force_with_blocking(monkeypatch, h):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, 3)) * 4
    queries = rng.standard_normal((40, 3))
    expected = _brute_force_kde(queries, centres, h)
    np.testing.assert_allclose(gaussian_kde_log_density(queries, centres, h), expected, rtol=1e-9)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 97)  # force many small blocks
    np.testing.assert_allclose(gaussian_kde_log_density(queries, centres, h), expected, rtol=1e-9)


def test_matching_too_many_labels_is_refused_before_allocating():
    labels = np.arange(30_000)
    with pytest.raises(ValueError, match="too many to match"):
        metrics.clustering_accuracy(labels, labels[::-1].copy())


def test_kde_density_of_points_beyond_float64_distances_is_zero_not_nan():
    centres = np.random.default_rng(0).normal(size=(200, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = metrics.gaussian_kde_log_density(centres[:2] + 1e200, centres, 1.0)
    assert np.all(far == -np.inf)  # was NaN: the squared distance overflowed to inf - inf


def test_kde_protocol_scores_standard_gaussian_close_to_truth():
    rng = np.random.default_rng(0)
    generated = rng.standard_normal((5_500, 2))
    test = rng.standard_normal((1_000, 2))
    result = kde_log_likelihood(generated, test, n_select=500, n_test=500, seed=0)
    assert isinstance(result, KDEResult)
    true_mean = multivariate_normal(np.zeros(2), np.eye(2)).logpdf(test[:500]).mean()
    assert abs(result.score - true_mean) < 0.1
    assert abs(result.score - TRUE_2D_GAUSSIAN_MEAN_LOG_DENSITY) < 0.1 + 3 * result.stderr
    assert result.bandwidths.shape == (14,) and result.selection_scores.shape == (14,)
    assert result.bandwidth in result.bandwidths
    assert not result.at_grid_edge
    assert result.bandwidth == result.bandwidths[np.argmax(result.selection_scores)]
    np.testing.assert_allclose(result.bandwidths[1:] / result.bandwidths[:-1], 2.0)


def test_kde_protocol_h0_is_median_consecutive_distance_without_shuffle():
    # rows spaced 1 apart on a line: h0 = 1, so the grid is 2**(k - 7)
    generated = np.column_stack([np.arange(60.0), np.zeros(60)])
    result = kde_log_likelihood(generated, generated[:5], n_select=10, n_test=5, shuffle=False)
    np.testing.assert_allclose(result.bandwidths, 2.0 ** (np.arange(14) - 7))
    np.testing.assert_allclose(kde_bandwidth_grid(1.0), result.bandwidths)


def test_kde_protocol_is_deterministic_given_seed():
    rng = np.random.default_rng(5)
    generated = rng.standard_normal((900, 2))
    test = rng.standard_normal((50, 2))
    a = kde_log_likelihood(generated, test, n_select=200, n_test=None, seed=3)
    b = kde_log_likelihood(torch.from_numpy(generated), test, n_select=200, n_test=None, seed=3)
    assert a.score == b.score and a.bandwidth == b.bandwidth


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"generated": np.zeros((100, 2)) + np.arange(100)[:, None], "n_test": 51},
            ValueError,
            "n_test=51 but test has only 50",
        ),
        (
            {"generated": np.random.default_rng(0).standard_normal((20, 2)), "n_select": 19},
            ValueError,
            "generated needs at least n_select",
        ),
        ({"generated": np.ones((100, 2))}, ValueError, "all identical"),
        (
            {"generated": np.random.default_rng(0).standard_normal((100, 3))},
            ValueError,
            "test has 2 features",
        ),
        (
            {"generated": np.random.default_rng(0).standard_normal((100, 2)), "n_select": 0},
            ValueError,
            "n_select must be >= 1",
        ),
        (
            {"generated": np.random.default_rng(0).standard_normal((100, 2)), "seed": -1},
            ValueError,
            r"seed must be in \[0, ",
        ),
        ({"generated": np.full((100, 2), np.nan)}, ValueError, "generated contains NaN"),
    ],
)
def test_kde_protocol_rejects_bad_input(kwargs, exc, match):
    test = np.random.default_rng(1).standard_normal((50, 2))
    kwargs = {"n_select": 10, "n_test": 50, **kwargs}
    generated = kwargs.pop("generated")
    with pytest.raises(exc, match=match):
        kde_log_likelihood(generated, test, **kwargs)


def test_gaussian_kde_rejects_bad_bandwidth():
    with pytest.raises(ValueError, match="bandwidth must be finite and > 0"):
        gaussian_kde_log_density(np.zeros((2, 2)), np.zeros((3, 2)), 0.0)


def test_kde_is_translation_invariant_far_from_the_origin():
    rng = np.random.default_rng(0)
    centres, queries = rng.normal(size=(300, 2)) * 1e-3, rng.normal(size=(50, 2)) * 1e-3
    near = metrics.gaussian_kde_log_density(queries, centres, 1e-3)
    far = metrics.gaussian_kde_log_density(queries + 1e4, centres + 1e4, 1e-3)
    np.testing.assert_allclose(far, near, atol=1e-5)  # was 0.03 nats off: cancellation


def test_matching_works_for_any_label_values_and_tables_stay_bounded():
    y_true = np.array([0, 0, 7, 7, 7])
    y_pred = np.array([10**9, 10**9, 3, 3, 10**9])
    assert metrics.best_matching(y_true, y_pred) == {3: 7, 10**9: 0}
    assert metrics.clustering_accuracy(y_true, y_pred) == 0.8
    with pytest.raises(ValueError, match="number the labels"):
        metrics.contingency_table(y_true, y_pred)


def test_kde_protocol_reproduces_its_definition():
    """Without shuffling: the first M generated points are centres, the rest select the
    bandwidth, and the first n_test test points are scored."""
    rng = np.random.default_rng(7)
    generated = rng.standard_normal((300, 2)) * [1.0, 3.0]
    test = rng.standard_normal((80, 2))
    result = kde_log_likelihood(generated, test, n_select=50, n_test=30, shuffle=False)
    centres, select = generated[:250], generated[250:]
    h0 = np.median(np.linalg.norm(np.diff(centres, axis=0), axis=1))
    np.testing.assert_allclose(result.bandwidths, kde_bandwidth_grid(h0), rtol=1e-12)
    selection = [gaussian_kde_log_density(select, centres, h).mean() for h in result.bandwidths]
    np.testing.assert_allclose(result.selection_scores, selection, rtol=1e-10)
    per_point = gaussian_kde_log_density(test[:30], centres, result.bandwidth)
    assert result.score == pytest.approx(per_point.mean(), rel=1e-12)
    assert result.stderr == pytest.approx(per_point.std(ddof=1) / math.sqrt(30), rel=1e-12)


def test_kl_estimate_stderr_is_the_standard_error_of_the_mean():
    true_log_density = np.array([0.0, 1.0, 2.0, 4.0])
    estimate = kl_to_truth_estimate(true_log_density, np.zeros(4))
    assert estimate.stderr == pytest.approx(np.std(true_log_density, ddof=1) / 2.0, rel=1e-12)


def test_kde_protocol_is_scale_equivariant_and_refuses_scales_float64_cannot_hold():
    rng = np.random.default_rng(0)
    generated, test = rng.normal(size=(600, 2)), rng.normal(size=(100, 2))
    base = kde_log_likelihood(generated, test, n_test=None).score
    scaled = kde_log_likelihood(generated * 1e50, test * 1e50, n_test=None).score
    assert scaled == pytest.approx(base - 2 * np.log(1e50), rel=1e-12)  # nats of a 2-D density
    for scale in (1e200, 1e-200):  # squares over- or underflowed: NaN, -inf or "identical"
        with pytest.raises(ValueError, match="standardise generated and test first"):
            kde_log_likelihood(generated * scale, test * scale, n_test=None)
    for bandwidth in (1e-200, 1e200):
        with pytest.raises(ValueError, match=r"bandwidth must lie in \[1e-100, 1e\+100\]"):
            gaussian_kde_log_density(test, generated, bandwidth)


def test_matched_labels_name_each_class_after_its_matched_cluster():
    y_true = np.array([0, 0, 1, 1, 2, 2, 3])
    y_pred = np.array([2, 2, 0, 0, 1, 1, 1])  # class 3 shares cluster 1 with class 2
    np.testing.assert_array_equal(
        metrics.matched_labels(y_true, y_pred), [2, 2, 0, 0, 1, 1, 3]
    )  # class 3: no cluster left, a new id after the largest cluster label
    np.testing.assert_array_equal(
        metrics.matched_labels(y_true, y_pred, n_clusters=5), [2, 2, 0, 0, 1, 1, 5]
    )
    with pytest.raises(ValueError, match="n_clusters"):
        metrics.matched_labels(y_true, y_pred, n_clusters=0)
    # An n_clusters below a cluster label gave an unmatched class that cluster's id.
    np.testing.assert_array_equal(
        metrics.matched_labels([0, 0, 1, 1, 2, 2], [0, 0, 4, 4, 4, 4], n_clusters=4),
        [0, 0, 4, 4, 5, 5],
    )
