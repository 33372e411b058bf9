"""The amortised posterior q(c | x): an MLP with a softmax temperature."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vmonf._validation import (
    check_choice,
    check_points,
    check_positive_float,
    check_positive_int,
)
from vmonf.coupling import ACTIVATIONS

__all__ = ["PosteriorNet", "TemperatureSchedule"]


@dataclass(frozen=True)
class TemperatureSchedule:
    """Softmax temperature T as a function of the training step.

    ``"constant"``: T = ``initial``. ``"exponential"``: the VMoNF paper's annealing
    T = initial * exp(-rate * step), floored at ``minimum`` so gradients through q
    never vanish completely.
    """

    kind: str = "constant"
    initial: float = 1.0
    rate: float = 1e-3
    minimum: float = 0.05

    def __post_init__(self) -> None:
        check_choice(self.kind, "temperature schedule", ("constant", "exponential"))
        check_positive_float(self.initial, "initial temperature")
        check_positive_float(self.rate, "temperature rate", allow_zero=True)
        check_positive_float(self.minimum, "minimum temperature")
        if self.kind == "exponential" and self.minimum > self.initial:
            raise ValueError(
                f"minimum temperature ({self.minimum:g}) must be <= the initial one "
                f"({self.initial:g})"
            )

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.initial
        return max(self.minimum, self.initial * math.exp(-self.rate * step))


def _checked_temperature(temperature: object) -> float | Tensor:
    # Not a tensor (e.g. the stored buffer: no sync to check it), and not under
    # torch.compile, where a symbolic float's check would break the graph.
    if isinstance(temperature, Tensor) or torch.compiler.is_compiling():
        return temperature  # type: ignore[return-value]
    return check_positive_float(temperature, "temperature")


class PosteriorNet(nn.Module):
    """q(c | x) = softmax(MLP(x) / T).

    Args:
        n_features: input dimension D.
        n_components: number of classes K.
        hidden: widths of the hidden layers (may be empty: multinomial logistic).
        activation: hidden non-linearity.
    """

    temperature: Tensor  # buffer, a scalar

    def __init__(
        self,
        n_features: int,
        n_components: int,
        hidden: tuple[int, ...] = (32, 32),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.n_features = check_positive_int(n_features, "n_features")
        self.n_components = check_positive_int(n_components, "n_components")
        self.hidden = tuple(check_positive_int(h, "posterior hidden width") for h in hidden)
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        layers: list[nn.Module] = []
        width = self.n_features
        for h in self.hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[self.activation]()]
            width = h
        layers.append(nn.Linear(width, self.n_components))
        self.net = nn.Sequential(*layers)
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, x: Tensor, temperature: float | None = None) -> Tensor:
        """log q(c | x): (N, D) -> (N, K), at ``temperature`` (default: the stored one)."""
        # A given T is checked (cheap for a float): T <= 0 or NaN would give NaN or a
        # reversed posterior.
        t = self.temperature if temperature is None else _checked_temperature(temperature)
        if not torch.compiler.is_compiling():  # shapes and dtypes are guarded there
            check_points(x, self.n_features, self.temperature.dtype, computed_by="posterior")
        return torch.log_softmax(self.net(x) / t, dim=-1)
