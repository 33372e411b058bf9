"""``MixtureOfFlows``: K component flows plus mixing weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vmonf._validation import check_choice, check_points, check_positive_int
from vmonf.flows import ComponentFlows, at_finite_points, group_by_component

__all__ = ["WEIGHT_MODES", "MixtureOfFlows", "draw_components", "generator_on"]

WEIGHT_MODES = ("uniform", "learned", "responsibilities")


def draw_components(log_weights: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """n component indices ~ Categorical(exp(log_weights)), (n,) int64 on log_weights'
    device; drawn on the generator's device (CPU without one)."""
    if n == 0:  # torch.multinomial refuses to draw none
        return torch.empty(0, dtype=torch.long, device=log_weights.device)
    device = "cpu" if generator is None else generator.device
    probs = log_weights.detach().double().exp().to(device)
    components = torch.multinomial(probs, n, replacement=True, generator=generator)
    return components.to(log_weights.device)


def generator_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """``generator`` if it draws on ``device``'s type, else a new one there seeded from
    one draw of it (torch samplers need a generator of the tensor's device)."""
    if generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


class MixtureOfFlows(nn.Module):
    r"""A mixture :math:`p(x) = \sum_k \pi_k p_k(x)` of batched flows.

    Args:
        flows: the K component flows.
        weights: ``"uniform"`` (fixed 1/K), ``"learned"`` (softmax of trained
            logits) or ``"responsibilities"`` (fixed during a step, set from the
            mean posterior by :meth:`update_weights`, as in EM).
    """

    def __init__(self, flows: ComponentFlows, weights: str = "uniform") -> None:
        super().__init__()
        if not isinstance(flows, ComponentFlows):
            raise TypeError(f"flows must be a ComponentFlows, got {type(flows).__name__}")
        self.flows = flows
        self.weight_mode = check_choice(weights, "weights", WEIGHT_MODES)
        k = flows.n_components
        reference = flows._reference  # built around flows already moved or cast: follow them
        logits = torch.full((k,), -math.log(k), dtype=reference.dtype, device=reference.device)
        if self.weight_mode == "learned":
            self.weight_logits = nn.Parameter(logits)
        else:
            self.register_buffer("weight_logits", logits)
        self.register_load_state_dict_pre_hook(self._refuse_unequal_weights_if_uniform)

    def _refuse_unequal_weights_if_uniform(
        self,
        module: nn.Module,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """load_state_dict pre-hook. The logits are stored in every mode, so torch's key
        and shape checks pass when trained weights are loaded into a mixture meant to
        keep them at 1/K. Runs before the mixture's own tensors and its flows' are
        copied (a parent module's registered before it are loaded already)."""
        logits = state_dict.get(prefix + "weight_logits")
        if (
            self.weight_mode == "uniform"
            and isinstance(logits, Tensor)
            and logits.numel() > 1
            and not bool((logits == logits.flatten()[0]).all())
        ):
            # Raised here, not added to error_msgs: torch would copy every tensor first.
            raise RuntimeError(
                f"Error(s) in loading state_dict: {prefix}weight_logits holds unequal "
                "mixing weights, but this MixtureOfFlows has weights='uniform': build it "
                "with weights='learned' or 'responsibilities' to load them (nothing of it "
                "was loaded)"
            )

    @property
    def n_components(self) -> int:
        return self.flows.n_components

    @property
    def n_features(self) -> int:
        return self.flows.n_features

    def log_weights(self) -> Tensor:
        """log pi, shape (K,)."""
        return torch.log_softmax(self.weight_logits, dim=0)

    def log_joint(self, x: Tensor) -> Tensor:
        """log pi_k + log p_k(x): x (N, D) -> (N, K), nats; -inf at a point with an
        infinite coordinate, NaN at one with a NaN (with no NaN in any gradient)."""
        return self._at_points(x, self._log_joint, component_axis=1)

    def _at_points(
        self,
        x: Tensor,
        compute: Callable[[Tensor], Tensor],
        component_axis: int | None = None,
        at_infinity: float = -math.inf,
    ) -> Tensor:
        """``compute`` at the points x (N, D), checked, once pending ActNorm layers have
        initialised from them as given; :func:`at_finite_points`' limits where a point
        is not finite."""
        self.flows.initialize(x)
        return at_finite_points(x, compute, component_axis, at_infinity)

    def _log_joint(self, x: Tensor) -> Tensor:
        """:meth:`log_joint` of checked, finite points (a training batch)."""
        return self.flows._log_prob(x) + self.log_weights()

    def log_joint_at(self, x: Tensor, components: Tensor) -> Tensor:
        """log pi_k + log p_k(x) for the components listed per point only:
        x (N, D), components (N, k) long -> (N, k), nats.

        Each flow runs on the points that list it (regrouped as competitive training
        does, :func:`group_by_component`), so the cost is that of K x (the largest
        count) points instead of K x N. ActNorm layers still initialise from the whole
        batch, as in :meth:`log_joint`: the regrouped slices repeat point 0 as padding.

        Raises ``TypeError``/``ValueError`` for an x that is not an (N, D) tensor of
        the flows' dtype, or components that are not an (N, k) int64 tensor of indices
        in [0, K).
        """
        flows = self.flows
        check_points(x, flows.n_features, next(flows.parameters()).dtype, computed_by="flows")
        n, k = x.shape[0], self.n_components
        if not isinstance(components, Tensor):
            raise TypeError(f"components must be a torch.Tensor, got {type(components).__name__}")
        if components.dtype != torch.long:
            raise TypeError(f"components must be int64 indices, got dtype {components.dtype}")
        if components.dim() != 2 or components.shape[0] != n:
            raise ValueError(
                f"components must have shape ({n}, k), one row per point, got "
                f"{tuple(components.shape)}"
            )
        if components.numel() and (components.min() < 0 or components.max() >= k):
            raise ValueError(f"components must lie in [0, {k})")
        return self._at_points(x, lambda u: self._log_joint_at(u, components), component_axis=1)

    def _log_joint_at(self, x: Tensor, components: Tensor) -> Tensor:
        """:meth:`log_joint_at` of checked, finite points (a training batch)."""
        self.flows.initialize(x)
        n, k = x.shape[0], self.n_components
        listed = torch.zeros(n, k, dtype=torch.bool, device=x.device)
        listed.scatter_(1, components, True)
        index, slot_weights = group_by_component(listed)
        log_prob = self.flows._log_prob_stacked(x[index])  # (K, M)
        filled = slot_weights > 0
        owner = torch.arange(k, device=x.device).unsqueeze(1).expand_as(index)
        dense = log_prob.new_zeros(n, k).index_put((index[filled], owner[filled]), log_prob[filled])
        return (dense + self.log_weights()).gather(1, components)

    def log_prob(self, x: Tensor) -> Tensor:
        """Mixture log density: x (N, D) -> (N,), nats; -inf at a point with an
        infinite coordinate, NaN at one with a NaN (with no NaN in any gradient)."""
        return self._at_points(x, lambda u: torch.logsumexp(self._log_joint(u), dim=1))

    def forward(self, x: Tensor) -> Tensor:
        """``mixture(x)`` is :meth:`log_prob`: (N, D) -> (N,), nats."""
        return self.log_prob(x)

    def posterior(self, x: Tensor) -> Tensor:
        """Exact log posterior log p(k | x): (N, D) -> (N, K); NaN at a point that is not
        finite (with no NaN in any gradient)."""
        return self._at_points(
            x, lambda u: torch.log_softmax(self._log_joint(u), dim=1), 1, at_infinity=math.nan
        )

    @torch.no_grad()
    def update_weights(self, mean_responsibility: Tensor) -> None:
        """Set pi to the given (K,) mean responsibilities (``"responsibilities"`` mode):
        finite, >= 0 and not all zero; normalised to sum to 1."""
        if self.weight_mode != "responsibilities":
            raise RuntimeError("update_weights needs weights='responsibilities'")
        logits = self.weight_logits
        try:
            weights = torch.as_tensor(mean_responsibility, dtype=logits.dtype, device=logits.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"mean_responsibility must be numbers: {exc}") from None
        if weights.shape != logits.shape:
            raise ValueError(
                f"mean_responsibility must have shape {tuple(logits.shape)}, one entry per "
                f"component, got {tuple(weights.shape)}"
            )
        if not (bool(torch.isfinite(weights).all()) and bool((weights >= 0).all())):
            raise ValueError("mean_responsibility must be finite and >= 0")
        if not bool(weights.sum() > 0):
            raise ValueError("mean_responsibility must not be all zero")
        logits.copy_(torch.log(weights.clamp_min(1e-12)))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw n points: components ~ Categorical(pi), then x ~ p_k. -> ((n, D), (n,))."""
        n = check_positive_int(n, "n", minimum=0)
        components = draw_components(self.log_weights(), n, generator)
        return self.flows.sample_components(components, generator), components
