"""K generators behind one small protocol: train on weighted points, sample, optional log p.

Every class here holds K independent generators evaluated together (weights of
shape (K, ...), one batched computation, no Python loop over K):

* :class:`FlowGenerators` — K affine-coupling flows (:class:`vmonf.ComponentFlows`),
  exact log-likelihood;
* :class:`VAEGenerators` — K Gaussian VAEs (Locatello et al.: encoder and
  decoder 2 x 50 ReLU, latent 5); no exact likelihood, an ELBO instead;
* :class:`KMeansGenerators` — the degenerate generator x = mu_k + eps (constant
  encoder, identity decoder) with which competitive training *is* k-means.

Training takes an (N, K) weight per point and generator (a one-hot assignment,
plus the extra points load balancing lends; bootstrap counts for bagging) and
minimises ``sum_k weight_k(x) * loss_k(x)`` averaged over points. Each batch is
regrouped so that generator k is evaluated only on its own points
(:func:`group_by_component`): with one-hot weights, K generators cost about one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vmonf._gaussian import diagonal_normal_log_prob
from vmonf._validation import (
    check_bool,
    check_choice,
    check_points,
    check_positive_float,
    check_positive_int,
)
from vmonf.coupling import ACTIVATIONS, BatchedMLP, bounded_log_scale
from vmonf.flows import (
    ComponentFlows,
    check_components,
    group_by_component,
    sample_by_component,
)
from vmonf.resume import Checkpointer
from vmonf.training import TrainConfig, TrainResult, train

__all__ = [
    "FlowGenerators",
    "Generators",
    "KMeansGenerators",
    "NoExactLikelihoodError",
    "VAEGenerators",
]


class NoExactLikelihoodError(NotImplementedError):
    """The generators have no exact likelihood (VAEs): use the KDE protocol or an ELBO."""


class Generators(nn.Module, ABC):
    """K generators of D-dimensional points, trained and evaluated together.

    Subclasses implement :meth:`stacked_loss` and :meth:`sample`; those with an
    exact density set ``exact = True`` and implement :meth:`log_prob`.
    """

    exact: ClassVar[bool] = False

    def __init__(self, n_features: int, n_components: int) -> None:
        super().__init__()
        self.n_features = check_positive_int(n_features, "n_features")
        self.n_components = check_positive_int(n_components, "n_components")

    @abstractmethod
    def stacked_loss(self, xs: Tensor) -> Tensor:
        """Training loss of generator k at the points xs[k]: (K, M, D) -> (K, M), nats."""

    def per_point_loss(self, x: Tensor) -> Tensor:
        """Training loss of every generator at every point: x (N, D) -> (N, K), nats."""
        self._check_points(x)
        return self.stacked_loss(x.expand(self.n_components, *x.shape)).transpose(0, 1)

    def _check_points(self, x: object, name: str = "x") -> None:
        """x (N, D) in the generators' dtype."""
        check_points(x, self.n_features, self._reference.dtype, name, computed_by="generators")

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points from every generator: (K, n, D)."""
        return self._sample(check_positive_int(n, "n", minimum=0), generator)

    @abstractmethod
    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        """:meth:`sample` on a checked n."""

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p_k(x): (N, D) -> (N, K), nats."""
        raise NoExactLikelihoodError(
            f"{type(self).__name__} have no exact likelihood; score their samples with the "
            "KDE protocol (vmonf.metrics.kde_log_likelihood)"
        )

    def log_likelihood_bound(self, x: Tensor) -> Tensor:
        """log p_k(x) or a lower bound on it (N, K), nats: what held-out scores report."""
        return self.log_prob(x)

    def sample_components(self, components: Tensor, generator: torch.Generator | None) -> Tensor:
        """One point from generator ``components[i]`` for each i: (n,) -> (n, D), in chunks."""
        components = check_components(components, self.n_components, self._reference.device)
        return sample_by_component(
            lambda m: self._sample(m, generator), components, self.n_components
        )

    def _check_fit_inputs(self, x: Tensor, weights: Tensor, generator: object) -> None:
        """x (N, D) of the generators' dtype, finite; weights (N, K), non-negative, not
        NaN; a torch.Generator for the batch order."""
        self._check_points(x)
        if not bool(torch.isfinite(x).all()):  # else every step is skipped as non-finite
            raise ValueError("x contains NaN or infinity")
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
        if weights.shape != (x.shape[0], self.n_components):
            raise ValueError(
                f"weights must have shape ({x.shape[0]}, {self.n_components}), one row per "
                f"point and one column per generator, got {tuple(weights.shape)}"
            )
        if not bool((weights >= 0).all()):  # NaN fails too
            raise ValueError("weights must be non-negative (and not NaN)")
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (it orders the batches), got "
                f"{type(generator).__name__}"
            )

    def fit_weighted(
        self,
        x: Tensor,
        weights: Tensor,
        config: TrainConfig,
        generator: torch.Generator,
        checkpointer: Checkpointer | None = None,
        compile: bool = False,
        optimizer_state: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Minimise mean_i sum_k weights[i, k] * loss_k(x_i) with :func:`vmonf.training.train`.

        Args:
            x: (N, D) points.
            weights: (N, K) non-negative weights (a one-hot assignment mask, bootstrap
                counts, ...); one batched computation trains all K generators, each
                on its own points of the batch only (:func:`group_by_component`).
            compile: evaluate :meth:`stacked_loss` through ``torch.compile``.
            optimizer_state: an earlier call's ``TrainResult.optimizer_state``: Adam
                continues with its moments (competitive rounds are one optimisation).

        A generator with no weight at all is left exactly as it was: with no data
        gradient, weight decay alone would otherwise shrink it towards zero. (Its
        slice of Adam's carried moments does move: should it win points back, its
        first steps can be larger than the learning rate.)
        """
        self._check_fit_inputs(x, weights, generator)
        stacked_loss = self.stacked_loss
        if compile:
            stacked_loss = torch.compile(stacked_loss, dynamic=True)

        def objective(batch: tuple[Tensor, ...], _: int) -> Tensor:
            xb, wb = batch
            index, slot_weights = group_by_component(wb)
            return (slot_weights * stacked_loss(xb[index])).sum() / xb.shape[0]

        idle = weights.sum(0) == 0  # (K,)
        kept = []
        if idle.any():
            for p in self.parameters():
                if p.shape[:1] != (self.n_components,):  # a subclass sharing a parameter
                    raise TypeError(f"{type(self).__name__}'s parameters must be stacked over K")
                kept.append((p, p.detach()[idle].clone()))
        try:
            return train(
                self, objective, (x, weights), config, generator=generator,
                checkpointer=checkpointer, optimizer_state=optimizer_state,
                return_optimizer_state=True,
            )  # fmt: skip
        finally:
            with torch.no_grad():
                for param, saved in kept:
                    param[idle] = saved

    @property
    def _reference(self) -> Tensor:
        return next(self.parameters())


class FlowGenerators(Generators):
    """K affine-coupling flows (exact likelihood); see :class:`vmonf.ComponentFlows`."""

    exact = True

    def __init__(
        self,
        n_features: int,
        n_components: int,
        *,
        n_layers: int = 6,
        hidden_features: int = 64,
        n_hidden_layers: int = 2,
        activation: str = "relu",
        max_log_scale: float = 3.0,
        linear: bool = True,
        base_df: float | None = None,
    ) -> None:
        super().__init__(n_features, n_components)
        self.flows = ComponentFlows(
            n_features,
            n_components,
            n_layers=n_layers,
            hidden_features=hidden_features,
            n_hidden_layers=n_hidden_layers,
            activation=activation,
            max_log_scale=max_log_scale,
            linear=linear,
            base_df=base_df,
        )

    def stacked_loss(self, xs: Tensor) -> Tensor:
        return -self.flows.log_prob_stacked(xs)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flows.log_prob(x)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return self.flows.sample(n, generator=generator)

    def sample_components(self, components: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.flows.sample_components(components, generator)


class VAEGenerators(Generators):
    r"""K Gaussian VAEs: q(z|x) = N(mu(x), diag sigma^2(x)), p(x|z) = N(m(z), diag s^2(z)).

    Encoder D -> hidden^L -> 2 * latent and decoder latent -> hidden^L -> 2 * D, ReLU,
    as :class:`vmonf.coupling.BatchedMLP` (K, in, out) weights. The training loss
    is the negative ELBO with one reparameterised sample of z; log-variances are
    soft-clamped to (-``max_log_var``, ``max_log_var``).

    Args:
        decoder_noise: sample x ~ p(x|z) (True, the model's marginal) or return the
            decoder mean m(z) (False).
    """

    def __init__(
        self,
        n_features: int,
        n_components: int,
        *,
        hidden_features: int = 50,
        n_hidden_layers: int = 2,
        latent_features: int = 5,
        activation: str = "relu",
        decoder_noise: bool = True,
        max_log_var: float = 8.0,
    ) -> None:
        super().__init__(n_features, n_components)
        self.latent_features = check_positive_int(latent_features, "latent_features")
        hidden = check_positive_int(hidden_features, "hidden_features")
        layers = check_positive_int(n_hidden_layers, "n_hidden_layers", minimum=0)
        self.decoder_noise = check_bool(decoder_noise, "decoder_noise")
        check_choice(activation, "activation", ACTIVATIONS)
        self.max_log_var = check_positive_float(max_log_var, "max_log_var")
        k, d, z = n_components, n_features, self.latent_features
        self.encoder = BatchedMLP(k, d, 2 * z, hidden, layers, activation, zero_last=False)
        self.decoder = BatchedMLP(k, z, 2 * d, hidden, layers, activation, zero_last=False)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        half = params.shape[-1] // 2
        return params[..., :half], bounded_log_scale(params[..., half:], self.max_log_var)

    def elbo(self, x: Tensor) -> Tensor:
        """One-sample ELBO of every VAE at every point: (N, D) -> (N, K), nats."""
        return -self.per_point_loss(x)

    def _encode_decode(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One reparameterised z ~ q(z|x) per point: xs (K, M, D) -> q's mean and
        log-variance, z (K, M, latent) and log p(x|z) (K, M), nats."""
        mu, log_var = self._split(self.encoder(xs))
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        mean, dec_log_var = self._split(self.decoder(z))
        return mu, log_var, z, diagonal_normal_log_prob(xs, mean, dec_log_var)

    def stacked_loss(self, xs: Tensor) -> Tensor:
        """Negative one-sample ELBO of VAE k at xs[k] (closed-form KL): (K, M, D) -> (K, M),
        nats."""
        mu, log_var, _, log_likelihood = self._encode_decode(xs)
        kl = 0.5 * (mu**2 + torch.exp(log_var) - 1.0 - log_var).sum(-1)
        return kl - log_likelihood

    def log_likelihood_bound(self, x: Tensor) -> Tensor:
        """One-sample log importance weight log p(x|z) + log p(z) - log q(z|x) of every
        VAE at every point, z ~ q(z|x): (N, D) -> (N, K), nats.

        Its exponential is an unbiased estimate of p_k(x), so log sum_k pi_k exp(.)
        is a lower bound on the mixture's log p(x) in expectation (Jensen). The
        closed-form-KL ELBO of :meth:`elbo` has the same mean per component, but not
        that property: its noise survives the log-sum-exp over components as an upward
        bias (0.19 nats for two VAEs whose encoders are exact posteriors)."""
        self._check_points(x)
        mu, log_var, z, log_likelihood = self._encode_decode(x.expand(self.n_components, *x.shape))
        zeros = torch.zeros_like(z)
        log_prior = diagonal_normal_log_prob(z, zeros, zeros)
        log_posterior = diagonal_normal_log_prob(z, mu, log_var)
        return (log_likelihood + log_prior - log_posterior).transpose(0, 1)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        ref = self._reference
        z = torch.randn(
            self.n_components, n, self.latent_features,
            generator=generator, dtype=ref.dtype, device=ref.device,
        )  # fmt: skip
        mean, log_var = self._split(self.decoder(z))
        if not self.decoder_noise:
            return mean
        eps = torch.randn(mean.shape, generator=generator, dtype=ref.dtype, device=ref.device)
        return mean + torch.exp(0.5 * log_var) * eps


class KMeansGenerators(Generators):
    """The degenerate generator x = mu_k + eps, eps ~ N(0, I): competitive training = k-means.

    ``log p_k(x) = -|x - mu_k|^2 / 2 - D/2 log 2 pi``, so the argmax assignment is
    the nearest centre, and :meth:`fit_weighted` sets each centre to the weighted
    mean of its points (the exact minimiser of its loss), as Lloyd's step does.
    """

    exact = True

    def __init__(self, n_features: int, n_components: int, centres: Tensor | None = None) -> None:
        super().__init__(n_features, n_components)
        initial = torch.randn(n_components, n_features) if centres is None else centres
        if not isinstance(initial, Tensor):
            raise TypeError(f"centres must be a torch.Tensor, got {type(centres).__name__}")
        if not bool(torch.isfinite(initial).all()):
            raise ValueError("centres must be finite")
        if tuple(initial.shape) != (n_components, n_features):
            raise ValueError(
                f"centres must have shape ({n_components}, {n_features}), "
                f"got {tuple(initial.shape)}"
            )
        self.centres = nn.Parameter(initial.clone())

    def stacked_loss(self, xs: Tensor) -> Tensor:
        centres = self.centres[:, None, :]
        return -diagonal_normal_log_prob(xs, centres, torch.zeros_like(centres))

    def log_prob(self, x: Tensor) -> Tensor:
        return -self.per_point_loss(x)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        c = self.centres
        noise = torch.randn(
            self.n_components, n, self.n_features, generator=generator, dtype=c.dtype,
            device=c.device,
        )  # fmt: skip
        return c[:, None, :] + noise

    @torch.no_grad()
    def fit_weighted(
        self,
        x: Tensor,
        weights: Tensor,
        config: TrainConfig,
        generator: torch.Generator,
        checkpointer: Checkpointer | None = None,
        compile: bool = False,
        optimizer_state: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Closed form: mu_k = sum_i w_ik x_i / sum_i w_ik (a centre with no weight stays;
        deterministic, so there is nothing to checkpoint, compile or optimise)."""
        self._check_fit_inputs(x, weights, generator)
        weights = weights.to(x.dtype)  # bootstrap counts may be integers
        total = weights.sum(0)
        means = (weights.T @ x) / total.clamp_min(1e-300)[:, None]
        self.centres.copy_(torch.where(total[:, None] > 0, means, self.centres))
        return TrainResult(n_epochs=1, n_steps=1)
