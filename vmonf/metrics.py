"""Evaluation metrics: likelihoods, KL to a known truth, clustering scores, KDE protocol.

Every function takes numpy arrays (torch tensors are converted) and returns plain
floats or numpy arrays. Log densities are natural logarithms (nats).

Clustering conventions: ``y_true`` holds class labels and ``y_pred`` cluster labels,
both 1-D integer arrays of the same length. The contingency table, matching and
purity index classes and clusters by their label *values* (so labels must be
non-negative; drop unlabelled ``-1`` points first), which keeps empty clusters
visible as zero columns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from vmonf._validation import (
    as_numpy,
    check_array,
    check_bool,
    check_integer_labels,
    check_positive_float,
    check_positive_int,
    check_real_numbers,
    check_seed,
    user_stacklevel,
)

__all__ = [
    "Estimate",
    "KDEResult",
    "adjusted_rand_index",
    "best_matching",
    "cluster_purity",
    "clustering_accuracy",
    "contingency_table",
    "gaussian_kde_log_density",
    "kde_bandwidth_grid",
    "kde_log_likelihood",
    "kl_to_truth",
    "kl_to_truth_estimate",
    "matched_labels",
    "mean_estimate",
    "mean_log_likelihood",
    "normalized_mutual_info",
]

# Largest (queries x centres) block of squared distances held at once (float64: 32 MiB).
_BLOCK_ELEMENTS = 1 << 22
MAX_TABLE_CELLS = 10**7  # a contingency table indexed by label value: 80 MB at most


# --------------------------------------------------------------------------- helpers


def _check_log_probs(values: object, name: str, *, allow_posinf: bool = False) -> np.ndarray:
    """Return per-point log densities as float64 (N,), N >= 1; NaN and (unless
    ``allow_posinf``) +inf raise, -inf is kept."""
    arr = np.asarray(as_numpy(values, name))
    check_real_numbers(arr, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n_samples,), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    arr = arr.astype(np.float64, copy=False)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN ({int(np.isnan(arr).sum())} value(s))")
    if not allow_posinf and np.isposinf(arr).any():
        raise ValueError(f"{name} contains +inf: the density is degenerate")
    return arr


def _check_label_pair(y_true: object, y_pred: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (classes, clusters) pair of equal-length integer label vectors."""
    t = check_integer_labels(y_true, "y_true")
    p = check_integer_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}"
        )
    return t, p


def _check_non_negative(y: np.ndarray, name: str) -> None:
    if (y < 0).any():
        raise ValueError(
            f"{name} must hold non-negative labels (drop unlabelled -1 points first); "
            f"found {sorted(set(y[y < 0].tolist()))[:5]}"
        )


# --------------------------------------------------------------------------- likelihoods


@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo estimate: ``value`` and its standard error (same units, e.g. nats)."""

    value: float
    stderr: float

    def __float__(self) -> float:
        return self.value

    def as_dict(self) -> dict[str, float]:
        """Return ``{"value": ..., "stderr": ...}`` (JSON-friendly)."""
        return {"value": self.value, "stderr": self.stderr}


def mean_estimate(values: object) -> Estimate:
    """Mean of values (N,) and its standard error; a non-finite mean (or N = 1) gets an
    infinite stderr. NaN values raise ``ValueError``."""
    values = _check_log_probs(values, "values", allow_posinf=True)
    mean = float(np.mean(values))
    if not math.isfinite(mean):
        return Estimate(mean, math.inf)
    n = values.shape[0]
    stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Estimate(mean, stderr)


def mean_log_likelihood(log_probs: object) -> float:
    """Mean of per-point log densities ``log_probs`` (N,), in nats.

    Returns ``-inf`` if any point has zero density; raises ``ValueError`` on NaN or +inf.
    """
    values = _check_log_probs(log_probs, "log_probs")
    with np.errstate(over="ignore"):
        mean = np.mean(values)
    if not np.isfinite(mean) and np.isfinite(values).all():  # the sum overflowed
        scale = np.abs(values).max()
        mean = np.mean(values / scale) * scale
    return float(mean)


#: Standard errors below 0 at which a KL estimate warns (chance: about 3e-5).
IMPLAUSIBLE_Z = 4.0


def kl_to_truth_estimate(true_log_prob: object, model_log_prob: object) -> Estimate:
    """Monte-Carlo estimate of KL(p_true || p_model) in nats, with its standard error.

    Both arguments are (N,) log densities (nats) evaluated at the *same* N points,
    which must be drawn from the true distribution (held out from training). The
    estimate is ``mean(true_log_prob - model_log_prob)``; it is ``+inf`` if the model
    gives zero density to any point. ``true_log_prob`` must be finite.
    """
    t = _check_log_probs(true_log_prob, "true_log_prob")
    m = _check_log_probs(model_log_prob, "model_log_prob")
    if t.shape[0] != m.shape[0]:
        raise ValueError(
            "true_log_prob and model_log_prob must have the same length, "
            f"got {t.shape[0]} and {m.shape[0]}"
        )
    if not np.isfinite(t).all():
        raise ValueError(
            "true_log_prob contains -inf: the points must be samples of the true distribution"
        )
    estimate = mean_estimate(t - m)
    if estimate.value + IMPLAUSIBLE_Z * estimate.stderr < 0:
        warnings.warn(
            f"the KL estimate is {estimate.value:.4g} nats, more than {IMPLAUSIBLE_Z:g} "
            "standard errors below 0, where a KL to the truth cannot lie: are the arguments "
            "swapped (true_log_prob first), or are the points not held-out samples of the "
            "truth?",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return estimate


def kl_to_truth(true_log_prob: object, model_log_prob: object) -> float:
    """KL(p_true || p_model) in nats: ``mean(true - model)`` over samples of the truth.

    See :func:`kl_to_truth_estimate` for the standard error and the input contract.
    """
    return kl_to_truth_estimate(true_log_prob, model_log_prob).value


# --------------------------------------------------------------------------- clustering


def adjusted_rand_index(y_true: object, y_pred: object) -> float:
    """Adjusted Rand index between classes ``y_true`` (N,) and clusters ``y_pred`` (N,)."""
    t, p = _check_label_pair(y_true, y_pred)
    return float(adjusted_rand_score(t, p))


def normalized_mutual_info(y_true: object, y_pred: object) -> float:
    """Normalised mutual information (arithmetic normalisation, as sklearn), in [0, 1]."""
    t, p = _check_label_pair(y_true, y_pred)
    return float(normalized_mutual_info_score(t, p))


def contingency_table(
    y_true: object,
    y_pred: object,
    *,
    n_classes: int | None = None,
    n_clusters: int | None = None,
) -> np.ndarray:
    """Counts (n_classes, n_clusters), int64: entry [c, k] = #points of class c in cluster k.

    Rows and columns are indexed by label value; their number defaults to the
    largest label + 1 and can be raised with ``n_classes`` / ``n_clusters``
    (e.g. to show empty clusters). Labels must be non-negative, and small enough
    that the table has at most ``MAX_TABLE_CELLS`` entries.
    """
    t, p = _non_negative_label_pair(y_true, y_pred)
    rows = int(t.max()) + 1
    cols = int(p.max()) + 1
    if n_classes is not None:
        n_classes = check_positive_int(n_classes, "n_classes")
        if n_classes < rows:
            raise ValueError(f"n_classes={n_classes} but y_true contains label {rows - 1}")
        rows = n_classes
    if n_clusters is not None:
        n_clusters = check_positive_int(n_clusters, "n_clusters")
        if n_clusters < cols:
            raise ValueError(f"n_clusters={n_clusters} but y_pred contains label {cols - 1}")
        cols = n_clusters
    if rows * cols > MAX_TABLE_CELLS:
        raise ValueError(
            f"labels up to {rows - 1} (y_true) and {cols - 1} (y_pred) would make a "
            f"{rows} x {cols} table: number the labels 0..n-1 first "
            "(np.unique(labels, return_inverse=True))"
        )
    return _count_table(t, p, (rows, cols))


def _non_negative_label_pair(y_true: object, y_pred: object) -> tuple[np.ndarray, np.ndarray]:
    t, p = _check_label_pair(y_true, y_pred)
    _check_non_negative(t, "y_true")
    _check_non_negative(p, "y_pred")
    return t, p


def _count_table(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(shape) int64 counts of the (rows[i], cols[i]) pairs."""
    table = np.zeros(shape, dtype=np.int64)
    np.add.at(table, (rows, cols), 1)
    return table


def _matched_counts(y_true: object, y_pred: object) -> tuple[dict[int, int], int, int]:
    """Hungarian matching of clusters to classes on a table of the labels present
    (any label values) -> ({cluster: class}, matched points, all points)."""
    t, p = _non_negative_label_pair(y_true, y_pred)
    classes, t_index = np.unique(t, return_inverse=True)
    clusters, p_index = np.unique(p, return_inverse=True)
    if classes.size * clusters.size > MAX_TABLE_CELLS:  # memory, and a cubic matching
        raise ValueError(
            f"{classes.size} classes and {clusters.size} clusters are too many to match "
            f"(a {classes.size} x {clusters.size} table; at most {MAX_TABLE_CELLS:g} cells)"
        )
    table = _count_table(t_index, p_index, (classes.size, clusters.size))
    rows, cols = linear_sum_assignment(table, maximize=True)
    matching = {int(clusters[k]): int(classes[c]) for c, k in zip(rows, cols, strict=True)}
    return dict(sorted(matching.items())), int(table[rows, cols].sum()), t.size


def best_matching(y_true: object, y_pred: object) -> dict[int, int]:
    """One-to-one cluster -> class map maximising the number of matched points (Hungarian).

    With more clusters than classes the surplus clusters are left out of the map;
    with more classes than clusters some classes are never the image of a cluster.
    Labels must be non-negative.
    """
    return _matched_counts(y_true, y_pred)[0]


def matched_labels(y_true: object, y_pred: object, n_clusters: int | None = None) -> np.ndarray:
    """``y_true`` (N,) with each class renamed to the cluster :func:`best_matching` matches
    it to, so that points coloured by class share their cluster's colour (int64 (N,)).

    Classes no cluster is matched to (more classes than clusters) get new ids, from
    ``n_clusters`` (the model's K: clusters no point went to keep their ids) or the
    largest cluster label + 1, whichever is larger, up, in class order.
    """
    t, p = _non_negative_label_pair(y_true, y_pred)
    matching = best_matching(t, p)  # cluster -> class
    rename = {cls: cluster for cluster, cls in matching.items()}
    start = int(p.max()) + 1  # past every cluster label, so that no id is taken twice
    if n_clusters is not None:
        start = max(start, check_positive_int(n_clusters, "n_clusters"))
    for cls in sorted(set(t.tolist()) - set(rename)):
        rename[cls] = start + len(rename) - len(matching)
    return np.array([rename[int(c)] for c in t], dtype=np.int64)


def clustering_accuracy(y_true: object, y_pred: object) -> float:
    """Fraction of points whose cluster is matched to their class by :func:`best_matching`.

    The matching is one-to-one, so points in unmatched clusters count as errors
    (when there are more clusters than classes, 1.0 is unreachable unless the
    surplus clusters are empty). Invariant to permutations of either labelling.
    """
    _, matched, total = _matched_counts(y_true, y_pred)
    return matched / total


def cluster_purity(y_true: object, y_pred: object, *, n_clusters: int | None = None) -> np.ndarray:
    """Purity per cluster (n_clusters,): share of the cluster's points in its majority class.

    Indexed by cluster label; an empty cluster has purity NaN.
    """
    table = contingency_table(y_true, y_pred, n_clusters=n_clusters)
    sizes = table.sum(axis=0)
    purity = np.full(table.shape[1], np.nan)
    filled = sizes > 0
    purity[filled] = table.max(axis=0)[filled] / sizes[filled]
    return purity


# --------------------------------------------------------------------------- KDE protocol


@dataclass(frozen=True)
class KDEResult:
    """Outcome of :func:`kde_log_likelihood` (all log densities in nats).

    Attributes:
        score: mean KDE log density of the scored test points.
        bandwidth: the chosen kernel standard deviation (data units).
        bandwidths: (14,) the bandwidth grid ``h0 * 2**(k - 7)``, k = 0..13.
        selection_scores: (14,) mean KDE log density of the selection points per bandwidth.
        stderr: standard error of ``score`` over the test points (bandwidth held fixed).
    """

    score: float
    bandwidth: float
    bandwidths: np.ndarray
    selection_scores: np.ndarray
    stderr: float

    @property
    def at_grid_edge(self) -> bool:
        """True if the chosen bandwidth is the smallest or largest on the grid."""
        return bool(self.bandwidth in (self.bandwidths[0], self.bandwidths[-1]))


def _kde_log_density_multi(
    queries: np.ndarray, centres: np.ndarray, bandwidths: np.ndarray
) -> np.ndarray:
    """Log density (H, Q) of isotropic Gaussian KDEs with H bandwidths at Q queries.

    Squared distances are computed block by block (at most ``_BLOCK_ELEMENTS``
    at once) and shared across bandwidths. Each block is reduced with the
    logsumexp trick around the block's smallest distance (shared by every
    bandwidth, so the largest term is exp(0) = 1 and nothing underflows to
    log 0); blocks are combined with ``np.logaddexp``. This is about 8x faster
    than calling ``scipy.special.logsumexp`` once per bandwidth.
    """
    # Distances are translation invariant; centring keeps |q|^2 + |c|^2 - 2 q.c from
    # cancelling away the kernel's scale for data far from the origin.
    origin = centres.mean(axis=0)
    queries, centres = queries - origin, centres - origin
    n_q, dim = queries.shape
    n_c = centres.shape[0]
    inv_two_var = 1.0 / (2.0 * bandwidths**2)  # (H,)
    log_norm = -0.5 * dim * np.log(2.0 * np.pi * bandwidths**2) - np.log(n_c)  # (H,)
    q_step = min(n_q, 1024)
    c_step = max(1, _BLOCK_ELEMENTS // q_step)
    c_sq = np.einsum("ij,ij->i", centres, centres)
    out = np.empty((bandwidths.shape[0], n_q))
    for q0 in range(0, n_q, q_step):
        q = queries[q0 : q0 + q_step]
        q_sq = np.einsum("ij,ij->i", q, q)
        acc = np.full((bandwidths.shape[0], q.shape[0]), -np.inf)
        for c0 in range(0, n_c, c_step):
            c = centres[c0 : c0 + c_step]
            with np.errstate(over="ignore", invalid="ignore"):
                sq = q_sq[:, None] + c_sq[None, c0 : c0 + c_step] - 2.0 * (q @ c.T)
            # A squared distance beyond float64 (inf - inf = NaN) is an infinite one:
            # the point's density is 0 (log -inf) in float64, not NaN.
            np.nan_to_num(sq, copy=False, nan=np.inf, posinf=np.inf)
            np.maximum(sq, 0.0, out=sq)
            nearest = sq.min(axis=1)  # (q,)
            sq -= np.where(np.isfinite(nearest), nearest, 0.0)[:, None]
            buf = np.empty_like(sq)
            for h, w in enumerate(inv_two_var):
                np.multiply(sq, -w, out=buf)
                np.exp(buf, out=buf)
                with np.errstate(divide="ignore"):
                    block = np.log(buf.sum(axis=1)) - w * nearest
                acc[h] = np.logaddexp(acc[h], block)
        out[:, q0 : q0 + q.shape[0]] = acc + log_norm[:, None]
    return out


# Kernel widths whose squares (and inverse squares) stay far inside float64's range, as
# do the squared distances between points on that scale.
MIN_BANDWIDTH, MAX_BANDWIDTH = 1e-100, 1e100


def _check_bandwidth(value: object, name: str) -> float:
    h = check_positive_float(value, name)
    if not MIN_BANDWIDTH <= h <= MAX_BANDWIDTH:
        raise ValueError(
            f"{name} must lie in [{MIN_BANDWIDTH:g}, {MAX_BANDWIDTH:g}], got {h:g}: "
            "standardise the points first"
        )
    return h


def gaussian_kde_log_density(queries: object, centres: object, bandwidth: float) -> np.ndarray:
    """Log density (Q,) in nats of an isotropic Gaussian KDE at ``queries`` (Q, D).

    ``log p(x) = logsumexp_i log N(x; centres_i, bandwidth**2 I) - log M`` for
    ``centres`` (M, D); ``bandwidth`` is the kernel standard deviation. Memory stays
    bounded for large M (computed in blocks).
    """
    c = check_array(centres, "centres")
    q = check_array(queries, "queries", n_features=c.shape[1])
    h = _check_bandwidth(bandwidth, "bandwidth")
    return _kde_log_density_multi(q, c, np.array([h]))[0]


def kde_bandwidth_grid(h0: float) -> np.ndarray:
    """The protocol's bandwidth grid (14,): ``h0 * 2**(k - 7)`` for k = 0..13."""
    h0 = check_positive_float(h0, "h0")
    with np.errstate(over="ignore", under="ignore"):  # an inf/0 end is refused below
        grid = h0 * 2.0 ** (np.arange(14) - 7)
    if not MIN_BANDWIDTH <= grid[0] <= grid[-1] <= MAX_BANDWIDTH:
        raise ValueError(
            f"h0 = {h0:g} gives a grid beyond [{MIN_BANDWIDTH:g}, {MAX_BANDWIDTH:g}]: "
            "standardise the points first"
        )
    return grid


def _gaps(points: np.ndarray) -> np.ndarray:
    """Euclidean distances (M - 1,) between consecutive rows, computed on rows scaled to
    at most 1 so that no square under- or overflows."""
    scale = float(np.abs(points).max())
    if scale == 0.0:
        return np.zeros(points.shape[0] - 1)
    return scale * np.linalg.norm(np.diff(points / scale, axis=0), axis=1)


def kde_log_likelihood(
    generated: object,
    test: object,
    *,
    n_select: int = 500,
    n_test: int | None = 500,
    seed: int | None = 0,
    shuffle: bool = True,
) -> KDEResult:
    """Locatello et al. (2018) protocol: log-likelihood of real data under a KDE of samples.

    Split of ``generated`` (M, D): its rows are first permuted with ``seed`` (unless
    ``shuffle=False``; sample order often carries meaning, e.g. grouped by
    component); then the last ``n_select`` rows are the *selection* points and
    all rows before them are the KDE *centres*.

    1. ``h0`` = median Euclidean distance between consecutive centre rows
       (rows i and i+1); if that median is 0 (many duplicates) the median of the
       positive distances is used.
    2. Grid ``h0 * 2**(k - 7)``, k = 0..13; the bandwidth maximising the mean
       KDE log density of the selection points is chosen.
    3. ``score`` = mean KDE log density (nats) of the first ``n_test`` rows of
       ``test`` (all rows if ``n_test`` is None); no shuffling of ``test``.

    The kernel is an isotropic Gaussian with standard deviation equal to the bandwidth.
    """
    g = check_array(generated, "generated")
    t = check_array(test, "test", n_features=g.shape[1])
    n_select = check_positive_int(n_select, "n_select")
    if n_test is not None:
        n_test = check_positive_int(n_test, "n_test")
        if n_test > t.shape[0]:
            raise ValueError(
                f"n_test={n_test} but test has only {t.shape[0]} rows "
                "(lower n_test or pass n_test=None to use all rows)"
            )
        t = t[:n_test]
    seed = check_seed(seed, "seed")
    if g.shape[0] < n_select + 2:
        raise ValueError(
            f"generated needs at least n_select + 2 = {n_select + 2} rows "
            f"(n_select selection points + at least 2 KDE centres), got {g.shape[0]}"
        )
    if check_bool(shuffle, "shuffle"):
        g = g[np.random.default_rng(seed).permutation(g.shape[0])]
    centres, select = g[: g.shape[0] - n_select], g[g.shape[0] - n_select :]

    gaps = _gaps(centres)
    h0 = float(np.median(gaps))
    if h0 <= 0.0:
        positive = gaps[gaps > 0]
        if positive.size == 0:
            raise ValueError("generated points are all identical: no KDE bandwidth can be set")
        h0 = float(np.median(positive))
    try:
        bandwidths = kde_bandwidth_grid(h0)
    except ValueError:  # said in the caller's terms
        raise ValueError(
            f"generated points lie {h0:.3g} apart, a scale whose bandwidth grid leaves "
            f"[{MIN_BANDWIDTH:g}, {MAX_BANDWIDTH:g}]: standardise generated and test first"
        ) from None
    selection_scores = _kde_log_density_multi(select, centres, bandwidths).mean(axis=1)
    best = int(np.argmax(selection_scores))
    bandwidth = float(bandwidths[best])
    per_point = _kde_log_density_multi(t, centres, np.array([bandwidth]))[0]
    est = mean_estimate(per_point)
    return KDEResult(
        score=est.value,
        bandwidth=bandwidth,
        bandwidths=bandwidths,
        selection_scores=selection_scores,
        stderr=est.stderr,
    )
