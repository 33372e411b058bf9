r"""Affine coupling layers batched over K mixture components.

Every module here acts on a stack of K independent flows at once: inputs have
shape (K, N, D) and each component k has its own weights, stored as tensors of
shape (K, ...) and applied with batched matrix products. One call evaluates all K
flows, so a mixture costs about one batched computation, not K Python calls.
The conditioner MLPs and the data -> noise coupling carry hand-written backward
passes (fewer autograd nodes and allocations; see ``benchmarks/speed.py``). Higher
derivatives (``create_graph=True``, ``torch.autograd.functional.hessian``, gradient
penalties) differentiate a plain-autograd recomputation instead; ``torch.func``
transforms and vectorised ``torch.autograd.functional`` calls need :func:`plain_autograd`.

Conventions follow nflows' ``Transform``: ``forward`` maps data to noise and
returns ``(outputs, logabsdet)``; ``inverse`` maps noise to data. The layers are not
drop-in nflows transforms, though: they act on (K, N, D) stacks and return a
logabsdet of shape (K, N), which nflows' ``CompositeTransform`` does not expect.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from itertools import pairwise
from typing import NamedTuple, Protocol, cast

import torch
import torch.nn.functional as F
from nflows.transforms.base import Transform
from torch import Tensor, nn

from vmonf._validation import check_choice
from vmonf.distributed import all_reduce_sum

__all__ = [
    "ACTIVATIONS",
    "ActNorm",
    "AffineCoupling",
    "BatchedMLP",
    "LULinear",
    "bounded_log_scale",
    "plain_autograd",
    "plain_autograd_on",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def _tanh_(x: Tensor) -> Tensor:
    r"""In-place tanh. On CPU as :math:`2\sigma(2x) - 1`: torch 2.13's CPU ``tanh`` kernel is
    about 3.5x slower than these four in-place ops ((5, 512, 64) float32: 0.90 ms against
    0.25 ms); the two differ by at most 2e-7 (float32) and 4e-16 (float64)."""
    if x.device.type != "cpu":
        return x.tanh_()
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


class _Activation(NamedTuple):
    """An activation for :class:`_StackedMLP`: ``forward(z) -> y`` (may overwrite z) and
    ``backward(grad_y, saved) -> grad_z`` (may overwrite grad_y), where ``saved`` is y,
    or z when ``needs_input``; ``plain`` computes y out of place, for autograd."""

    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]
    plain: Callable[[Tensor], Tensor]
    needs_input: bool = False


_aten = torch.ops.aten
# Gradients from the output, written in place (out= the incoming gradient); SiLU's
# derivative needs its input. Slopes match the ACTIVATIONS modules' defaults.
_ACTIVATION_OPS: dict[str, _Activation] = {
    "relu": _Activation(
        torch.relu_,
        lambda g, y: _aten.threshold_backward.grad_input(g, y, 0.0, grad_input=g),
        ACTIVATIONS["relu"](),
    ),
    "tanh": _Activation(
        _tanh_,
        lambda g, y: _aten.tanh_backward.grad_input(g, y, grad_input=g),
        ACTIVATIONS["tanh"](),
    ),
    "elu": _Activation(
        F.elu_,
        lambda g, y: _aten.elu_backward.grad_input(g, 1.0, 1.0, 1.0, True, y, grad_input=g),
        ACTIVATIONS["elu"](),
    ),
    "leaky_relu": _Activation(
        lambda z: F.leaky_relu_(z, 0.01),
        lambda g, y: _aten.leaky_relu_backward.grad_input(g, y, 0.01, True, grad_input=g),
        ACTIVATIONS["leaky_relu"](),
    ),
    "silu": _Activation(F.silu, _aten.silu_backward, ACTIVATIONS["silu"](), needs_input=True),
}

# True within plain_autograd(): the fused Functions are bypassed.
_PLAIN_AUTOGRAD: ContextVar[bool] = ContextVar("vmonf_plain_autograd", default=False)


@contextmanager
def plain_autograd() -> Iterator[None]:
    """Within the block, couplings and conditioner MLPs run as plain autograd ops instead
    of the fused nodes with hand-written backwards: slower (more nodes, no in-place
    activations), but every ``torch.func`` transform (``jacrev``, ``vmap``,
    ``hessian``) works through them, as does ``torch.autograd.functional``'s
    ``vectorize=True``. Plain ``torch.autograd`` needs no such block: its higher
    derivatives (``create_graph=True``) are exact either way. Not read under
    ``torch.compile``, which traces the fused nodes."""
    token = _PLAIN_AUTOGRAD.set(True)
    try:
        yield
    finally:
        _PLAIN_AUTOGRAD.reset(token)


def plain_autograd_on() -> bool:
    """Whether :func:`plain_autograd` is on; never read under ``torch.compile`` (dynamo
    cannot trace a ContextVar: every read would break the graph)."""
    return not torch.compiler.is_compiling() and _PLAIN_AUTOGRAD.get()


def _differentiable_backward(
    forward: Callable[..., Tensor | tuple[Tensor, ...]],
    inputs: Sequence[Tensor],
    grads: Sequence[Tensor],
    needs_input_grad: Sequence[bool],
) -> list[Tensor | None]:
    """A fused node's backward as differentiable ops, for when it is itself
    differentiated (``create_graph=True``): ``forward`` recomputed with plain autograd
    ops from the node's own (graph-connected) ``inputs``, then differentiated."""
    wanted = [t for t, needed in zip(inputs, needs_input_grad, strict=True) if needed]
    with torch.enable_grad():
        outputs = forward(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    found = iter(
        torch.autograd.grad(outputs, wanted, tuple(grads), create_graph=True, allow_unused=True)
    )
    return [next(found) if needed else None for needed in needs_input_grad]


NARROW = 8


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b; a result with at most ``NARROW`` columns is computed as
    (b^T a^T)^T, the orientation in which MKL's batched GEMM is 2-6x faster."""
    if b.shape[-1] <= NARROW < a.shape[-2]:
        b_t, a_t = b.mT, a.mT
        if not (b_t.is_contiguous() or a_t.is_contiguous()):
            # Both transposed (a layer's output weight times its input): the narrow
            # factor copied is cheap, and (5, 2, 64) @ (5, 64, 512) then takes 0.4x the time.
            b_t = b_t.contiguous()
        return torch.bmm(b_t, a_t).mT
    return torch.bmm(a, b)


def _affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ weight + bias, (K, N, in) -> (K, N, out), a fresh tensor."""
    if x.shape[-1] == 1:  # an outer product: one broadcast op beats a GEMM
        return torch.addcmul(bias, x, weight)
    if weight.shape[-1] <= NARROW:
        return (_bmm(x, weight) + bias).contiguous()
    return torch.baddbmm(bias, x, weight)


def _mlp_forward(
    act: _Activation,
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    in_place: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``h = act(h @ W_i + b_i)`` for every layer but the last, activations in place
    (``in_place=False``: out of place, so that autograd can differentiate it).

    Returns the output and what :func:`_mlp_backward` needs: each layer's input and
    what the activation's derivative reads (its output, or its input if ``needs_input``).
    """
    inputs, act_saved = [x], []
    h = x
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
        z = _affine(h, weight, bias)
        h = act.forward(z) if in_place else act.plain(z)
        inputs.append(h)
        act_saved.append(z if act.needs_input else h)
    return _affine(h, weights[-1], biases[-1]), inputs, act_saved


def _mlp_backward(
    act: _Activation,
    grad: Tensor,
    inputs: Sequence[Tensor],
    act_saved: Sequence[Tensor],
    weights: Sequence[Tensor],
    input_grad: bool,
) -> tuple[Tensor | None, list[Tensor]]:
    """Backward of :func:`_mlp_forward`: -> (gradient of x or None, [dW_0, db_0, dW_1, ...]).

    Per layer two batched GEMMs in the faster orientation (:func:`_bmm`), the bias sum,
    and the activation's derivative written into the incoming gradient.
    """
    n = len(weights)
    params: list[Tensor] = []
    for i in range(n - 1, -1, -1):  # gathered last layer first, bias before weight
        params += [grad.sum(1, keepdim=True), _bmm(inputs[i].mT, grad)]
        if i > 0:
            grad = act.backward(_bmm(grad, weights[i].mT), act_saved[i - 1])
    grad_x = _bmm(grad, weights[0].mT) if input_grad else None
    return grad_x, params[::-1]


class _AutogradContext(torch.autograd.function.FunctionCtx):
    """The ``ctx`` autograd passes to a Function's forward and backward, with the fields
    torch sets on it that its stubs leave out (never instantiated: a type for annotations)."""

    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]


class _StackedMLPContext(_AutogradContext):
    """What :class:`_StackedMLP`'s forward stores on its ctx."""

    activation: str
    n_layers: int


class _StackedMLP(torch.autograd.Function):
    """K stacked MLPs with a hand-written backward: one autograd node per MLP.

    Against the layer-by-layer autograd graph this drops two nodes and one
    (K, N, width) allocation per hidden layer: a training step of a K = 5, 64-wide
    2-D flow mixture took 0.88x the time.
    """

    @staticmethod
    def forward(ctx: _StackedMLPContext, activation: str, x: Tensor, *params: Tensor) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        out, inputs, act_saved = _mlp_forward(_ACTIVATION_OPS[activation], x, weights, biases)
        ctx.activation, ctx.n_layers = activation, len(weights)
        ctx.save_for_backward(*inputs, *act_saved, *params)
        return out

    @staticmethod
    def backward(ctx: _StackedMLPContext, grad: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.n_layers
        saved = ctx.saved_tensors
        params = saved[2 * n - 1 :]
        if torch.is_grad_enabled():  # create_graph=True: this backward is differentiated
            return (
                None,
                *_differentiable_backward(
                    partial(_plain_mlp, ctx.activation),
                    (saved[0], *params),
                    (grad,),
                    ctx.needs_input_grad[1:],
                ),
            )
        grad_x, grad_params = _mlp_backward(
            _ACTIVATION_OPS[ctx.activation],
            grad,
            saved[:n],
            saved[n : 2 * n - 1],
            params[0::2],
            ctx.needs_input_grad[1],
        )
        return (None, grad_x, *grad_params)


def _plain_mlp(activation: str, x: Tensor, *params: Tensor) -> Tensor:
    """:class:`_StackedMLP`'s forward as plain autograd ops."""
    out, _, _ = _mlp_forward(
        _ACTIVATION_OPS[activation], x, params[0::2], params[1::2], in_place=False
    )
    return out


def bounded_log_scale(raw: Tensor, bound: float) -> Tensor:
    r"""Soft-clamp a raw log-scale to (-bound, bound): :math:`c \tanh(u / c)`.

    Unlike nflows' ``sigmoid(u + 2) + 1e-3`` scale (always < 1.001, so a layer can
    only contract data towards noise), this lets each layer expand or contract by
    up to ``exp(bound)`` while keeping the gradient of an unsaturated scale at 1.
    """
    return bound * torch.tanh(raw / bound)


class _CouplingSpec(NamedTuple):
    """What :class:`_CouplingStack` needs of one coupling besides its parameters."""

    layout: str | None  # see _as_blocks; None: split by index permutations
    n_identity: int
    n_params: int  # conditioner weights and biases
    bound: float  # max_log_scale
    activation: str
    split_idx: Tensor  # cat([identity_idx, transform_idx]) (used when layout is None)
    unsplit_idx: Tensor  # its inverse permutation


def _split(x: Tensor, spec: _CouplingSpec) -> tuple[Tensor, Tensor]:
    """(K, N, D) -> identity (K, N, D_i), transformed (K, N, D_t). Its adjoint is
    :func:`_join` (both are permutations of the features)."""
    n_rest = x.shape[-1] - spec.n_identity
    if spec.layout == "transform_first":
        transformed, identity = x.split([n_rest, spec.n_identity], -1)
        return identity, transformed
    if spec.layout is None:
        x = x.index_select(-1, spec.split_idx)
    identity, transformed = x.split([spec.n_identity, n_rest], -1)
    return identity, transformed


def _join(identity: Tensor, transformed: Tensor, spec: _CouplingSpec) -> Tensor:
    """Inverse (and adjoint) of :func:`_split`."""
    if spec.layout == "transform_first":
        return torch.cat([transformed, identity], dim=-1)
    joined = torch.cat([identity, transformed], dim=-1)
    return joined if spec.layout is not None else joined.index_select(-1, spec.unsplit_idx)


def _stack_forward(
    specs: Sequence[_CouplingSpec],
    x: Tensor,
    params: Sequence[Tensor],
    keep: list[Tensor] | None,
    in_place: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""Data -> noise through consecutive couplings; ``keep`` collects what the backward
    reads (None: nothing kept, for evaluation without gradients, or with ``in_place=False``
    as plain autograd ops). Per coupling:

    .. math:: s = c \tanh(u / c), \quad z_t = x_t e^{s} + t, \quad \log|\det| = \textstyle\sum s,

    with ``[t, u]`` the conditioner's output on the identity features.
    """
    logabsdet: Tensor | None = None
    offset = 0
    for spec in specs:
        layer_params = params[offset : offset + spec.n_params]
        offset += spec.n_params
        identity, transformed = _split(x, spec)
        out, inputs, act_saved = _mlp_forward(
            _ACTIVATION_OPS[spec.activation],
            identity,
            layer_params[0::2],
            layer_params[1::2],
            in_place,
        )
        shift, raw = out.chunk(2, dim=-1)
        log_scale = bounded_log_scale(raw, spec.bound)
        scale = log_scale.exp()
        x = _join(identity, torch.addcmul(shift, transformed, scale), spec)
        layer_logabsdet = log_scale.sum(-1)
        logabsdet = layer_logabsdet if logabsdet is None else logabsdet + layer_logabsdet
        if keep is not None:
            keep += [transformed, log_scale, scale, *inputs, *act_saved]
    assert logabsdet is not None
    return x, logabsdet


class _CouplingStackContext(_AutogradContext):
    """What :class:`_CouplingStack`'s forward stores on its ctx."""

    specs: tuple[_CouplingSpec, ...]


class _CouplingStack(torch.autograd.Function):
    """Consecutive couplings, data -> noise, as one autograd node with a hand-written
    backward (:func:`_stack_forward` forward; per coupling the chain rule through the
    scale, one :func:`_mlp_backward`, and the split and join permuted back).

    Against one node per conditioner and per affine step (and the split, join and
    log-det sums between them), a K = 5, 64-wide 2-D training step took 0.94x the time
    at 1 thread and 0.90x at 2 (in-process A/B, together with :func:`_bmm`'s copy).
    """

    @staticmethod
    def forward(
        ctx: _CouplingStackContext,
        specs: tuple[_CouplingSpec, ...],
        x: Tensor,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        keep: list[Tensor] = []
        z, logabsdet = _stack_forward(specs, x, params, keep)
        ctx.specs = specs
        ctx.save_for_backward(x, *keep, *params)
        return z, logabsdet

    @staticmethod
    def backward(
        ctx: _CouplingStackContext, grad_z: Tensor, grad_logabsdet: Tensor
    ) -> tuple[Tensor | None, ...]:
        specs = ctx.specs
        saved = ctx.saved_tensors
        n_params = sum(spec.n_params for spec in specs)
        kept, params = saved[1 : len(saved) - n_params], saved[len(saved) - n_params :]
        if torch.is_grad_enabled():  # create_graph=True: this backward is differentiated
            return (
                None,
                *_differentiable_backward(
                    partial(_plain_stack, specs),
                    (saved[0], *params),
                    (grad_z, grad_logabsdet),
                    ctx.needs_input_grad[1:],
                ),
            )
        grad_params: list[Tensor] = []
        grad_logabsdet = grad_logabsdet.unsqueeze(-1)
        kept_end, params_end = len(kept), n_params
        for position in range(len(specs) - 1, -1, -1):
            spec = specs[position]
            n_layers = spec.n_params // 2
            layer_kept = kept[kept_end - 3 - (2 * n_layers - 1) : kept_end]
            kept_end -= len(layer_kept)
            weights = params[params_end - spec.n_params : params_end : 2]
            params_end -= spec.n_params
            transformed, log_scale, scale = layer_kept[:3]
            inputs, act_saved = layer_kept[3 : 3 + n_layers], layer_kept[3 + n_layers :]
            grad_identity, grad_out = _split(grad_z, spec)
            grad_log_scale = torch.addcmul(grad_logabsdet, grad_out, transformed * scale)
            # s = c tanh(u / c): ds/du = 1 - tanh(u / c)^2 = 1 - (s / c)^2
            grad_raw = _aten.tanh_backward(grad_log_scale, log_scale / spec.bound)
            first = position == 0
            grad_from_mlp, layer_grads = _mlp_backward(
                _ACTIVATION_OPS[spec.activation],
                torch.cat([grad_out, grad_raw], dim=-1),
                inputs,
                act_saved,
                weights,
                input_grad=not first or ctx.needs_input_grad[1],
            )
            grad_params[:0] = layer_grads
            if grad_from_mlp is not None:
                grad_z = _join(grad_identity + grad_from_mlp, grad_out * scale, spec)
        grad_x = grad_z if ctx.needs_input_grad[1] else None
        return (None, grad_x, *grad_params)


def _plain_stack(
    specs: Sequence[_CouplingSpec], x: Tensor, *params: Tensor
) -> tuple[Tensor, Tensor]:
    """:class:`_CouplingStack`'s forward as plain autograd ops."""
    return _stack_forward(specs, x, params, keep=None, in_place=False)


def coupling_forward(couplings: Sequence[AffineCoupling], x: Tensor) -> tuple[Tensor, Tensor]:
    """Data -> noise through consecutive couplings: (K, N, D) -> z (K, N, D) and the
    summed log|det| (K, N), nats. One autograd node for all of them when gradients
    are recorded; nothing kept for a backward otherwise."""
    specs = tuple(c.spec for c in couplings)
    params = [p for c in couplings for p in c.conditioner.flat_parameters()]
    if plain_autograd_on():
        return _plain_stack(specs, x, *params)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _CouplingStack.apply(specs, x, *params)
    return _stack_forward(specs, x, params, keep=None)


def _as_blocks(identity_idx: Tensor, transform_idx: Tensor) -> str | None:
    """``"identity_first"``/``"transform_first"`` when the two index sets are adjacent
    blocks of consecutive features, else None."""
    n_identity = identity_idx.numel()
    features = torch.arange(n_identity + transform_idx.numel())
    if torch.equal(torch.cat([identity_idx, transform_idx]), features):
        return "identity_first"
    if torch.equal(torch.cat([transform_idx, identity_idx]), features):
        return "transform_first"
    return None


class _ParameterList(Protocol):
    """An ``nn.ParameterList`` as :meth:`BatchedMLP.flat_parameters` reads it: its entries
    are all tensors (``Module._parameters`` also allows None, for other modules)."""

    _parameters: dict[str, Tensor]


class BatchedMLP(nn.Module):
    """K independent MLPs evaluated together: (K, N, in) -> (K, N, out).

    Weights are (K, in, out) and biases (K, 1, out). The last layer starts at zero
    when ``zero_last`` is set, so a coupling layer starts as the identity.
    """

    def __init__(
        self,
        n_components: int,
        in_features: int,
        out_features: int,
        hidden_features: int,
        n_hidden_layers: int,
        activation: str = "relu",
        zero_last: bool = True,
    ) -> None:
        super().__init__()
        check_choice(activation, "activation", tuple(ACTIVATIONS))
        sizes = [in_features] + [hidden_features] * n_hidden_layers + [out_features]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in pairwise(sizes):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(
                nn.Parameter(torch.empty(n_components, fan_in, fan_out).uniform_(-bound, bound))
            )
            self.biases.append(
                nn.Parameter(torch.empty(n_components, 1, fan_out).uniform_(-bound, bound))
            )
        if zero_last:
            nn.init.zeros_(self.weights[-1])
            nn.init.zeros_(self.biases[-1])
        self.activation = ACTIVATIONS[activation]()  # the layer-by-layer reference
        self.activation_name = activation

    def flat_parameters(self) -> list[Tensor]:
        """[W_0, b_0, W_1, b_1, ...]."""
        # The lists' _parameters (what ParameterList indexing reads, without its per-item
        # getattr): the 48 tensors of an 8-coupling flow in 16 us instead of 137.
        weights = cast(_ParameterList, self._modules["weights"])._parameters.values()
        biases = cast(_ParameterList, self._modules["biases"])._parameters.values()
        return [p for pair in zip(weights, biases, strict=True) for p in pair]

    def forward(self, inputs: Tensor) -> Tensor:
        """(K, N, in) -> (K, N, out)."""
        if plain_autograd_on():
            return _plain_mlp(self.activation_name, inputs, *self.flat_parameters())
        return _StackedMLP.apply(self.activation_name, inputs, *self.flat_parameters())


class AffineCoupling(Transform):
    r"""Affine coupling layer with a bounded exponential scale, batched over K.

    With ``mask > 0`` marking the transformed features :math:`x_t` and the rest
    the conditioning (identity) features :math:`x_i`:

    .. math:: z_t = x_t \exp(s(x_i)) + t(x_i), \quad z_i = x_i, \quad
              \log|\det J| = \textstyle\sum s(x_i),

    with :math:`s = c \tanh(u / c)` (:func:`bounded_log_scale`). The conditioner
    outputs the shift first and the raw log-scale second, as nflows'
    ``AffineCouplingTransform`` does.
    """

    def __init__(
        self,
        n_components: int,
        mask: Tensor,
        hidden_features: int = 64,
        n_hidden_layers: int = 2,
        activation: str = "relu",
        max_log_scale: float = 3.0,
    ) -> None:
        super().__init__()
        mask = torch.as_tensor(mask).flatten()
        features = torch.arange(mask.numel())
        transform_idx = features[mask > 0]
        identity_idx = features[mask <= 0]
        if transform_idx.numel() == 0 or identity_idx.numel() == 0:
            raise ValueError("mask must mark at least one transformed and one identity feature")
        self.register_buffer("identity_idx", identity_idx, persistent=False)
        self.register_buffer("transform_idx", transform_idx, persistent=False)
        # The split as a permutation of the features, and its inverse to undo it.
        split_idx = torch.cat([identity_idx, transform_idx])
        self.register_buffer("split_idx", split_idx, persistent=False)
        self.register_buffer("unsplit_idx", torch.argsort(split_idx), persistent=False)
        # When each part is one block of features (always so in 2-D), split with views
        # and join with one cat instead of two index copies.
        self._blocks = _as_blocks(identity_idx, transform_idx)
        self.max_log_scale = float(max_log_scale)
        self.conditioner = BatchedMLP(
            n_components,
            identity_idx.numel(),
            2 * transform_idx.numel(),
            hidden_features,
            n_hidden_layers,
            activation,
        )

    @property
    def spec(self) -> _CouplingSpec:
        """This layer's split and conditioner settings, for :func:`coupling_forward`."""
        # Read through _buffers/_modules: nn.Module.__getattr__ costs about 1 us a name.
        buffers, conditioner = self._buffers, self._modules["conditioner"]
        return _CouplingSpec(
            self._blocks,
            buffers["identity_idx"].numel(),
            2 * len(conditioner.weights),
            self.max_log_scale,
            conditioner.activation_name,
            buffers["split_idx"],
            buffers["unsplit_idx"],
        )

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        return coupling_forward([self], inputs)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        spec = self.spec
        identity, transformed = _split(inputs, spec)
        shift, raw_log_scale = self.conditioner(identity).chunk(2, dim=-1)
        log_scale = bounded_log_scale(raw_log_scale, self.max_log_scale)
        transformed = (transformed - shift) * torch.exp(-log_scale)
        return _join(identity, transformed, spec), -log_scale.sum(-1)


class ActNorm(Transform):
    r"""Per-component, per-feature affine normalisation: :math:`z = (x - b) e^{-s}`.

    Initialised from the first training batch so that each component's output
    has zero mean and unit variance (Kingma & Dhariwal, 2018).
    """

    def __init__(self, n_components: int, n_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(n_components, 1, n_features))
        self.log_scale = nn.Parameter(torch.zeros(n_components, 1, n_features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, inputs: Tensor) -> None:
        """Per-component mean and standard deviation of the batch, pooled over the
        data-parallel ranks' shards so that every rank starts the same as one process."""
        x = inputs.double()
        # Two passes (mean, then squared deviations from it): the one-pass sum of squares
        # cancels when the data's offset is ~1e8 times its spread.
        pooled = all_reduce_sum(torch.cat([x.sum(1).flatten(), x.new_tensor([x.shape[1]])]))
        if not bool(pooled[-1]):
            return  # no points on any rank: wait for a batch that has some
        if not bool(torch.isfinite(pooled).all()):
            raise ValueError("ActNorm cannot initialise from non-finite inputs")
        count, mean = pooled[-1], (pooled[:-1] / pooled[-1]).view(self.loc.shape)
        deviations = all_reduce_sum((x - mean).square().sum(1, keepdim=True))
        std = (deviations / (count - 1)).sqrt() if count > 1 else torch.ones_like(mean)
        self.loc.copy_(mean)
        self.log_scale.copy_(torch.log(std.clamp_min(1e-6)))
        self.initialized.fill_(True)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        if self.training and not bool(self.initialized):
            self._initialize(inputs)
        outputs = (inputs - self.loc) * torch.exp(-self.log_scale)
        logabsdet = (-self.log_scale.sum(-1)).expand(inputs.shape[0], inputs.shape[1])
        return outputs, logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        outputs = inputs * torch.exp(self.log_scale) + self.loc
        logabsdet = self.log_scale.sum(-1).expand(inputs.shape[0], inputs.shape[1])
        return outputs, logabsdet


class LULinear(Transform):
    r"""Invertible linear map per component, :math:`z = L U x + b`, as nflows' ``LULinear``.

    L is unit lower-triangular, U upper-triangular with diagonal
    softplus(u) + eps > 0, so :math:`\log|\det| = \sum \log \mathrm{diag}(U)`. It
    starts as the identity and lets each flow rotate and shear the axes its
    couplings split along.
    """

    def __init__(self, n_components: int, n_features: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        shape = (n_components, n_features, n_features)
        self.lower = nn.Parameter(torch.zeros(shape))
        self.upper = nn.Parameter(torch.zeros(shape))
        identity_diag = math.log(math.expm1(1.0 - eps))
        self.unconstrained_diag = nn.Parameter(
            torch.full((n_components, n_features), identity_diag)
        )
        self.bias = nn.Parameter(torch.zeros(n_components, 1, n_features))
        self.register_buffer("eye", torch.eye(n_features), persistent=False)

    def n_unused_parameters(self) -> int:
        """Trained entries that never reach the map: the diagonal and upper triangle of
        ``lower``, and the diagonal and lower triangle of ``upper`` (whose diagonal is
        ``unconstrained_diag``), K * D * (D + 1) when both are trained."""
        k, d, _ = self.lower.shape
        per_factor = k * d * (d + 1) // 2
        return per_factor * (int(self.lower.requires_grad) + int(self.upper.requires_grad))

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        diag = F.softplus(self.unconstrained_diag) + self.eps
        lower = torch.tril(self.lower, -1) + self.eye
        upper = torch.triu(self.upper, 1) + torch.diag_embed(diag)
        return lower, upper, torch.log(diag).sum(-1, keepdim=True)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        lower, upper, logdet = self._factors()
        outputs = torch.baddbmm(self.bias, inputs, (lower @ upper).transpose(1, 2))
        return outputs, logdet.expand(inputs.shape[0], inputs.shape[1])

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        lower, upper, logdet = self._factors()
        rhs = (inputs - self.bias).transpose(1, 2)
        y = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        outputs = torch.linalg.solve_triangular(upper, y, upper=True).transpose(1, 2)
        return outputs, (-logdet).expand(inputs.shape[0], inputs.shape[1])
