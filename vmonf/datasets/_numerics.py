"""Numerical helpers shared by the toys' density code."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vmonf._gaussian import LOG_2PI, log_normal
from vmonf.datasets.base import FloatArray

__all__ = ["in_chunks", "log_isotropic_normal", "log_normal"]


def log_isotropic_normal(X: FloatArray, means: FloatArray, std: float) -> FloatArray:
    """log N(x_n; mean_m, std^2 I) in nats for every pair, shape (N, M); X (N, D), means (M, D)."""
    sq_dist = (X**2).sum(axis=1)[:, None] - 2.0 * X @ means.T + (means**2).sum(axis=1)
    dim = X.shape[1]
    return -0.5 * np.maximum(sq_dist, 0.0) / std**2 - dim * (np.log(std) + 0.5 * LOG_2PI)


def in_chunks(fn: Callable[[FloatArray], FloatArray], X: FloatArray, rows: int) -> FloatArray:
    """Apply a row-wise ``fn`` to ``X`` (N, D) in blocks of ``rows`` rows; bounds peak memory."""
    if len(X) <= rows:
        return fn(X)
    return np.concatenate([fn(X[start : start + rows]) for start in range(0, len(X), rows)])
