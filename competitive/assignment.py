"""Hard assignment: argmax with deterministic ties, load balancing, mixing weights.

All functions take tensors: ``scores`` (N, K) are per-point log-likelihood
estimates (nats, or any monotone transform), ``assignment`` (N,) int64 owners.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vmonf.flows import check_components

__all__ = ["hard_assign", "min_count", "mixing_weights", "training_weights"]


def hard_assign(scores: Tensor, previous: Tensor | None = None) -> Tensor:
    """Owner of every point: argmax_k scores[i, k] -> (N,) int64.

    Ties are broken deterministically: a point keeps its ``previous`` owner when
    that owner is among the maxima, otherwise it goes to the lowest index. NaN
    scores count as -inf.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be an (N, K) tensor, got {getattr(scores, 'shape', scores)}")
    scores = torch.nan_to_num(scores, nan=-math.inf)
    is_max = scores == scores.max(dim=1, keepdim=True).values
    owner = is_max.to(torch.uint8).argmax(dim=1)  # first (lowest) maximal index
    if previous is not None:
        previous = check_components(previous, scores.shape[1], scores.device, "previous")
        if previous.numel() != scores.shape[0]:
            raise ValueError(f"previous has {previous.numel()} owners for {scores.shape[0]} points")
        keep = is_max.gather(1, previous[:, None]).squeeze(1)
        owner = torch.where(keep, previous, owner)
    return owner


def min_count(n_points: int, min_share: float) -> int:
    """Fewest points a component must win to keep a mixing weight: ceil(min_share * N).

    The product is rounded to 9 decimals first, so that a share whose float is a hair
    above the exact fraction (0.1 / 7 * 210 = 3.0000000000000004) does not add a point.
    """
    return math.ceil(round(min_share * n_points, 9))


def training_weights(assignment: Tensor, scores: Tensor, minimum: int) -> Tensor:
    """(N, K) training weights: one-hot owners, plus load balancing.

    A component that owns fewer than ``minimum`` points also trains on its
    ``minimum`` best-scoring points (which keep their owner), so it can recover.
    """
    n, k = scores.shape
    assignment = check_components(assignment, k, scores.device, "assignment")
    if assignment.numel() != n:
        raise ValueError(f"assignment has {assignment.numel()} owners for {n} points")
    weights = F.one_hot(assignment, k).to(scores.dtype)
    minimum = min(minimum, n)
    if minimum == 0:
        return weights
    starved = weights.sum(0) < minimum  # (K,)
    if not bool(starved.any()):
        return weights
    best = torch.nan_to_num(scores, nan=-math.inf).topk(minimum, dim=0).indices  # (minimum, K)
    lent = torch.zeros_like(weights).scatter_(0, best, 1.0)
    return torch.where(starved, torch.maximum(weights, lent), weights)


def mixing_weights(assignment: Tensor, n_components: int, minimum: int) -> Tensor:
    """Share of points each component won, (K,); components under ``minimum`` get 0.

    The remaining shares are renormalised to sum to 1.
    """
    assignment = check_components(assignment, n_components, assignment.device, "assignment")
    counts = torch.bincount(assignment, minlength=n_components).to(torch.float64)
    kept = torch.where(counts >= max(minimum, 1), counts, torch.zeros_like(counts))
    if float(kept.sum()) == 0.0:  # nobody reaches the minimum: fall back to plain shares
        kept = counts
    return kept / kept.sum()
