"""Contract tests for MixtureOfFlows, PosteriorNet and the objectives (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vmonf.coupling import ActNorm
from vmonf.flows import ComponentFlows
from vmonf.mixture import WEIGHT_MODES, MixtureOfFlows
from vmonf.model import VariationalMixture
from vmonf.objectives import elbo, labelled_loss, marginal_nll, mixture_loss
from vmonf.posterior import PosteriorNet, TemperatureSchedule


def random_model(k: int = 3, weights: str = "learned") -> VariationalMixture:
    flows = ComponentFlows(n_features=2, n_components=k, n_layers=3, hidden_features=8)
    model = VariationalMixture(MixtureOfFlows(flows, weights), PosteriorNet(2, k, (8,)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def test_mixture_density_integrates_to_one():
    mixture = random_model().mixture
    grid = torch.linspace(-10, 10, 601)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        mass = mixture.log_prob(points).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1.0) < 5e-3


def test_log_joint_log_prob_posterior_consistent():
    mixture = random_model().mixture
    x = torch.randn(20, 2)
    joint = mixture.log_joint(x)
    torch.testing.assert_close(torch.logsumexp(joint, 1), mixture.log_prob(x))
    torch.testing.assert_close(mixture.posterior(x).exp().sum(1), torch.ones(20))
    log_weights = mixture.log_weights().expand(20, 3)
    torch.testing.assert_close(joint - mixture.flows.log_prob(x), log_weights)


def test_elbo_is_a_bound_tight_at_the_exact_posterior():
    model = random_model()
    x = torch.randn(50, 2)
    with torch.no_grad():
        log_p = model.mixture.log_prob(x)
        assert torch.all(model.elbo(x) <= log_p + 1e-12)
        exact = elbo(model.mixture.log_joint(x), model.mixture.posterior(x))
    torch.testing.assert_close(exact, log_p)


def test_elbo_ignores_components_q_gives_no_weight_even_at_minus_infinity():
    """0 * log 0 = 0: a component with q(k|x) = 0 and log p_k(x) = -inf (far in a
    tail, or an annealed q) must give neither a NaN value nor NaN gradients."""
    log_joint = torch.tensor([[-2.0, -float("inf")], [-1.0, -3.0]], requires_grad=True)
    logits = torch.tensor([[0.0, -1e4], [0.0, 0.5]], requires_grad=True)
    value = elbo(log_joint, torch.log_softmax(logits, -1))
    torch.testing.assert_close(value[0], torch.tensor(-2.0))
    q = torch.softmax(logits[1].detach(), -1)
    torch.testing.assert_close(value[1], (q * (log_joint[1].detach() - q.log())).sum())
    value.sum().backward()
    assert torch.isfinite(log_joint.grad).all() and torch.isfinite(logits.grad).all()


def test_labelled_loss_minimises_the_cross_entropy():
    log_joint = torch.log(torch.tensor([[0.2, 0.8]]))
    good_q = torch.log(torch.tensor([[0.1, 0.9]]))
    bad_q = torch.log(torch.tensor([[0.9, 0.1]]))
    y = torch.tensor([1])
    assert labelled_loss(log_joint, good_q, y, 1.0) < labelled_loss(log_joint, bad_q, y, 1.0)
    torch.testing.assert_close(
        labelled_loss(log_joint, good_q, y, 2.0), -torch.log(torch.tensor([0.8 * 0.9**2]))
    )


def test_mixture_loss_switches_on_labels_and_objective():
    model = random_model()
    x = torch.randn(6, 2)
    y = torch.tensor([-1, 0, -1, 2, 1, -1])
    with torch.no_grad():
        joint, log_q = model.mixture.log_joint(x), model.posterior(x)
        loss = mixture_loss(joint, log_q, y, alpha=0.5, objective="elbo")
        torch.testing.assert_close(loss[y < 0], -elbo(joint, log_q)[y < 0])
        torch.testing.assert_close(loss[y >= 0], labelled_loss(joint, log_q, y, 0.5)[y >= 0])
        marginal = mixture_loss(joint, log_q, y, alpha=0.0, objective="marginal")
        torch.testing.assert_close(marginal[y < 0], marginal_nll(joint)[y < 0])
        with pytest.raises(ValueError, match="objective must be 'elbo' or 'marginal'"):
            mixture_loss(joint, log_q, y, alpha=0.5, objective="elbox")  # not a silent marginal
        for bad in (-1.0, float("nan")):  # -1 would flip the cross-entropy's sign
            with pytest.raises(ValueError, match="alpha must be >= 0"):
                mixture_loss(joint, log_q, y, alpha=bad)


@pytest.mark.parametrize("objective", ["elbo", "marginal"])
def test_a_labelled_point_gets_finite_gradients_where_another_component_is_at_minus_inf(
    objective,
):
    """The unlabelled branch is computed for labelled rows too (and discarded): its
    0 * inf must not reach q's gradient."""
    log_joint = torch.tensor([[-1.0, -float("inf")], [-2.0, -3.0]], requires_grad=True)
    logits = torch.zeros(2, 2, requires_grad=True)
    y = torch.tensor([0, -1])
    loss = mixture_loss(log_joint, torch.log_softmax(logits, -1), y, alpha=1.0,
                        objective=objective)  # fmt: skip
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(log_joint.grad).all()


def test_every_parameter_gets_a_gradient():
    model = random_model().train()
    x = torch.randn(32, 2)
    y = torch.tensor([-1] * 28 + [0, 1, 2, 0])
    model.loss(x, y, alpha=1.0, objective="elbo").mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.any(p.grad != 0), name


def test_temperature_schedule():
    assert TemperatureSchedule("constant", 0.5)(1000) == 0.5
    annealed = TemperatureSchedule("exponential", 1.0, 1e-3, 0.01)
    assert annealed(0) == 1.0
    assert abs(annealed(1000) - torch.e**-1) < 1e-12
    assert annealed(10**6) == 0.01
    with pytest.raises(ValueError, match="schedule"):
        TemperatureSchedule("linear")


def test_low_temperature_sharpens_q():
    posterior = random_model().posterior
    x = torch.randn(10, 2)
    with torch.no_grad():
        sharp = posterior(x, 0.01).exp().amax(1)
        soft = posterior(x, 1.0).exp().amax(1)
    assert torch.all(sharp >= soft - 1e-12)


def test_sampling_follows_the_weights():
    mixture = random_model(weights="learned").mixture
    with torch.no_grad():
        mixture.weight_logits.copy_(torch.log(torch.tensor([0.7, 0.2, 0.1])))
    x, c = mixture.sample(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2)
    share = torch.bincount(c, minlength=3) / 20000.0
    torch.testing.assert_close(share, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    x, c = mixture.sample(0)  # none is a valid number
    assert x.shape == (0, 2) and c.shape == (0,)


def test_responsibility_weights():
    mixture = MixtureOfFlows(ComponentFlows(2, 2), "responsibilities")
    mixture.update_weights(torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(mixture.log_weights().exp(), torch.tensor([0.25, 0.75]))
    with pytest.raises(RuntimeError, match="responsibilities"):
        MixtureOfFlows(ComponentFlows(2, 2), "uniform").update_weights(torch.tensor([0.5, 0.5]))
    mixture.update_weights([2.0, 6.0])  # normalised, as log_weights() always was
    torch.testing.assert_close(mixture.log_weights().exp(), torch.tensor([0.25, 0.75]))
    for bad, error, message in [
        (torch.ones(3) / 3, ValueError, r"shape \(2,\), one entry per component, got \(3,\)"),
        (torch.tensor([math.nan, 1.0]), ValueError, "finite and >= 0"),
        (torch.tensor([-0.5, 1.5]), ValueError, "finite and >= 0"),
        (torch.zeros(2), ValueError, "all zero"),
        (["a", "b"], TypeError, "mean_responsibility must be numbers"),
    ]:
        with pytest.raises(error, match=message):
            mixture.update_weights(bad)
    torch.testing.assert_close(mixture.log_weights().exp(), torch.tensor([0.25, 0.75]))


# --------------------------------------------------------------------------- top-k ELBO


def _mixed_labels(n: int) -> torch.Tensor:
    y = torch.full((n,), -1)
    y[:4] = torch.tensor([0, 1, 2, 3])
    return y


def test_log_joint_at_equals_the_gathered_dense_log_joint():
    model = random_model(k=4).double()
    x = torch.randn(30, 2, dtype=torch.float64)
    components = torch.stack([torch.randperm(4)[:2] for _ in range(30)])
    sparse = model.mixture.log_joint_at(x, components)
    dense = model.mixture.log_joint(x).gather(1, components)
    torch.testing.assert_close(sparse, dense)
    weights = torch.randn_like(dense)
    params = list(model.mixture.parameters())
    grads = torch.autograd.grad((sparse * weights).sum(), params, allow_unused=True)
    dense_grads = torch.autograd.grad((dense * weights).sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(g, g_ref)


def test_log_joint_at_refuses_components_it_cannot_gather():
    mixture = random_model(k=3).mixture
    x = torch.randn(4, 2)
    for components, error, message in [
        ([[0], [1], [2], [0]], TypeError, "components must be a torch.Tensor, got list"),
        (torch.zeros(4, 1), TypeError, "int64 indices, got dtype torch.float"),
        (torch.zeros(4, dtype=torch.long), ValueError, r"shape \(4, k\), one row per point"),
        (torch.zeros(5, 1, dtype=torch.long), ValueError, r"shape \(4, k\)"),
        (torch.full((4, 1), 3), ValueError, r"lie in \[0, 3\)"),
        (torch.full((4, 1), -1), ValueError, r"lie in \[0, 3\)"),
    ]:
        with pytest.raises(error, match=message):
            mixture.log_joint_at(x, components)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\), got \(4, 3\)"):
        mixture.log_joint_at(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))


@pytest.mark.parametrize("objective", ["elbo", "marginal"])
def test_top_k_with_every_component_is_the_exact_loss(objective):
    model = random_model(k=4).double()
    x, y = torch.randn(30, 2, dtype=torch.float64), _mixed_labels(30)
    exact = model.loss(x, y, alpha=0.7, objective=objective)
    torch.testing.assert_close(model.loss(x, y, alpha=0.7, objective=objective, top_k=4), exact)


@pytest.mark.parametrize("objective", ["elbo", "marginal"])
def test_top_k_loss_is_the_loss_on_each_points_top_components(objective):
    """Reference: the dense log p(x, c) and q(c|x), restricted by hand to the k most
    probable components of q (the label first), q renormalised there."""
    k, top_k, n = 4, 2, 40
    model = random_model(k=k).double()
    x, y = torch.randn(n, 2, dtype=torch.float64), _mixed_labels(n)
    loss = model.loss(x, y, alpha=0.7, objective=objective, top_k=top_k)

    log_joint, log_q = model.mixture.log_joint(x), model.posterior(x)
    reference = []
    for i in range(n):
        if y[i] >= 0:
            reference.append(-log_joint[i, y[i]] - 0.7 * log_q[i, y[i]])
            continue
        top = log_q[i].detach().topk(top_k).indices
        q_top = torch.log_softmax(log_q[i, top], 0)
        joint_top = log_joint[i, top]
        if objective == "elbo":
            reference.append(-(q_top.exp() * (joint_top - q_top)).sum())
        else:
            target = torch.softmax(joint_top.detach(), 0)
            reference.append(-joint_top.logsumexp(0) - 0.7 * (target * q_top).sum())
    reference = torch.stack(reference)
    torch.testing.assert_close(loss, reference)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(reference.sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("objective", ["elbo", "marginal"])
def test_top_k_loss_still_bounds_log_p(objective):
    model = random_model(k=5).double()
    x = torch.randn(200, 2, dtype=torch.float64)
    y = torch.full((200,), -1)
    with torch.no_grad():
        bound = -model.loss(x, y, alpha=1.0, objective=objective, top_k=2)
        assert torch.all(bound <= model.mixture.log_prob(x) + 1e-12)


def test_top_k_elbo_is_the_bound_the_top_k_loss_trains():
    model = random_model(k=5).double()
    x = torch.randn(100, 2, dtype=torch.float64)
    unlabelled = torch.full((100,), -1)
    with torch.no_grad():
        trained = -model.loss(x, unlabelled, alpha=1.0, objective="elbo", top_k=2)
        torch.testing.assert_close(model.elbo(x, top_k=2), trained)
        torch.testing.assert_close(model.elbo(x, top_k=5), model.elbo(x))  # every component
        assert torch.all(model.elbo(x, top_k=2) <= model.mixture.log_prob(x) + 1e-12)


def test_top_k_path_initialises_actnorm_from_the_whole_batch():
    """The regrouped slices repeat point 0 as padding; ActNorm must not see them."""

    def fresh() -> VariationalMixture:
        torch.manual_seed(0)
        flows = ComponentFlows(n_features=2, n_components=3, n_layers=2, actnorm=True)
        return VariationalMixture(MixtureOfFlows(flows), PosteriorNet(2, 3, (8,))).double()

    x = torch.randn(64, 2, dtype=torch.float64) * 3.0 + 1.0
    y = torch.zeros(64, dtype=torch.long)
    y[:4] = 1  # component 2 owns no point of the batch
    sparse, dense = fresh().train(), fresh().train()
    loss = sparse.loss(x, y, alpha=1.0, objective="elbo", top_k=1)
    dense.mixture.log_joint(x)
    for a, b in zip(sparse.mixture.flows.layers, dense.mixture.flows.layers, strict=True):
        if isinstance(a, ActNorm):
            torch.testing.assert_close(a.loc, b.loc)
            torch.testing.assert_close(a.log_scale, b.log_scale)
    assert torch.isfinite(loss).all()


def test_model_loss_rejects_a_bad_top_k():
    model = random_model()
    x, y = torch.randn(5, 2), torch.full((5,), -1)
    with pytest.raises(ValueError, match="top_k"):
        model.loss(x, y, alpha=1.0, objective="elbo", top_k=0)


def test_schedule_scales_with_the_initial_temperature():
    schedule = TemperatureSchedule("exponential", 2.0, 1e-3, 0.01)
    assert schedule(1000) == pytest.approx(2.0 / math.e, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_posterior_divides_logits_by_the_temperature_once(temperature):
    posterior = random_model().posterior
    x = torch.randn(10, 2)
    expected = torch.log_softmax(posterior.net(x) / temperature, dim=-1)
    torch.testing.assert_close(posterior(x, temperature), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("objective", ["elbo", "marginal"])
def test_loss_uses_the_given_temperature(objective):
    model, x = random_model(), torch.randn(12, 2)
    unlabelled = model.loss(x, torch.full((12,), -1), alpha=1.0, objective="elbo", temperature=0.3)
    torch.testing.assert_close(unlabelled, -model.elbo(x, temperature=0.3), rtol=0, atol=1e-10)
    y = torch.randint(0, 3, (12,))
    labelled = model.loss(x, y, alpha=0.7, objective=objective, temperature=0.3)
    expected = labelled_loss(model.mixture.log_joint(x), model.posterior(x, 0.3), y, 0.7)
    torch.testing.assert_close(labelled, expected, rtol=0, atol=1e-10)


def test_posterior_refuses_temperatures_that_give_nan_or_a_reversed_q():
    q = PosteriorNet(2, 3)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for bad in (0.0, -1.0, float("nan")):  # NaN, or argmax flipped by T < 0
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            q(x, temperature=bad)
    with pytest.raises(ValueError, match=r"minimum temperature \(1\) must be <= the initial"):
        TemperatureSchedule("exponential", initial=0.1, minimum=1.0)


def test_posterior_refuses_points_of_the_wrong_shape_type_or_dtype():
    q = PosteriorNet(2, 3).float()
    for x, error, message in [
        (torch.randn(4, 3), ValueError, r"x must have shape \(N, 2\), got \(4, 3\)"),
        (torch.randn(4), ValueError, r"x must have shape \(N, 2\), got \(4,\)"),
        (torch.randn(4, 2).numpy(), TypeError, "x must be a torch.Tensor, got ndarray"),
        (
            torch.randn(4, 2).double(),
            TypeError,
            "float64 but the weights of the posterior are torch.float32",
        ),
        (torch.ones(4, 2, dtype=torch.long), TypeError, "dtype torch.int64"),
    ]:
        with pytest.raises(error, match=message):
            q(x)
    assert q.double()(torch.randn(4, 2).double()).dtype == torch.float64


def test_the_training_loss_and_the_batched_mlp_name_bad_arguments():
    """These failed deep inside torch (gather, broadcasting) or with a KeyError."""
    from vmonf.coupling import BatchedMLP

    model = random_model(3)
    x = torch.randn(5, 2)
    for y, error, match in [
        (torch.zeros(5), TypeError, "int64 tensor of labels, got torch.float64"),
        (torch.zeros(5, dtype=torch.long).numpy(), TypeError, "labels, got ndarray"),
        (torch.zeros(4, dtype=torch.long), ValueError, r"shape \(5,\)"),
        (torch.full((5,), 7), ValueError, r"labels in \[-1, 3\)"),
        (torch.full((5,), -2), ValueError, r"labels in \[-1, 3\)"),
    ]:
        with pytest.raises(error, match=match):
            model.loss(x, y, alpha=1.0, objective="elbo")
    assert model.loss(x, torch.full((5,), -1), alpha=1.0, objective="elbo").shape == (5,)
    with pytest.raises(ValueError, match="activation"):
        BatchedMLP(2, 3, 4, 8, 1, activation="swish")


def test_a_posterior_over_other_components_or_features_is_refused():
    """A q over 1 component broadcast against log p(x, c) (N, 3): a finite, wrong ELBO."""
    mixture = MixtureOfFlows(ComponentFlows(n_features=2, n_components=3, n_layers=2))
    with pytest.raises(ValueError, match="posterior has n_components=1 but the mixture"):
        VariationalMixture(mixture, PosteriorNet(2, 1))
    with pytest.raises(ValueError, match="posterior has n_features=3 but the mixture"):
        VariationalMixture(mixture, PosteriorNet(3, 3))
    with pytest.raises(TypeError, match="posterior must be a PosteriorNet"):
        VariationalMixture(mixture, torch.nn.Linear(2, 3))
    with pytest.raises(TypeError, match="flows must be a ComponentFlows, got str"):
        MixtureOfFlows("abc")


def test_calling_the_modules_gives_the_mixture_density_and_the_elbo():
    model = random_model()
    x = torch.randn(9, 2)
    torch.testing.assert_close(model.mixture(x), model.mixture.log_prob(x))
    torch.testing.assert_close(model(x, 0.5), model.elbo(x, 0.5))
    torch.testing.assert_close(model(x, top_k=2), model.elbo(x, top_k=2))


@pytest.mark.parametrize("weights", ["learned", "uniform"])
def test_mixture_density_is_minus_inf_at_infinity_with_no_nan_gradient(weights):
    model = random_model(weights=weights)
    mixture = model.mixture
    x = torch.tensor([[0.0, 0.0], [torch.inf, 0.0], [0.0, torch.nan], [1.0, -1.0]])
    log_p = mixture.log_prob(x)
    assert torch.isfinite(log_p[[0, 3]]).all() and log_p[1] == -torch.inf
    assert torch.isnan(log_p[2])
    torch.testing.assert_close(log_p[[0, 3]], mixture.log_prob(x[[0, 3]]))
    posterior = mixture.posterior(x)
    assert torch.isnan(posterior[[1, 2]]).all()
    torch.testing.assert_close(posterior[[0, 3]], mixture.posterior(x[[0, 3]]))
    components = torch.tensor([[0, 2], [1, 0], [2, 1], [1, 2]])
    at = mixture.log_joint_at(x, components)
    torch.testing.assert_close(at, mixture.log_joint(x).gather(1, components), equal_nan=True)
    joint = mixture.log_joint(x)
    assert (joint[1] == -torch.inf).all() and torch.isnan(joint[2]).all()
    loss = log_p[[0, 3]].sum() + posterior[[0, 3]].sum() + at[[0, 3]].sum()
    (loss + marginal_nll(joint)[[0, 3]].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name  # the logits too


def test_actnorm_still_refuses_to_start_from_non_finite_points():
    flows = ComponentFlows(n_features=2, n_components=2, n_layers=2, hidden_features=4,
                           actnorm=True)  # fmt: skip
    x = torch.tensor([[0.0, 1.0], [torch.nan, 0.0], [2.0, 3.0]])
    for log_p in (
        MixtureOfFlows(flows).log_prob,
        flows.log_prob,
        lambda u: flows.log_prob_stacked(u.expand(2, -1, -1)),
    ):
        with pytest.raises(ValueError, match="ActNorm cannot initialise from non-finite"):
            log_p(x)  # not started from the point set to 0
    assert not bool(flows.layers[0].initialized)


def test_trained_mixing_weights_do_not_load_into_a_uniform_mixture():
    learned = random_model(weights="learned").mixture
    flows = ComponentFlows(n_features=2, n_components=3, n_layers=3, hidden_features=8)
    uniform = MixtureOfFlows(flows, "uniform")
    before = copy.deepcopy(uniform.state_dict())
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"unequal mixing weights.*'uniform'"):
            uniform.load_state_dict(learned.state_dict(), strict=strict)
        for key, value in uniform.state_dict().items():  # nothing was copied in
            torch.testing.assert_close(value, before[key], msg=key)
    with pytest.raises(RuntimeError, match="unequal mixing weights"):  # nested, as in a model
        random_model(weights="uniform").load_state_dict(random_model().state_dict())
    with torch.no_grad():
        learned.weight_logits.fill_(0.7)  # equal weights: 1/K as uniform means
    uniform.load_state_dict(learned.state_dict())
    torch.testing.assert_close(uniform.log_weights(), torch.full((3,), -math.log(3)))
    MixtureOfFlows(flows, "learned").load_state_dict(uniform.state_dict())  # the other way


@pytest.mark.parametrize("weights", WEIGHT_MODES)
def test_a_mixture_built_around_moved_flows_follows_their_dtype_and_device(weights):
    """Its logits were made in torch's default dtype on the CPU: float32 flows gave float64
    densities under a float64 default, and CUDA flows a CPU tensor (tests/test_cuda.py)."""
    flows = ComponentFlows(2, 3, n_layers=1, hidden_features=4).float()
    mixture = MixtureOfFlows(flows, weights)
    assert mixture.weight_logits.dtype == torch.float32
    assert mixture.log_prob(torch.randn(5, 2, dtype=torch.float32)).dtype == torch.float32
