"""``ComponentFlows``: K affine-coupling flows evaluated as one batched computation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from nflows.distributions.normal import StandardNormal
from torch import Tensor, nn

from vmonf._validation import (
    check_bool,
    check_choice,
    check_points,
    check_positive_float,
    check_positive_int,
)
from vmonf.coupling import (
    ACTIVATIONS,
    ActNorm,
    AffineCoupling,
    LULinear,
    coupling_forward,
    plain_autograd_on,
)

__all__ = [
    "SAMPLE_CHUNK",
    "ComponentFlows",
    "alternating_masks",
    "at_finite_points",
    "check_components",
    "group_by_component",
    "rank_within_groups",
    "sample_by_component",
]

# Points drawn per batched inverse pass: bounds sampling memory at any n.
SAMPLE_CHUNK = 65536

# What ComponentFlows.layers holds.
_Layer = ActNorm | LULinear | AffineCoupling


MIN_BASE_DF = torch.finfo(torch.float32).tiny
# Beyond it the Student-t base is the standard normal to within float32's precision:
# base_df=None is that limit, computed exactly.
MAX_BASE_DF = 1e6
# log1p(t^2) is computed as 2 log|t| beyond it (t^2 overflows float32 at |t| ~ 1.8e19).
_LARGE_T = 1e18


def student_t_log_prob(z: Tensor, df: float) -> Tensor:
    """Log-density of independent standard Student-t coordinates: (..., D) -> (...), nats."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # log1p(t^2) keeps full precision for small t (large df, where it is multiplied by
    # (df + 1) / 2); where t^2 would overflow, it is 2 log|t| (the density, about
    # -(df + 1) log|t|, is still far inside float32's range). Both branches get finite
    # inputs, so neither sends a NaN gradient through the other.
    t = z / math.sqrt(df)
    large = t.abs() > _LARGE_T
    t_small = torch.where(large, 0.0, t)
    log1p_t2 = torch.where(
        large, 2.0 * torch.log(t.abs().clamp_min(1.0)), torch.log1p(t_small * t_small)
    )
    return z.shape[-1] * log_norm - (df + 1) / 2 * log1p_t2.sum(-1)


def student_t_sample(
    shape: tuple[int, ...], df: float, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Standard Student-t draws ``normal / sqrt(chi2_df / df)`` of ``like``'s dtype/device.

    torch's gamma sampler takes no generator, so with one the chi-square draws use a
    forked global RNG seeded from it: the same generator state gives the same points.
    """
    normal = torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    chi2 = torch.distributions.Chi2(torch.tensor(df, dtype=like.dtype, device=like.device))
    if generator is None:
        squares = chi2.sample(shape)
    else:
        seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
        cuda = range(torch.cuda.device_count()) if like.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # manual_seed reseeds every device
            torch.manual_seed(seed)
            squares = chi2.sample(shape)
    return normal * torch.rsqrt(squares / df)


def alternating_masks(n_features: int, n_layers: int) -> list[Tensor]:
    """Masks for ``n_layers`` couplings: odd/even features alternate being transformed.

    For one feature there is nothing to condition on; use ``n_features >= 2``.
    """
    parity = torch.arange(n_features) % 2
    return [(parity == (layer % 2)).to(torch.int64) for layer in range(n_layers)]


def rank_within_groups(groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Position of every element among the elements of its group, in order.

    groups (n,) int in [0, n_groups) -> ranks (n,) and counts per group (n_groups,).
    """
    counts = torch.bincount(groups, minlength=n_groups)
    order = torch.argsort(groups, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(groups.numel(), device=groups.device) - starts[groups[order]]
    return rank, counts


def group_by_component(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Stack each component's weighted points: (N, K) weights -> index, slot weights (K, M).

    ``index[k, j]`` is the j-th point with ``weights[:, k] > 0`` and ``slot_weights[k, j]``
    its weight; M is the largest such count and the slots past a component's count
    hold point 0 with weight 0.
    """
    n_components = weights.shape[1]
    point, component = (weights > 0).nonzero(as_tuple=True)
    rank, counts = rank_within_groups(component, n_components)
    m = int(counts.max()) if point.numel() else 0
    index = torch.zeros(n_components, m, dtype=torch.long, device=weights.device)
    index[component, rank] = point
    slot_weights = weights.new_zeros(n_components, m)
    slot_weights[component, rank] = weights[point, component]
    return index, slot_weights


def check_components(
    components: object, n_components: int, device: torch.device, name: str = "components"
) -> Tensor:
    """``components`` as a 1-D int64 tensor on ``device`` of indices in [0, n_components);
    floats must be whole numbers (TypeError otherwise, not a silent truncation)."""
    given = torch.as_tensor(components, device=device)
    if given.is_floating_point() and not bool((given == given.round()).all()):
        raise TypeError(f"{name} must hold integer component indices, got {given.dtype} values")
    components = given.long()
    if components.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(components.shape)}")
    if components.numel() and (components.min() < 0 or components.max() >= n_components):
        raise ValueError(f"{name} must lie in [0, {n_components})")
    return components


def sample_by_component(
    sample: Callable[[int], Tensor], components: Tensor, n_components: int
) -> Tensor:
    """One point of component ``components[i]`` for each i: (n,) -> (n, D).

    ``sample(m)`` draws m points of every component, (K, m, D). Points are drawn
    ``SAMPLE_CHUNK`` at a time, each chunk as one batched call over K x (its largest
    count) slots, into one preallocated output: memory stays bounded (under
    ``torch.no_grad()``; with gradients recorded, as a differentiable sample needs, every
    chunk's graph is kept for the backward) and the cost is about that of n points when
    the counts are balanced.
    """
    out: Tensor | None = None
    for start in range(0, components.numel(), SAMPLE_CHUNK):
        chunk = components[start : start + SAMPLE_CHUNK]
        rank, counts = rank_within_groups(chunk, n_components)
        x = sample(int(counts.max()))[chunk, rank]
        if out is None:
            out = x.new_empty((components.numel(), *x.shape[1:]))
        out[start : start + chunk.numel()] = x
    return out if out is not None else sample(0)[components, components]


def at_finite_points(
    x: Tensor,
    compute: Callable[[Tensor], Tensor],
    component_axis: int | None = None,
    at_infinity: float = -math.inf,
) -> Tensor:
    """``compute(x)`` where a point is finite, ``at_infinity`` where it has an infinite
    coordinate (-inf for a log density: a density vanishes at infinity) and NaN where it
    has a NaN one.

    x (..., D); ``compute`` maps it to one value per point, of shape (...), or per
    point and component, with the component axis at ``component_axis``. ``compute``
    only ever sees finite points (the others are set to 0), so no NaN reaches a
    gradient.
    """
    finite = torch.isfinite(x).all(-1)
    # The masking adds ~0.1 ms of forward and backward work at a step's batch size:
    # skipped when a CPU tensor says there is nothing to mask. Not on a GPU, where the
    # check would wait for the device, nor under torch.compile or the torch.func
    # transforms (plain_autograd), whose graphs cannot branch on a value.
    traced = torch.compiler.is_compiling() or plain_autograd_on()
    if x.device.type == "cpu" and not traced and bool(finite.all()):
        return compute(x)
    missing = torch.isnan(x).any(-1)
    out = compute(torch.where(finite.unsqueeze(-1), x, 0.0))
    if component_axis is not None:
        finite, missing = finite.unsqueeze(component_axis), missing.unsqueeze(component_axis)
    return out.masked_fill(~finite, at_infinity).masked_fill(missing, torch.nan)


class _InverseOf(nn.Module):
    """A :class:`ComponentFlows`' inverse as a module's forward, for
    ``torch.func.functional_call`` (which calls forward)."""

    def __init__(self, flows: ComponentFlows) -> None:
        super().__init__()
        self.flows = flows

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.flows._inverse(z)


class ComponentFlows(nn.Module):
    """K normalizing flows with separate weights, evaluated together.

    Each flow is ``n_layers`` :class:`~vmonf.coupling.AffineCoupling` layers with
    alternating masks (optionally preceded by ActNorm). All tensors flowing
    through carry a leading component axis K.

    Args:
        n_features: data dimension D (>= 2).
        n_components: number of flows K.
        n_layers: coupling layers per flow.
        hidden_features: width of each conditioner MLP.
        n_hidden_layers: hidden layers of each conditioner MLP.
        activation: conditioner non-linearity, one of ``ACTIVATIONS``.
        max_log_scale: bound c on each layer's log-scale, c * tanh(u / c).
        actnorm: put an ActNorm layer before every coupling.
        linear: put a learnable invertible linear map (:class:`LULinear`) before
            every coupling, so each flow can orient the axes its couplings split.
        base_df: None for the standard normal base N(0, I); a number for independent
            standard Student-t base coordinates with ``base_df`` degrees of freedom.
            Coupling flows keep their base's tails, so a Gaussian base gives points
            beyond the training data (far along a curling spiral, say) vanishing
            density; a Student-t base keeps that penalty polynomial.
    """

    def __init__(
        self,
        n_features: int,
        n_components: int = 1,
        n_layers: int = 8,
        hidden_features: int = 64,
        n_hidden_layers: int = 2,
        activation: str = "relu",
        max_log_scale: float = 3.0,
        actnorm: bool = False,
        linear: bool = False,
        base_df: float | None = None,
    ) -> None:
        super().__init__()
        self.n_features = check_positive_int(n_features, "n_features", minimum=2)
        self.n_components = check_positive_int(n_components, "n_components")
        self.n_layers = check_positive_int(n_layers, "n_layers")
        self.hidden_features = check_positive_int(hidden_features, "hidden_features")
        self.n_hidden_layers = check_positive_int(n_hidden_layers, "n_hidden_layers", minimum=0)
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        self.max_log_scale = check_positive_float(max_log_scale, "max_log_scale")
        self.actnorm = check_bool(actnorm, "actnorm")
        self.linear = check_bool(linear, "linear")
        self.base_df = check_positive_float(base_df, "base_df", allow_none=True)
        if self.base_df is not None and self.base_df < MIN_BASE_DF:
            # Below it a float32 df rounds to a subnormal or zero, which the
            # chi-square sampler refuses, long after the fit.
            raise ValueError(
                f"base_df must be >= {MIN_BASE_DF:.4g} (float32's smallest normal number), "
                f"got {self.base_df:g}"
            )
        if self.base_df is not None and self.base_df > MAX_BASE_DF:
            raise ValueError(
                f"base_df must be <= {MAX_BASE_DF:g}, got {self.base_df:g}: beyond it the "
                "Student-t base is the standard normal, which base_df=None gives exactly"
            )
        layers: list[nn.Module] = []
        for mask in alternating_masks(self.n_features, self.n_layers):
            if self.actnorm:
                layers.append(ActNorm(self.n_components, self.n_features))
            if self.linear:
                layers.append(LULinear(self.n_components, self.n_features))
            layers.append(
                AffineCoupling(
                    self.n_components,
                    mask,
                    self.hidden_features,
                    self.n_hidden_layers,
                    self.activation,
                    self.max_log_scale,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.base = StandardNormal([self.n_features])

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments as plain data (for checkpoints)."""
        return {
            "n_features": self.n_features,
            "n_components": self.n_components,
            "n_layers": self.n_layers,
            "hidden_features": self.hidden_features,
            "n_hidden_layers": self.n_hidden_layers,
            "activation": self.activation,
            "max_log_scale": self.max_log_scale,
            "actnorm": self.actnorm,
            "linear": self.linear,
            "base_df": self.base_df,
        }

    @property
    def _reference(self) -> Tensor:
        return next(self.parameters())

    def _check(self, x: Tensor, name: str, stacked: bool = True) -> None:
        """x (N, D) in the flows' dtype, or with ``stacked`` also (K, N, D)."""
        check_points(
            x, self.n_features, self._reference.dtype, name,
            computed_by="flows", n_components=self.n_components if stacked else None,
        )  # fmt: skip

    def _stack(self, x: Tensor) -> Tensor:
        return x.expand(self.n_components, *x.shape) if x.dim() == 2 else x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data -> noise through every flow.

        Args:
            x: (N, D), shared by all components, or (K, N, D).
        Returns:
            z of shape (K, N, D) and log|det dz/dx| of shape (K, N), nats.
        """
        self._check(x, "x")
        return self._forward(self._stack(x))

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Noise -> data through every flow.

        Args:
            z: (N, D), shared by all components, or (K, N, D).
        Returns:
            x of shape (K, N, D) and log|det dx/dz| of shape (K, N), nats.
        """
        self._check(z, "z")
        return self._inverse(self._stack(z))

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of each flow at each point: x (N, D) -> (N, K), nats.

        A point with an infinite coordinate has log density -inf (as in
        ``torch.distributions``); one with a NaN coordinate, NaN.
        """
        self.initialize(x)  # checks x; ActNorm starts from the points as given
        return at_finite_points(x, self._log_prob, component_axis=1)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logabsdet: Tensor | None = None
        for run in self._runs:
            if isinstance(run[0], AffineCoupling):  # then the whole run is couplings
                x, run_logabsdet = coupling_forward(cast(list[AffineCoupling], run), x)
            else:
                x, run_logabsdet = run[0](x)
            logabsdet = run_logabsdet if logabsdet is None else logabsdet + run_logabsdet
        assert logabsdet is not None
        return x, logabsdet

    @property
    def _runs(self) -> list[list[nn.Module]]:
        """The layers in order, consecutive couplings grouped (one autograd node each)."""
        runs: list[list[nn.Module]] = []
        for layer in self.layers:
            if (
                isinstance(layer, AffineCoupling)
                and runs
                and isinstance(runs[-1][-1], AffineCoupling)
            ):
                runs[-1].append(layer)
            else:
                runs.append([layer])
        return runs

    def _inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        layers = cast(Sequence[_Layer], self.layers)
        z, logabsdet = layers[-1].inverse(z)
        for layer in reversed(layers[:-1]):
            z, layer_logabsdet = layer.inverse(z)
            logabsdet = logabsdet + layer_logabsdet
        return z, logabsdet

    def initialize(self, x: Tensor) -> None:
        """Run pending data-dependent initialisations (ActNorm, training mode) on the
        points x (N, D), seen by every flow; a no-op once done."""
        self._check(x, "x", stacked=False)
        self._initialize_pending(self._stack(x))

    def _initialize_pending(self, xs: Tensor) -> None:
        """:meth:`initialize` on xs (K, N, D) as given: before any masking of
        non-finite points, so that ActNorm refuses them instead of starting from 0s."""
        if self.training and any(
            isinstance(layer, ActNorm) and not bool(layer.initialized) for layer in self.layers
        ):
            with torch.no_grad():
                self._forward(xs)

    def log_prob_stacked(self, xs: Tensor) -> Tensor:
        """Log density of flow k at the points xs[k]: (K, M, D) -> (K, M), nats.

        Each flow sees only its own slice (e.g. the points it owns in competitive
        training), so K flows on M points each cost one flow on K x M points. Points
        with an infinite coordinate get -inf, with a NaN one NaN (as :meth:`log_prob`).
        """
        self._check(xs, "xs")
        if xs.dim() != 3:
            raise ValueError(
                f"xs must have shape ({self.n_components}, M, {self.n_features}), "
                f"got {tuple(xs.shape)}"
            )
        self._initialize_pending(xs)
        return at_finite_points(xs, self._log_prob_stacked)

    def _log_prob_stacked(self, xs: Tensor) -> Tensor:
        z, logabsdet = self._forward(xs)
        k, m, d = z.shape
        return self._base_log_prob(z.reshape(k * m, d)).reshape(k, m) + logabsdet

    def _base_log_prob(self, z: Tensor) -> Tensor:
        """(M, D) -> (M,), nats."""
        if self.base_df is None:
            return self.base.log_prob(z)
        return student_t_log_prob(z, self.base_df)

    def _log_prob(self, x: Tensor) -> Tensor:
        return self._log_prob_stacked(self._stack(x)).transpose(0, 1)

    def _base_sample(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        ref, full_shape = self._reference, (*shape, self.n_features)
        if self.base_df is not None:
            return student_t_sample(full_shape, self.base_df, ref, generator)
        return torch.randn(full_shape, generator=generator, dtype=ref.dtype, device=ref.device)

    def sample(
        self, n: int, component: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``n`` points from one flow, (n, D), at the cost of that flow alone, or
        from every flow, (K, n, D); differentiable in the flows' weights when
        gradients are recorded."""
        n = check_positive_int(n, "n", minimum=0)
        if component is None:
            return self._inverse(self._base_sample((self.n_components, n), generator))[0]
        component = check_positive_int(component, "component", minimum=0)
        if component >= self.n_components:
            raise ValueError(f"component must be < {self.n_components}, got {component}")
        return self._inverse_one(self._base_sample((1, n), generator), component)[0][0]

    def _inverse_one(self, z: Tensor, component: int) -> tuple[Tensor, Tensor]:
        """Noise -> data through flow ``component`` alone: z (1, n, D) -> x (1, n, D),
        logabsdet (1, n); the cost of one flow, not K. Every parameter has the component
        axis first, so the flow is the K flows run on slices [component:component + 1]."""
        params = {
            f"flows.{name}": p[component : component + 1] for name, p in self.named_parameters()
        }
        return torch.func.functional_call(_InverseOf(self), params, (z,))

    def sample_components(
        self, components: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One point from flow ``components[i]`` for each i: (n,) int -> (n, D).

        Streams in chunks of ``SAMPLE_CHUNK`` points (see :func:`sample_by_component`).
        Differentiable in the flows' weights (a reparameterised sample) when gradients
        are recorded; draw many points under ``torch.no_grad()``, as the estimators do.
        """
        components = check_components(components, self.n_components, self._reference.device)
        return self._sample_components(components, generator)

    def _sample_components(self, components: Tensor, generator: torch.Generator | None) -> Tensor:
        def sample(m: int) -> Tensor:
            return self._inverse(self._base_sample((self.n_components, m), generator))[0]

        return sample_by_component(sample, components, self.n_components)
