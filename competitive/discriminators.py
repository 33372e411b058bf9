r"""The density-ratio trick: K discriminators estimate each generator's likelihood.

Discriminator k is trained to tell data (real, label 1) from samples of
generator k (fake, label 0). At the optimum :math:`D_k = p_{data} / (p_{data} +
p_k)`, so with logit :math:`\ell_k = \log D_k - \log(1 - D_k)`

.. math:: \log \frac{1 - D_k(x)}{D_k(x)} = -\ell_k(x) \approx \log p_k(x) - \log p_{data}(x).

Locatello et al. normalise :math:`(1 - D_k)/D_k` over the training set and assign
each point to the argmax; here the normaliser is the training-set *mean* (the
paper's sum divided by N, the same argmax), so the estimate stays an estimate
of :math:`\log p_k - \log p_{data}` — compare it with that quantity, never with
:math:`\log p_k` alone.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmonf._dtypes import float32_default
from vmonf._validation import check_points, check_positive_int
from vmonf.coupling import BatchedMLP
from vmonf.mixture import generator_on
from vmonf.resume import Checkpointer
from vmonf.training import TrainConfig, TrainResult, map_chunks, train

__all__ = [
    "ComponentSampler",
    "Discriminators",
    "build_discriminators",
    "fit_discriminators",
    "log_ratio_normaliser",
    "train_discriminators",
]


class ComponentSampler(Protocol):
    """K generative components: ``sample(n, generator=...)`` -> (K, n, D) tensor."""

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def sample(self, n: int, *, generator: torch.Generator) -> Tensor: ...


class Discriminators(nn.Module):
    """K binary classifiers (data vs generator k) evaluated together.

    Default: MLP D -> 500 -> 500 -> 1 with ReLU (:class:`CompetitiveMixture`), batched as
    :class:`vmonf.coupling.BatchedMLP` (K, in, out) weights.
    """

    def __init__(
        self,
        n_features: int,
        n_components: int,
        hidden_features: int = 500,
        n_hidden_layers: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.n_features = check_positive_int(n_features, "n_features")
        self.n_components = check_positive_int(n_components, "n_components")
        self.net = BatchedMLP(
            n_components,
            n_features,
            1,
            check_positive_int(hidden_features, "hidden_features"),
            check_positive_int(n_hidden_layers, "n_hidden_layers", minimum=0),
            activation,
            zero_last=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits log D/(1-D): x (N, D) shared by all, or (K, N, D) one slice each -> (N, K)."""
        self._check(x, "x", stacked=True)
        xs = x.expand(self.n_components, *x.shape) if x.dim() == 2 else x
        return self.net(xs).squeeze(-1).transpose(0, 1)

    def log_ratio(self, x: Tensor) -> Tensor:
        """Unnormalised log (1 - D_k)/D_k ~ log p_k(x) - log p_data(x): (N, D) -> (N, K)."""
        self._check(x, "x")
        return -self(x)

    def _check(self, x: object, name: str, stacked: bool = False) -> None:
        """x (N, D), or with ``stacked`` also (K, N, D), in the discriminators' dtype."""
        check_points(
            x, self.n_features, self.net.weights[0].dtype, name, computed_by="discriminators",
            n_components=self.n_components if stacked else None,
        )  # fmt: skip


def build_discriminators(
    n_features: int,
    n_components: int,
    hidden_features: int,
    n_hidden_layers: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Discriminators:
    """:class:`Discriminators` whose initial weights a seed fixes whatever torch's default
    dtype (drawn in float32), then moved to ``device`` and cast to ``dtype``."""
    with float32_default():
        module = Discriminators(n_features, n_components, hidden_features, n_hidden_layers)
    return module.to(device=device, dtype=dtype)


def fit_discriminators(
    discriminators: Discriminators,
    real: Tensor,
    fake: Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    checkpointer: Checkpointer | None = None,
) -> TrainResult:
    """Train all K discriminators at once with the logistic loss.

    Args:
        real: (N, D) data, shared by every discriminator (label 1).
        fake: (K, N, D) samples, slice k from generator k (label 0).
    Each step takes the same B real points and B samples of every generator; the
    K losses are summed: each discriminator has its own weights, and what links them
    is the training loop's: one gradient-norm clip over all K (``TrainConfig.grad_clip``,
    binding only on rare large steps) and its non-finite-step guard, which restores all
    K, resets their Adam state and halves their learning rate together.
    """
    discriminators._check(real, "real")
    discriminators._check(fake, "fake", stacked=True)
    if fake.dim() != 3 or fake.shape[1] != real.shape[0]:
        raise ValueError(
            f"fake must be (K, N, D) with K = {discriminators.n_components} and as many "
            f"points per generator as real has (N = {real.shape[0]}); got {tuple(fake.shape)}"
        )

    def objective(batch: tuple[Tensor, ...], _: int) -> Tensor:
        xr, xf = batch  # (B, D), (B, K, D)
        loss = F.softplus(-discriminators(xr)) + F.softplus(discriminators(xf.transpose(0, 1)))
        return loss.mean(0).sum()

    return train(
        discriminators,
        objective,
        (real, fake.transpose(0, 1)),
        config,
        generator=generator,
        checkpointer=checkpointer,
    )


def train_discriminators(
    discriminators: Discriminators,
    real: Tensor,
    components: ComponentSampler,
    config: TrainConfig,
    generator: torch.Generator,
    checkpointer: Checkpointer | None = None,
) -> Tensor:
    """The competitive scheme's discriminator step: draw one fake per real point (N, D)
    from each component (``components.sample(n, generator=...)`` -> (K, n, D)), fit the
    discriminators (:func:`fit_discriminators`) and return their log normaliser (K,)
    over the real points (:func:`log_ratio_normaliser`)."""
    was_training = getattr(components, "training", False)
    components.eval()
    with torch.no_grad():  # batch orders are drawn on the CPU, fakes where the data is
        fake = components.sample(real.shape[0], generator=generator_on(real.device, generator))
    if was_training:
        components.train()
    fit_discriminators(discriminators, real, fake, config, generator, checkpointer)
    return log_ratio_normaliser(discriminators, real)


@torch.no_grad()
def log_ratio_normaliser(discriminators: Discriminators, x: Tensor) -> Tensor:
    """log mean_i (1 - D_k(x_i))/D_k(x_i) over the training points x (N, D) -> (K,).

    Subtracting it makes the ratio estimate average 1 over the data, as
    p_k / p_data does; the paper's Z_k is N times this mean.
    """
    if x.shape[0] == 0:
        raise ValueError("log_ratio_normaliser needs at least one point")
    log_r = map_chunks(discriminators.log_ratio, x)
    return torch.logsumexp(log_r, dim=0) - math.log(x.shape[0])
