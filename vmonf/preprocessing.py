"""Standardisation inside the estimators, with its log-determinant."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Standardizer"]


class Standardizer(nn.Module):
    """Affine map x -> (x - mean) / scale, fitted per feature.

    Densities transform as log p_x(x) = log p_u(u) + :meth:`log_abs_det`, so a model
    fitted in standardised units reports scores in the user's units.
    """

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))

    @torch.no_grad()
    def fit(self, x: Tensor) -> Standardizer:
        """Set mean and scale from x (N, D); constant columns are an error."""
        scale = x.std(dim=0, unbiased=False)
        constant = (scale <= 1e-12 * (1.0 + x.abs().amax(dim=0))).nonzero().flatten().tolist()
        if constant:
            raise ValueError(f"X has constant column(s) {constant}: no density can be fitted there")
        self.mean.copy_(x.mean(dim=0))
        self.scale.copy_(scale)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) original units -> (N, D) standardised."""
        return (x - self.mean) / self.scale

    def inverse(self, u: Tensor) -> Tensor:
        """(N, D) standardised -> (N, D) original units."""
        return u * self.scale + self.mean

    def log_abs_det(self) -> Tensor:
        """log|det d(standardised)/dx| = -sum log scale, a scalar in nats."""
        return -torch.log(self.scale).sum()
