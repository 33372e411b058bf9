r"""Affine coupling layers batched over K mixture components.

Every module here acts on a stack of K independent flows at once: inputs have
shape (K, N, D) and each component k has its own weights, stored as tensors of
shape (K, ...) and applied with :func:`torch.baddbmm`. One call evaluates all K
flows, so a mixture costs about one batched computation, not K Python calls.

Conventions follow nflows' ``Transform``: ``forward`` maps data to noise and
returns ``(outputs, logabsdet)``; ``inverse`` maps noise to data.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from nflows.transforms.base import Transform
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "ActNorm",
    "AffineCoupling",
    "BatchedMLP",
    "LULinear",
    "bounded_log_scale",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def bounded_log_scale(raw: Tensor, bound: float) -> Tensor:
    r"""Soft-clamp a raw log-scale to (-bound, bound): :math:`c \tanh(u / c)`.

    Unlike nflows' ``sigmoid(u + 2) + 1e-3`` scale (always < 1.001, so a layer can
    only contract data towards noise), this lets each layer expand or contract by
    up to ``exp(bound)`` while keeping the gradient of an unsaturated scale at 1.
    """
    return bound * torch.tanh(raw / bound)


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
        self.activation = ACTIVATIONS[activation]()

    def forward(self, inputs: Tensor) -> Tensor:
        """(K, N, in) -> (K, N, out)."""
        hidden = inputs
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            hidden = torch.baddbmm(bias, hidden, weight)
            if i < last:
                hidden = self.activation(hidden)
        return hidden


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
        # Position of each feature in cat([identity, transformed]), to undo the split.
        self.register_buffer(
            "unsplit_idx", torch.argsort(torch.cat([identity_idx, transform_idx])), persistent=False
        )
        self.max_log_scale = float(max_log_scale)
        self.conditioner = BatchedMLP(
            n_components,
            identity_idx.numel(),
            2 * transform_idx.numel(),
            hidden_features,
            n_hidden_layers,
            activation,
        )

    def _shift_and_log_scale(self, identity: Tensor) -> tuple[Tensor, Tensor]:
        params = self.conditioner(identity)
        n_transform = self.transform_idx.numel()
        shift, raw_log_scale = params[..., :n_transform], params[..., n_transform:]
        return shift, bounded_log_scale(raw_log_scale, self.max_log_scale)

    def _couple(self, inputs: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        identity = inputs.index_select(-1, self.identity_idx)
        transformed = inputs.index_select(-1, self.transform_idx)
        shift, log_scale = self._shift_and_log_scale(identity)
        if inverse:
            transformed = (transformed - shift) * torch.exp(-log_scale)
            logabsdet = -log_scale.sum(-1)
        else:
            transformed = transformed * torch.exp(log_scale) + shift
            logabsdet = log_scale.sum(-1)
        outputs = torch.cat([identity, transformed], dim=-1).index_select(-1, self.unsplit_idx)
        return outputs, logabsdet

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        return self._couple(inputs, inverse=False)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. (K, N, D) -> ((K, N, D), logabsdet (K, N))."""
        return self._couple(inputs, inverse=True)


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
        self.loc.copy_(inputs.mean(dim=1, keepdim=True))
        std = inputs.std(dim=1, keepdim=True) if inputs.shape[1] > 1 else torch.ones_like(self.loc)
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
