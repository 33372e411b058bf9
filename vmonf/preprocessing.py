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

    mean: Tensor  # buffers (D,), float64
    scale: Tensor

    def __init__(self, n_features: int) -> None:
        super().__init__()
        # float64 whatever the default dtype: a float32 mean of data far from 0
        # (offset 1e12) would lose the data's scale, and load() copies into these.
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_features, dtype=torch.float64))

    @torch.no_grad()
    def fit(self, x: Tensor) -> Standardizer:
        """Set mean and scale from x (N, D); constant columns are an error.

        Moments are taken of x divided by each column's largest magnitude, so that
        neither squares (x ~ 1e160) nor sums overflow and tiny units (x ~ 1e-30) are
        not mistaken for constants.
        """
        magnitude = x.abs().amax(dim=0)
        unit = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
        scaled = x / unit
        scale = scaled.std(dim=0, unbiased=False) * unit
        # Spread within float64 round-off of the magnitude (eps 2.2e-16) is no spread;
        # 1e12 + N(0, 1) (relative spread 1e-12) is data.
        constant = (scale <= 1e-14 * magnitude).nonzero().flatten().tolist()
        if constant:
            raise ValueError(
                f"X has constant column(s) {constant} (to float64 precision): no density "
                "can be fitted there; drop them first, e.g. with "
                "sklearn.feature_selection.VarianceThreshold"
            )
        self.mean.copy_(scaled.mean(dim=0) * unit)
        self.scale.copy_(scale)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) original units -> (N, D) standardised."""
        return (x - self.mean) / self.scale

    def inverse(self, u: Tensor) -> Tensor:
        """(N, D) standardised -> (N, D) original units, float64 whatever u's dtype.

        One allocation, the output: ``addcmul`` or ``u * scale`` would first copy a
        float32 u to float64 (1e7 2-D samples: 153 MiB more at the peak).
        """
        shape = torch.broadcast_shapes(u.shape, self.mean.shape)
        x = torch.empty(shape, dtype=torch.float64, device=u.device).copy_(u)
        return x.mul_(self.scale).add_(self.mean)

    def log_abs_det(self) -> Tensor:
        """log|det d(standardised)/dx| = -sum log scale, a scalar in nats."""
        return -torch.log(self.scale).sum()
