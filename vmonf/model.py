"""``VariationalMixture``: the generative mixture and its amortised posterior together."""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import Tensor, nn

from vmonf._validation import check_positive_int
from vmonf.mixture import MixtureOfFlows
from vmonf.objectives import elbo, mixture_loss
from vmonf.posterior import PosteriorNet

__all__ = ["VariationalMixture"]


class VariationalMixture(nn.Module):
    """p(x, c) = pi_c p_c(x) with flows p_c, and q(c | x) from a :class:`PosteriorNet`."""

    def __init__(self, mixture: MixtureOfFlows, posterior: PosteriorNet) -> None:
        super().__init__()
        if not isinstance(mixture, MixtureOfFlows):
            raise TypeError(f"mixture must be a MixtureOfFlows, got {type(mixture).__name__}")
        if not isinstance(posterior, PosteriorNet):
            raise TypeError(f"posterior must be a PosteriorNet, got {type(posterior).__name__}")
        # A q over other components would broadcast against log p(x, c) (N, K) and give
        # a finite, meaningless ELBO.
        for name in ("n_components", "n_features"):
            ours, theirs = getattr(mixture, name), getattr(posterior, name)
            if ours != theirs:
                raise ValueError(
                    f"posterior has {name}={theirs} but the mixture {name}={ours}: q(c|x) "
                    "must cover the mixture's components and read its points"
                )
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
        top_k: int | None = None,
    ) -> Tensor:
        """Per-point training loss (N,), nats; see :func:`vmonf.objectives.mixture_loss`.

        With ``top_k`` (< K), an unlabelled point's loss uses only its ``top_k`` most
        probable components under q(c|x), with q renormalised over them: a variational
        distribution that is zero elsewhere, so -loss is still a lower bound on log p(x).
        Each flow then runs only on the points that list it. A labelled point lists its
        label first and keeps the exact labelled loss.
        """
        if not torch.compiler.is_compiling():  # shapes and dtypes are guarded there
            self._check_labels(y, x.shape[0])
        log_q = self.posterior(x, temperature)
        if not self._uses_top_k(top_k):
            log_joint = self.mixture._log_joint(x)
            return mixture_loss(log_joint, log_q, y, alpha=alpha, objective=objective)
        labelled = y >= 0
        ranking = log_q.detach().clone()
        ranking[labelled, y[labelled]] = torch.inf  # the label takes the first slot
        log_joint, log_q_top = self._at_top_k(x, log_q, ranking, top_k)
        renormalised = log_q_top - log_q_top.logsumexp(1, keepdim=True)
        first = torch.where(labelled, 0, -1)  # a label sits in the first slot
        return mixture_loss(
            log_joint, log_q_top, first, alpha=alpha, objective=objective,
            log_q_unlabelled=renormalised,
        )  # fmt: skip

    def _check_labels(self, y: object, n: int) -> None:
        """y must be an int64 tensor (n,) of labels in [-1, K); -1 = unlabelled."""
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be an int64 torch.Tensor of labels, got {type(y).__name__}")
        if y.dtype != torch.long:
            raise TypeError(f"y must be an int64 tensor of labels, got {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},), one label per point, got {tuple(y.shape)}")
        k = self.mixture.n_components
        # The range needs the values: checked on the CPU only (a GPU would sync each step).
        if y.numel() and y.device.type == "cpu" and bool((y.min() < -1) | (y.max() >= k)):
            raise ValueError(f"y must hold labels in [-1, {k}) (-1 = unlabelled)")

    def elbo(self, x: Tensor, temperature: float | None = None, top_k: int | None = None) -> Tensor:
        """ELBO per point (N,), nats; with ``top_k``, the bound over each point's
        ``top_k`` most probable components that :meth:`loss` trains (q renormalised)."""
        log_q = self.posterior(x, temperature)
        if not self._uses_top_k(top_k):
            return elbo(self.mixture._log_joint(x), log_q)
        log_joint, log_q_top = self._at_top_k(x, log_q, log_q.detach(), top_k)
        return elbo(log_joint, log_q_top - log_q_top.logsumexp(1, keepdim=True))

    def forward(
        self, x: Tensor, temperature: float | None = None, top_k: int | None = None
    ) -> Tensor:
        """``model(x)`` is :meth:`elbo`: the ELBO per point (N,), nats."""
        return self.elbo(x, temperature, top_k)

    def _uses_top_k(self, top_k: int | None) -> TypeGuard[int]:
        """Whether ``top_k`` (checked) keeps fewer than the K components: never for None."""
        if top_k is None:
            return False
        return check_positive_int(top_k, "top_k") < self.mixture.n_components

    def _at_top_k(
        self, x: Tensor, log_q: Tensor, ranking: Tensor, top_k: int
    ) -> tuple[Tensor, Tensor]:
        """log p(x, c) and log q(c|x) at each point's ``top_k`` best-ranked components,
        (N, top_k) each; each flow runs only on the points that list it."""
        components = ranking.topk(top_k, dim=1).indices
        return self.mixture._log_joint_at(x, components), log_q.gather(1, components)
