r"""The variational mixture of flows as a Pyro model and guide.

Model: :math:`c \sim \mathrm{Categorical}(\pi)`, :math:`x \mid c \sim p_c` (a flow).
Guide: :math:`c \sim q(c \mid x)` (the amortised :class:`~vmonf.posterior.PosteriorNet`),
enumerated in parallel, so ``pyro.infer.TraceEnum_ELBO`` sums the ELBO exactly over
the K components, as :func:`vmonf.objectives.elbo` does. :func:`pyro_elbo` is that
independent oracle; :class:`PyroMixture` also trains with ``pyro.infer.SVI``.

All log densities are in nats.
"""

from __future__ import annotations

from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO
from torch import Tensor

from vmonf._validation import check_points, check_positive_int
from vmonf.estimator import VMoNF
from vmonf.flows import ComponentFlows
from vmonf.mixture import MixtureOfFlows
from vmonf.model import VariationalMixture
from vmonf.posterior import PosteriorNet
from vmonf.preprocessing import Standardizer

__all__ = ["FlowComponent", "PyroMixture", "from_estimator", "pyro_elbo"]

# A shape, as torch.distributions takes it (torch.types._size).
_Shape = torch.Size | list[int] | tuple[int, ...]


class FlowComponent(dist.TorchDistribution):
    r"""The density :math:`p_c(x)` of component flow ``c``, for a tensor of indices ``c``.

    ``batch_shape`` is ``c.shape`` and ``event_shape`` is ``(D,)``. :meth:`log_prob`
    evaluates all K flows once on the distinct points and gathers the entry of
    ``c``, broadcasting ``c`` against the points' batch shape, so Pyro's parallel
    enumeration (``c`` of shape ``(K, 1)`` against a plate of N points) works.

    Args:
        flows: the K component flows.
        component: integer indices in [0, K), any shape.
        standardizer: optional affine map applied to x first: the density is then
            :math:`p_c(\mathrm{std}(x)) |\det \mathrm{std}'|`, in the units of x.
        validate_args: as in ``torch.distributions``.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012 (torch API)
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        flows: ComponentFlows,
        component: Tensor,
        standardizer: Standardizer | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self.flows = flows
        self.component = torch.as_tensor(component, dtype=torch.long)
        k = flows.n_components
        # Checked on the CPU only: on a GPU the check would sync at every model call.
        if (
            self.component.numel()
            and self.component.device.type == "cpu"
            and bool((self.component.min() < 0) | (self.component.max() >= k))
        ):
            raise ValueError(f"component indices must lie in [0, {k})")
        self.standardizer = standardizer
        super().__init__(
            self.component.shape, torch.Size([flows.n_features]), validate_args=validate_args
        )

    def expand(self, batch_shape: _Shape, _instance: Any = None) -> FlowComponent:
        """The same distribution with ``c`` broadcast to ``batch_shape``."""
        batch_shape = torch.Size(batch_shape)
        return FlowComponent(
            self.flows,
            self.component.expand(batch_shape),
            self.standardizer,
            validate_args=self._validate_args,
        )

    def log_prob(self, value: Tensor) -> Tensor:
        """log p_c(x): value (..., D) -> broadcast(batch_shape, value.shape[:-1]), nats."""
        if self._validate_args:
            self._validate_sample(value)
        d = self.flows.n_features
        points = value.shape[:-1]
        u = value.reshape(-1, d)
        if self.standardizer is not None:
            u = self.standardizer(u).to(value.dtype)
        every = self.flows.log_prob(u).reshape(*points, self.flows.n_components)
        if self.standardizer is not None:
            every = every + self.standardizer.log_abs_det()
        shape = torch.broadcast_shapes(self.batch_shape, points)
        index = self.component.to(every.device).expand(shape).unsqueeze(-1)
        return every.expand(*shape, every.shape[-1]).gather(-1, index).squeeze(-1)

    def rsample(self, sample_shape: _Shape = torch.Size()) -> Tensor:  # noqa: B008
        """Draw x ~ p_c (differentiable in the flows' weights): -> sample_shape + batch + (D,)."""
        shape = self._extended_shape(sample_shape)
        components = self.component.expand(shape[:-1]).reshape(-1)
        x = self.flows.sample_components(components)
        if self.standardizer is not None:
            x = self.standardizer.inverse(x).to(x.dtype)
        return x.reshape(shape)

    def sample(self, sample_shape: _Shape = torch.Size()) -> Tensor:  # noqa: B008
        """Draw x ~ p_c without gradients: -> sample_shape + batch_shape + (D,)."""
        with torch.no_grad():
            return self.rsample(sample_shape)


class PyroMixture:
    """Pyro ``model`` and ``guide`` of a :class:`~vmonf.model.VariationalMixture`.

    Both take ``x`` of shape (N, D) and an optional posterior ``temperature``
    (default: the one stored in the posterior net; the model ignores it). The
    modules are registered with ``pyro.module`` under ``f"{name}_mixture"`` and
    ``f"{name}_posterior"``: clear the param store (``pyro.clear_param_store()``)
    between different models that share a name.

    Args:
        vm: the mixture and its amortised posterior; its parameters are used in place.
        standardizer: if given, ``x`` is in the user's units: it is standardised
            before the flows and the posterior, and the flows' densities include
            the standardiser's log-determinant (see :func:`from_estimator`).
        name: prefix of the param-store names.
    """

    def __init__(
        self,
        vm: VariationalMixture,
        standardizer: Standardizer | None = None,
        name: str = "vmonf",
    ) -> None:
        self.vm = vm
        self.standardizer = standardizer
        self.name = name

    def _check(self, x: Tensor) -> None:
        dtype = next(self.vm.parameters()).dtype
        check_points(x, self.vm.mixture.flows.n_features, dtype, computed_by="mixture")
        if x.shape[0] == 0:  # a plate of size 0 fails inside Pyro (ZeroDivisionError)
            raise ValueError(f"x must hold at least one point, got shape {tuple(x.shape)}")

    def model(
        self, x: Tensor | None = None, temperature: float | None = None, *, n: int | None = None
    ) -> None:
        """p(x, c) = pi_c p_c(x) for x (N, D) observed, c latent, one per point; or, with
        ``x=None`` and ``n``, generative: n pairs (c, x) drawn from the mixture (e.g.
        ``pyro.infer.Predictive(pm.model, num_samples=1)(None, n=500)``)."""
        if x is None:
            if n is None:
                raise ValueError("model(None) draws points: give their number, n")
            size = check_positive_int(n, "n")
        else:
            if n is not None:
                raise ValueError("give x (observed) or n (points to draw), not both")
            self._check(x)
            size = x.shape[0]
        # pyro.module returns the module it registers (its stub: any nn.Module).
        mixture = cast(MixtureOfFlows, pyro.module(f"{self.name}_mixture", self.vm.mixture))
        log_pi = mixture.log_weights()
        with pyro.plate("data", size, dim=-1):
            c = pyro.sample("c", dist.Categorical(logits=log_pi))
            pyro.sample("x", FlowComponent(mixture.flows, c, self.standardizer), obs=x)

    def guide(self, x: Tensor, temperature: float | None = None) -> None:
        """q(c | x) at ``temperature``, enumerated in parallel over the K components."""
        self._check(x)
        posterior = cast(PosteriorNet, pyro.module(f"{self.name}_posterior", self.vm.posterior))
        u = x if self.standardizer is None else self.standardizer(x).to(x.dtype)
        with pyro.plate("data", x.shape[0], dim=-1):
            log_q = posterior(u, temperature)
            pyro.sample("c", dist.Categorical(logits=log_q), infer={"enumerate": "parallel"})


def pyro_elbo(
    vm: VariationalMixture | PyroMixture, x: Tensor, temperature: float | None = None
) -> Tensor:
    """Mean ELBO per point (scalar, nats) by Pyro's ``TraceEnum_ELBO``.

    An independent oracle of ``VariationalMixture.elbo(x).mean()``; differentiable
    (``differentiable_loss``) unless gradients are disabled. The global param
    store is left untouched (the computation runs in a fresh scope).

    Args:
        vm: a :class:`VariationalMixture` (x in its own units) or a :class:`PyroMixture`.
        x: (N, D) data.
        temperature: posterior softmax temperature (default: the stored one).
    """
    pm = vm if isinstance(vm, PyroMixture) else PyroMixture(vm)
    loss = TraceEnum_ELBO(max_plate_nesting=1)
    with pyro.get_param_store().scope():
        if torch.is_grad_enabled() and any(p.requires_grad for p in pm.vm.parameters()):
            value = loss.differentiable_loss(pm.model, pm.guide, x, temperature)
        else:  # differentiable_loss refuses a loss without a graph (no_grad, frozen)
            value = torch.as_tensor(
                loss.loss(pm.model, pm.guide, x, temperature), dtype=x.dtype, device=x.device
            )
    return -value / x.shape[0]


def from_estimator(est: VMoNF, name: str = "vmonf") -> PyroMixture:
    """The :class:`PyroMixture` of a fitted :class:`~vmonf.estimator.VMoNF`.

    Works in the **user's units**: x is standardised with ``est.standardizer_``
    inside the model and guide, and the standardiser's log-determinant is added to
    every flow density, so ``pyro_elbo(from_estimator(est), x)`` equals
    ``est.elbo(X, top_k=None).mean()``, the ELBO over all K components (``est.elbo(X)``
    too, unless the fit used ``elbo_top_k``). x must have the estimator's dtype and
    device.
    """
    if not isinstance(est, VMoNF):
        raise TypeError(f"from_estimator needs a VMoNF, got {type(est).__name__}")
    if not hasattr(est, "model_") or not hasattr(est, "standardizer_"):
        raise ValueError("from_estimator needs a fitted VMoNF (call fit first)")
    return PyroMixture(est.model_, est.standardizer_, name)
