"""Pyro's TraceEnum_ELBO as an independent oracle of our exact-over-K ELBO."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate

from vmonf.estimator import VMoNF
from vmonf.flows import ComponentFlows
from vmonf.mixture import MixtureOfFlows
from vmonf.model import VariationalMixture
from vmonf.posterior import PosteriorNet
from vmonf.preprocessing import Standardizer
from vmonf.pyro_model import FlowComponent, PyroMixture, from_estimator, pyro_elbo


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


def make_model(k: int, weights: str = "learned", scale: float = 0.3) -> VariationalMixture:
    """A small mixture with every parameter randomised (flows start as the identity)."""
    flows = ComponentFlows(n_features=2, n_components=k, n_layers=2, hidden_features=8)
    vm = VariationalMixture(MixtureOfFlows(flows, weights), PosteriorNet(2, k, (8,)))
    with torch.no_grad():
        for p in vm.parameters():
            p.normal_(0, scale)
    return vm


def blobs(n: int = 64) -> torch.Tensor:
    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
    return centres[torch.arange(n) % 3] + 0.4 * torch.randn(n, 2)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("weights", ["uniform", "learned"])
@pytest.mark.parametrize("temperature", [None, 0.4, 2.5])
def test_pyro_elbo_equals_ours(k, weights, temperature):
    vm = make_model(k, weights)
    x = blobs(40)
    ours = vm.elbo(x, temperature).mean()
    theirs = pyro_elbo(vm, x, temperature)
    assert theirs.shape == ()
    assert torch.isfinite(ours)
    assert abs(float((theirs - ours).detach())) < 1e-5
    if weights == "learned" and k > 1:
        assert vm.mixture.log_weights().std() > 1e-3  # the weights are not uniform


def test_stored_temperature_is_used():
    vm = make_model(3)
    vm.posterior.temperature.fill_(0.3)
    x = blobs(30)
    with torch.no_grad():
        assert abs((pyro_elbo(vm, x) - vm.elbo(x).mean()).item()) < 1e-5
        assert abs((pyro_elbo(vm, x) - vm.elbo(x, 1.0).mean()).item()) > 1e-4


def test_pyro_elbo_leaves_param_store_alone():
    pyro.param("unrelated", torch.zeros(2))
    pyro_elbo(make_model(2), blobs(10))
    assert list(pyro.get_param_store().keys()) == ["unrelated"]


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_gradients_agree(temperature):
    vm = make_model(3)
    x = blobs(30)
    params = [p for p in vm.parameters() if p.requires_grad]
    theirs = torch.autograd.grad(-pyro_elbo(vm, x, temperature), params)
    ours = torch.autograd.grad(-vm.elbo(x, temperature).mean(), params)
    for a, b in zip(theirs, ours, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert max(float(b.abs().max()) for b in ours) > 1e-3  # not trivially zero


def test_model_side_enumeration_gives_log_likelihood():
    """Enumerating c in the model with an empty guide gives exactly sum log p(x)."""
    vm = make_model(3)
    pm = PyroMixture(vm)
    x = blobs(25)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        config_enumerate(pm.model), lambda x, temperature=None: None, x
    )
    assert torch.allclose(-loss, vm.mixture.log_prob(x).sum(), atol=1e-8, rtol=0)


def test_svi_training_decreases_loss():
    vm = make_model(3, scale=0.1)
    pm = PyroMixture(vm)
    x = blobs(60)
    svi = SVI(
        pm.model, pm.guide, pyro.optim.Adam({"lr": 1e-2}), TraceEnum_ELBO(max_plate_nesting=1)
    )

    def our_loss() -> float:
        with torch.no_grad():
            return -vm.elbo(x).mean().item()

    before = our_loss()
    losses = [svi.step(x) / x.shape[0] for _ in range(40)]
    after = our_loss()
    assert all(np.isfinite(losses))
    assert abs(losses[0] - before) < 1e-6  # SVI's loss is our -ELBO (summed over points)
    assert after < before - 0.1
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    names = set(pyro.get_param_store().keys())
    assert "vmonf_mixture$$$weight_logits" in names
    assert any(name.startswith("vmonf_posterior$$$") for name in names)


def test_flow_component_log_prob_broadcasts():
    flows = make_model(3).mixture.flows
    x = blobs(7)
    table = flows.log_prob(x)  # (N, K)
    enumerated = FlowComponent(flows, torch.arange(3).reshape(3, 1))
    assert enumerated.batch_shape == (3, 1)
    assert enumerated.event_shape == (2,)
    assert torch.allclose(enumerated.log_prob(x), table.T)
    deeper = FlowComponent(flows, torch.arange(3).reshape(3, 1, 1))
    assert torch.allclose(deeper.log_prob(x), table.T[:, None, :])
    c = torch.randint(0, 3, (7,))
    assert torch.allclose(FlowComponent(flows, c).log_prob(x), table.gather(1, c[:, None])[:, 0])
    expanded = enumerated.expand(torch.Size([3, 7]))
    assert expanded.batch_shape == (3, 7)
    assert torch.allclose(expanded.log_prob(x), table.T)


def test_flow_component_with_standardizer_adds_log_det():
    flows = make_model(2).mixture.flows
    x = 3.0 * blobs(9) + 5.0
    std = Standardizer(2).fit(x)
    c = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    got = FlowComponent(flows, c, std).log_prob(x)
    want = flows.log_prob(std(x)).gather(1, c[:, None])[:, 0] + std.log_abs_det()
    assert torch.allclose(got, want)
    assert FlowComponent(flows, c, std).sample((4,)).shape == (4, 9, 2)


def test_flow_component_sampling():
    flows = make_model(3).mixture.flows
    c = torch.tensor([2, 0, 0, 1, 2])
    d = FlowComponent(flows, c)
    assert d.support is pyro.distributions.constraints.real_vector
    assert d.sample().shape == (5, 2)
    assert d.sample((4,)).shape == (4, 5, 2)
    assert FlowComponent(flows, torch.tensor(1)).sample((6,)).shape == (6, 2)
    torch.manual_seed(3)
    drawn = d.sample()
    torch.manual_seed(3)
    assert torch.equal(drawn, flows.sample_components(c))
    assert not drawn.requires_grad
    assert d.rsample().requires_grad
    assert torch.isfinite(d.log_prob(drawn)).all()


def test_model_rejects_bad_shapes():
    pm = PyroMixture(make_model(2))
    with pytest.raises(ValueError, match="shape"):
        pm.model(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="shape"):
        pm.guide(torch.zeros(5))
    # These failed inside Pyro's plate (ZeroDivisionError) and torch's gather.
    with pytest.raises(ValueError, match="x must hold at least one point"):
        pyro_elbo(pm, torch.zeros(0, 2))
    flows = pm.vm.mixture.flows
    for bad in (torch.tensor([5]), torch.tensor([[0], [-1]])):
        with pytest.raises(ValueError, match=r"component indices must lie in \[0, 2\)"):
            FlowComponent(flows, bad)


def test_from_estimator_in_user_units():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-4, 2, (40, 2)), rng.normal(6, 3, (40, 2))]) * [1.0, 10.0]
    est = VMoNF(
        2,
        n_layers=2,
        hidden_features=8,
        posterior_hidden=(8,),
        init_steps=5,
        max_epochs=2,
        dtype="float64",
        random_state=0,
    ).fit(X)
    pm = from_estimator(est)
    theirs = pyro_elbo(pm, torch.as_tensor(X)).item()
    assert abs(theirs - float(est.elbo(X).mean())) < 1e-5
    with pytest.raises(ValueError, match="fitted"):
        from_estimator(VMoNF(2))
    with pytest.raises(TypeError, match="VMoNF"):
        from_estimator(make_model(2))


def test_pyro_elbo_of_frozen_model():
    vm = make_model(2).requires_grad_(False).eval()  # eval: pyro.module warns otherwise
    x = blobs(12)
    assert abs((pyro_elbo(vm, x) - vm.elbo(x).mean()).item()) < 1e-5


def test_flow_component_samples_in_the_users_units():
    flows = ComponentFlows(n_features=2, n_components=3, n_layers=2, hidden_features=8)
    standardizer = Standardizer(2).fit(3.0 * torch.randn(50, 2) + 5.0)
    components = torch.tensor([2, 0, 0, 1, 2])
    torch.manual_seed(3)
    drawn = FlowComponent(flows, components, standardizer).sample()
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, standardizer.inverse(flows.sample_components(components)))


def test_the_model_draws_points_when_x_is_not_given():
    """model(None) was refused, so Pyro's Predictive could not sample from the mixture.
    Drawn through Pyro, points follow the estimator's own sampler: component shares match
    the mixing weights and the points' mean log-density matches that of est.sample."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-4, 1, (300, 2)), rng.normal(6, 2, (100, 2))])
    settings = dict(n_layers=2, hidden_features=8, posterior_hidden=(8,), init_steps=50,
                    max_epochs=5, weights="learned", dtype="float64", random_state=0)  # fmt: skip
    est = VMoNF(2, **settings).fit(X)
    pm = from_estimator(est)
    torch.manual_seed(0)
    with pyro.get_param_store().scope():
        draws = pyro.infer.Predictive(pm.model, num_samples=1)(None, n=4000)
    c, x = draws["c"][0], draws["x"][0]
    assert c.shape == (4000,) and x.shape == (4000, 2)
    shares = np.bincount(c.numpy(), minlength=2) / 4000
    np.testing.assert_allclose(shares, est.weights_, atol=4 * np.sqrt(0.25 / 4000))
    ours = est.score_samples(x.numpy())
    reference = est.score_samples(est.sample(4000, random_state=1)[0])
    stderr = np.hypot(ours.std(), reference.std()) / np.sqrt(4000)
    assert abs(ours.mean() - reference.mean()) < 5 * stderr
    with pytest.raises(ValueError, match="give their number, n"):
        pm.model(None)
    with pytest.raises(ValueError, match="not both"):
        pm.model(torch.as_tensor(X), n=3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        pm.model(None, n=0)
