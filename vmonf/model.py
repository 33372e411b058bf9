"""``VariationalMixture``: the generative mixture and its amortised posterior together."""

from __future__ import annotations

from torch import Tensor, nn

from vmonf.mixture import MixtureOfFlows
from vmonf.objectives import elbo, mixture_loss
from vmonf.posterior import PosteriorNet

__all__ = ["VariationalMixture"]


class VariationalMixture(nn.Module):
    """p(x, c) = pi_c p_c(x) with flows p_c, and q(c | x) from a :class:`PosteriorNet`."""

    def __init__(self, mixture: MixtureOfFlows, posterior: PosteriorNet) -> None:
        super().__init__()
        self.mixture = mixture
        self.posterior = posterior

    def loss(
        self,
        x: Tensor,
        y: Tensor,
        *,
        alpha: float,
        objective: str,
        temperature: float | None = None,
    ) -> Tensor:
        """Per-point training loss (N,), nats; see :func:`vmonf.objectives.mixture_loss`."""
        log_joint = self.mixture.log_joint(x)
        log_q = self.posterior(x, temperature)
        return mixture_loss(log_joint, log_q, y, alpha=alpha, objective=objective)

    def elbo(self, x: Tensor, temperature: float | None = None) -> Tensor:
        """ELBO per point (N,), nats."""
        return elbo(self.mixture.log_joint(x), self.posterior(x, temperature))
