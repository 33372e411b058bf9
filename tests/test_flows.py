"""Contract tests for the batched coupling flows (float64)."""

from __future__ import annotations

import io

import pytest
import scipy.stats
import torch
from nflows.distributions.base import Distribution
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import AffineCouplingTransform
from nflows.transforms.lu import LULinear as NflowsLULinear
from torch import nn

from vmonf.coupling import ActNorm, LULinear, bounded_log_scale, plain_autograd
from vmonf.flows import ComponentFlows, alternating_masks, group_by_component, student_t_log_prob

CONFIGS = [
    dict(n_features=2, n_components=3, n_layers=4, hidden_features=16),
    dict(n_features=3, n_components=2, n_layers=3, hidden_features=8, activation="tanh"),
    dict(n_features=2, n_components=2, n_layers=2, hidden_features=8, actnorm=True),
    dict(n_features=5, n_components=1, n_layers=5, hidden_features=8, n_hidden_layers=1),
    dict(n_features=3, n_components=2, n_layers=3, hidden_features=8, linear=True),
    dict(n_features=2, n_components=2, n_layers=3, hidden_features=8, base_df=4.0),
]


def randomised(config: dict) -> ComponentFlows:
    """A flow whose parameters are all random (the default starts as the identity)."""
    flows = ComponentFlows(**config)
    with torch.no_grad():
        for p in flows.parameters():
            p.normal_(0.0, 0.4)
    return flows.eval()


@pytest.fixture(params=CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def flows(request) -> ComponentFlows:
    return randomised(request.param)


def test_log_prob_shape_and_dtype(flows):
    x = torch.randn(7, flows.n_features)
    out = flows.log_prob(x)
    assert out.shape == (7, flows.n_components)
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()


def test_invertible(flows):
    x = torch.randn(flows.n_components, 11, flows.n_features)
    z, logdet_fwd = flows.forward(x)
    x_back, logdet_inv = flows.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logdet_fwd, -logdet_inv, atol=1e-10, rtol=1e-10)


def test_logabsdet_matches_autograd_jacobian(flows):
    x = torch.randn(4, flows.n_features)
    _, logdet = flows.forward(x)
    for k in range(flows.n_components):
        for i in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(
                lambda v, k=k: flows.forward(v[None])[0][k, 0], x[i]
            )
            torch.testing.assert_close(logdet[k, i], torch.linalg.slogdet(jac)[1])


def test_every_parameter_gets_a_gradient():
    # Random weights: the default zero-initialised last layers block gradients upstream.
    config = dict(n_features=3, n_components=2, n_layers=3, hidden_features=8, actnorm=True)
    flows = randomised(config)
    flows.train()
    loss = -flows.log_prob(torch.randn(16, 3)).mean()
    loss.backward()
    for name, p in flows.named_parameters():
        assert p.grad is not None and torch.any(p.grad != 0), name


@pytest.mark.parametrize("offset", [0.0, 1e8, 3e8])
def test_actnorm_initialises_to_unit_spread_even_far_from_zero(offset):
    x = offset + torch.randn(2, 512, 3, generator=torch.Generator().manual_seed(0))
    norm = ActNorm(n_components=2, n_features=3).train()
    z, _ = norm(x)
    torch.testing.assert_close(z.std(1), torch.ones(2, 3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.mean(1), torch.zeros(2, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("base_df", [None, 8.0])
def test_density_integrates_to_one_on_a_grid(base_df):
    flows = ComponentFlows(
        n_features=2, n_components=3, n_layers=4, hidden_features=16, base_df=base_df
    )
    with torch.no_grad():
        for p in flows.parameters():
            p.normal_(0.0, 0.2)
    grid = torch.linspace(-12, 12, 801)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    with torch.no_grad():
        density = flows.log_prob(points).exp()
    mass = density.sum(0) * (grid[1] - grid[0]) ** 2
    torch.testing.assert_close(mass, torch.ones(3), atol=5e-3, rtol=0)


def test_components_have_separate_weights_and_independent_outputs():
    flows = randomised(CONFIGS[0])
    x = torch.randn(5, 2)
    lp = flows.log_prob(x)
    assert not torch.allclose(lp[:, 0], lp[:, 1])


class _NflowsConditioner(nn.Module):
    """An nflows-style transform net holding component k's weights of a BatchedMLP."""

    def __init__(self, batched_mlp, k: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for w, b in zip(batched_mlp.weights, batched_mlp.biases, strict=True):
            linear = nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                linear.weight.copy_(w[k].T)
                linear.bias.copy_(b[k, 0])
            self.layers.append(linear)
        self.activation = batched_mlp.activation

    def forward(self, inputs, context=None):
        h = inputs
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


class _BoundedAffineCoupling(AffineCouplingTransform):
    """nflows' own coupling transform with our bounded exponential scale."""

    def __init__(self, mask, net, bound):
        self._bound = bound
        super().__init__(mask, lambda i, o: net)

    def _scale_and_shift(self, transform_params):
        n = self.num_transform_features
        shift, raw = transform_params[:, :n], transform_params[:, n:]
        return torch.exp(bounded_log_scale(raw, self._bound)), shift


def _nflows_lu_linear(layer: LULinear, k: int) -> NflowsLULinear:
    """nflows' own LULinear carrying component k's factors."""
    d = layer.lower.shape[-1]
    reference = NflowsLULinear(d, eps=layer.eps)
    lower_idx, upper_idx = torch.tril_indices(d, d, -1), torch.triu_indices(d, d, 1)
    with torch.no_grad():
        reference.lower_entries.copy_(layer.lower[k][lower_idx[0], lower_idx[1]])
        reference.upper_entries.copy_(layer.upper[k][upper_idx[0], upper_idx[1]])
        reference.unconstrained_upper_diag.copy_(layer.unconstrained_diag[k])
        reference.bias.copy_(layer.bias[k, 0])
    return reference


def _nflows_layer(layer, k: int, n_features: int):
    if isinstance(layer, LULinear):
        return _nflows_lu_linear(layer, k)
    return _BoundedAffineCoupling(
        torch.zeros(n_features).index_fill(0, layer.transform_idx, 1),
        _NflowsConditioner(layer.conditioner, k),
        layer.max_log_scale,
    )


class _TorchStudentT(Distribution):
    """torch.distributions' Student-t as an nflows base (independent coordinates)."""

    def __init__(self, df: float) -> None:
        super().__init__()
        self.df = df

    def _log_prob(self, inputs, context):
        return torch.distributions.StudentT(self.df).log_prob(inputs).sum(-1)


@pytest.mark.parametrize(
    "config",
    CONFIGS[:2] + CONFIGS[3:],
    ids=["2d", "3d", "5d", "3d-linear", "2d-student-t"],
)
def test_equals_separate_nflows_flows_with_the_same_weights(config):
    flows = randomised(config)
    x = torch.randn(9, flows.n_features)
    ours = flows.log_prob(x)
    d = flows.n_features
    base = StandardNormal([d]) if flows.base_df is None else _TorchStudentT(flows.base_df)
    for k in range(flows.n_components):
        transforms = [_nflows_layer(layer, k, flows.n_features) for layer in flows.layers]
        reference = Flow(CompositeTransform(transforms), base)
        torch.testing.assert_close(ours[:, k], reference.log_prob(x), atol=1e-6, rtol=0)


def test_state_dict_round_trip():
    flows = randomised(CONFIGS[2])
    buffer = io.BytesIO()
    torch.save({"config": flows.get_config(), "state": flows.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = ComponentFlows(**saved["config"]).double()
    clone.load_state_dict(saved["state"])
    clone.eval()
    x = torch.randn(6, 2)
    torch.testing.assert_close(clone.log_prob(x), flows.log_prob(x))


def test_sampling_shapes_and_reproducibility():
    flows = randomised(CONFIGS[0])
    g = torch.Generator().manual_seed(3)
    all_k = flows.sample(10, generator=g)
    assert all_k.shape == (3, 10, 2)
    one = flows.sample(10, component=1, generator=torch.Generator().manual_seed(3))
    again = flows.sample(10, component=1, generator=torch.Generator().manual_seed(3))
    assert one.shape == (10, 2)
    torch.testing.assert_close(one, again)
    comps = torch.tensor([2, 0, 0, 1, 2, 2])
    mixed = flows.sample_components(comps, generator=torch.Generator().manual_seed(5))
    again = flows.sample_components(comps, generator=torch.Generator().manual_seed(5))
    assert mixed.shape == (6, 2)
    torch.testing.assert_close(mixed, again)


def test_student_t_base_samples_follow_the_base_and_leave_global_rng_alone():
    # A fresh flow is the identity (zero last layers), so samples are base draws.
    flows = ComponentFlows(n_features=2, n_components=2, n_layers=2, base_df=3.0)
    state = torch.get_rng_state()
    x = flows.sample(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    again = flows.sample(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, again, rtol=0, atol=0)
    for coordinate in x.detach().reshape(-1, 2).T.numpy():
        assert scipy.stats.kstest(coordinate, scipy.stats.t(3.0).cdf).pvalue > 1e-3
        assert scipy.stats.kstest(coordinate, "norm").pvalue < 1e-6


def test_student_t_log_density_matches_scipy_and_stays_finite_far_out_in_float32():
    z = torch.tensor([[0.0, 0.5], [-3.0, 40.0], [1e3, -1e6]])
    expected = scipy.stats.t(4.0).logpdf(z.numpy()).sum(-1)
    torch.testing.assert_close(student_t_log_prob(z, 4.0), torch.as_tensor(expected))
    # z^2 overflows float32 beyond 1.8e19; the density there is about -230 nats.
    far = torch.tensor([[1e20, 0.0], [-3e25, 2e30]])
    got = student_t_log_prob(far.float(), 4.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), student_t_log_prob(far, 4.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("df", [1e4, 1e6])
def test_student_t_log_density_keeps_float32_precision_at_large_df(df):
    # (df + 1) / 2 times log1p(z^2 / df): computed as log hypot, float32's rounding of
    # 1 + z^2 / df cost about 0.03 nats at df = 1e6.
    z = torch.tensor([[0.3, -1.0], [2.5, 4.0], [-6.0, 0.01]])
    expected = torch.as_tensor(scipy.stats.t(df).logpdf(z.double().numpy()).sum(-1))
    got = student_t_log_prob(z, df).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_student_t_gradient_stays_finite_where_t_squared_overflows():
    z = torch.tensor([[1e20, 0.5]], requires_grad=True)
    student_t_log_prob(z, 4.0).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad[0, 0] < 0


def test_base_df_beyond_the_gaussian_limit_is_refused():
    with pytest.raises(ValueError, match=r"base_df must be <= 1e\+06, got 1e\+08: .*base_df=None"):
        ComponentFlows(n_features=2, n_components=1, base_df=1e8)


def test_sample_components_draws_from_the_named_flow():
    # Flows that are pure shifts of N(0, I) by +-10 make the source obvious.
    flows = ComponentFlows(n_features=2, n_components=2, n_layers=2, hidden_features=4)
    with torch.no_grad():
        for layer in flows.layers:
            layer.conditioner.biases[-1][0, 0, 0] = -10.0
            layer.conditioner.biases[-1][1, 0, 0] = 10.0
    comps = torch.tensor([0, 1, 1, 0, 1])
    x = flows.sample_components(comps, generator=torch.Generator().manual_seed(0))
    # Inverse of z = x + t is x = z - t: component 0 lands near +10, component 1 near -10.
    assert torch.all((x[:, 0] > 0) == (comps == 0))


def test_bad_inputs_give_clear_errors():
    flows = ComponentFlows(n_features=2, n_components=2)
    with pytest.raises(ValueError, match="shape"):
        flows.log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\), got \(3,\)$"):
        flows.log_prob(torch.randn(3))  # not "or (2, N, 2)": log_prob takes no stacks
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        flows.log_prob([[0.0, 1.0]])
    for d in (2, 4):  # D = 2 used to promote silently, D = 4 to fail deep inside a GEMM
        flows64 = ComponentFlows(n_features=d, n_components=2).double()
        with pytest.raises(
            TypeError, match=r"dtype torch\.float32 but the weights of the flows are torch\.float64"
        ):
            flows64.log_prob(torch.randn(3, d).float())
    with pytest.raises(ValueError, match="component"):
        flows.sample(3, component=2)
    with pytest.raises(ValueError, match="n_features"):
        ComponentFlows(n_features=1)
    with pytest.raises(ValueError, match="activation"):
        ComponentFlows(n_features=2, activation="cosine")
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e-300):
        with pytest.raises(ValueError, match="base_df"):
            ComponentFlows(n_features=2, base_df=bad)
    with pytest.raises(TypeError, match="base_df"):
        ComponentFlows(n_features=2, base_df="5")
    with pytest.raises(TypeError, match="actnorm must be True or False"):
        ComponentFlows(n_features=2, actnorm="False")  # a non-empty str is truthy


def test_lu_linear_starts_as_the_identity():
    z, logdet = LULinear(2, 3)(x := torch.randn(2, 5, 3))
    torch.testing.assert_close(z, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, torch.zeros(2, 5), rtol=0, atol=1e-12)


def test_lu_linear_counts_as_many_free_parameters_as_nflows_lu_linear():
    """BIC/AIC count LULinear's trained entries less those it never reads; nflows stores
    exactly the free ones (strict triangles, diagonal, bias)."""
    k, d = 3, 4
    layer = LULinear(k, d)
    total = sum(p.numel() for p in layer.parameters())
    free_per_component = sum(p.numel() for p in NflowsLULinear(d).parameters())
    assert total - layer.n_unused_parameters() == k * free_per_component
    with torch.no_grad():
        layer.lower.normal_()
        layer.upper.normal_()
    layer(torch.randn(k, 6, d))[0].square().sum().backward()
    unused = (layer.lower.grad == 0).sum() + (layer.upper.grad == 0).sum()
    assert int(unused) == layer.n_unused_parameters()  # the entries with no gradient
    layer.lower.requires_grad_(False)  # a frozen factor is not counted at all
    assert layer.n_unused_parameters() == k * d * (d + 1) // 2


def test_alternating_masks_alternate():
    assert [m.tolist() for m in alternating_masks(3, 3)] == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_sample_components_draws_independent_points():
    flows = ComponentFlows(n_features=2, n_components=2, n_layers=2, hidden_features=4)
    components = torch.tensor([0, 1] * 2000)
    x = flows.sample_components(components, generator=torch.Generator().manual_seed(0))
    assert torch.unique(x, dim=0).shape[0] == x.shape[0]
    for k in (0, 1):  # an untrained flow is the identity: its points are N(0, I)
        torch.testing.assert_close(x[components == k].std(0), torch.ones(2), atol=0.08, rtol=0)


def test_group_by_component_keeps_non_binary_weights():
    index, slot_weights = group_by_component(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.5]]))
    assert index.tolist() == [[0, 2], [1, 2]]
    assert slot_weights.tolist() == [[2.0, 3.0], [1.0, 0.5]]


def test_actnorm_waits_for_points_and_refuses_non_finite_ones():
    flows = ComponentFlows(n_features=2, n_components=2, n_layers=2, actnorm=True)
    assert flows.log_prob(torch.zeros(0, 2)).shape == (0, 2)  # an empty batch: no 0/0
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(flows.log_prob(x)).all()  # initialised from these points
    fresh = ComponentFlows(n_features=2, n_components=2, n_layers=2, actnorm=True)
    with pytest.raises(ValueError, match="ActNorm cannot initialise from non-finite inputs"):
        fresh.initialize(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))
    assert not bool(fresh.layers[0].initialized)


def test_sampling_one_component_runs_that_flow_alone(flows):
    k = flows.n_components - 1
    seen: list[int] = []
    hook = flows.layers[-1].conditioner.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0])
    )
    x = flows.sample(6, component=k, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen == [1]  # one component slice went through the conditioner, not K
    z = torch.randn(1, 6, flows.n_features, generator=torch.Generator().manual_seed(0))
    if flows.base_df is None:  # the same base draws, through every flow: row k is x
        every = flows.inverse(z.expand(flows.n_components, 6, -1))[0]
        torch.testing.assert_close(x, every[k], atol=1e-12, rtol=1e-12)
    z_back, _ = flows.forward(x.expand(flows.n_components, 6, -1))
    assert torch.isfinite(z_back).all()


def test_sampling_one_component_is_differentiable_in_its_weights_only():
    flows = randomised(CONFIGS[0])
    flows.sample(5, component=1, generator=torch.Generator().manual_seed(0)).sum().backward()
    for name, p in flows.named_parameters():
        assert p.grad is not None, name
        assert torch.all(p.grad[[0, 2]] == 0), name  # the other flows do not take part
    assert any(bool(p.grad[1].abs().sum() > 0) for p in flows.parameters())


def test_log_density_is_minus_inf_at_infinity_and_nan_at_nan(flows):
    x = torch.randn(5, flows.n_features)
    x[1, 0], x[2, -1], x[3, 0], x[3, 1] = torch.inf, -torch.inf, torch.nan, torch.inf
    finite = [0, 4]
    log_p = flows.log_prob(x)
    torch.testing.assert_close(log_p[finite], flows.log_prob(x[finite]))
    assert torch.all(log_p[[1, 2]] == -torch.inf) and torch.isnan(log_p[3]).all()
    stacked = flows.log_prob_stacked(x.expand(flows.n_components, 5, -1))
    torch.testing.assert_close(stacked, log_p.T, equal_nan=True)
    with plain_autograd():  # the masked path, taken under torch.func and on GPUs
        torch.testing.assert_close(flows.log_prob(x), log_p, equal_nan=True)
        traced = torch.func.vmap(lambda u: flows.log_prob(u[None])[0])(x)
    torch.testing.assert_close(traced, log_p, equal_nan=True)
    log_p[finite].sum().backward()  # the non-finite points send no NaN into the weights
    assert all(bool(torch.isfinite(p.grad).all()) for p in flows.parameters())
