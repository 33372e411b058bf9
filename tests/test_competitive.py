"""Competitive training: generators, discriminators, assignment, the estimator, the k-means case."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from torch.distributions import Normal, kl_divergence

import competitive.estimator
import competitive.generators
from competitive import (
    CompetitiveMixture,
    Discriminators,
    FlowGenerators,
    KMeansGenerators,
    NoExactLikelihoodError,
    VAEGenerators,
    bagging,
    single_model,
)
from competitive.assignment import hard_assign, min_count, mixing_weights, training_weights
from competitive.discriminators import (
    fit_discriminators,
    log_ratio_normaliser,
    train_discriminators,
)
from competitive.studies import StudySettings
from vmonf import cli, datasets, training
from vmonf._gaussian import diagonal_normal_log_prob
from vmonf.checkpoint import load_checkpoint, save_checkpoint
from vmonf.cli import main
from vmonf.coupling import LULinear
from vmonf.training import NonFiniteLossError, TrainConfig

FAST = dict(
    n_layers=2,
    hidden_features=16,
    pretrain_epochs=2,
    max_epochs=2,
    max_rounds=4,
    batch_size=128,
    learning_rate=5e-3,
    dtype="float64",
)
MEANS = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])


def blobs(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return MEANS[y] + rng.normal(size=(n, 2)), y


def gaussian_log_prob(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """log N(x; mean_k, I), (N, K)."""
    return -0.5 * (x[:, None, :] - means).square().sum(-1) - math.log(2 * math.pi)


@pytest.fixture(scope="module")
def fitted() -> tuple[CompetitiveMixture, np.ndarray, np.ndarray]:
    X, y = blobs()
    return (
        CompetitiveMixture(
            3, random_state=0, validation_fraction=0.1, tol=0.0, activation="relu", **FAST
        ).fit(X),  # (ReLU: at 2 epochs a round it separates the blobs sooner than tanh)
        X,
        y,
    )


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize(
    "module",
    [
        lambda: FlowGenerators(2, 3, n_layers=2, hidden_features=8),
        lambda: VAEGenerators(2, 3, hidden_features=8),
        lambda: KMeansGenerators(2, 3),
    ],
    ids=["flow", "vae", "kmeans"],
)
def test_generators_shapes_and_every_parameter_gets_a_gradient(module):
    gens = module()
    with torch.no_grad():  # leave the zero-initialised (identity) last layers of couplings
        for p in gens.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(20, 2)
    loss = gens.per_point_loss(x)
    assert loss.shape == (20, 3) and loss.dtype == torch.float64
    loss.sum().backward()
    for name, p in gens.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert gens.sample(5).shape == (3, 5, 2)
    components = torch.tensor([2, 0, 0, 1, 2])
    assert gens.sample_components(components, None).shape == (5, 2)


def test_discriminators_every_parameter_gets_a_gradient():
    disc = Discriminators(2, 3, hidden_features=8)
    assert disc(torch.randn(10, 2)).shape == (10, 3)
    assert disc(torch.randn(3, 10, 2)).shape == (10, 3)
    disc(torch.randn(10, 2)).sum().backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_one_hot_mask_trains_only_the_owning_flow():
    """A component with no weighted point gets no gradient: the mask selects components."""
    gens = FlowGenerators(2, 3, n_layers=2, hidden_features=8)
    with torch.no_grad():
        for p in gens.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(40, 2)
    weights = torch.zeros(40, 3)
    weights[:20, 0] = 1.0
    weights[20:, 2] = 1.0
    (weights * gens.per_point_loss(x)).sum(1).mean().backward()
    for name, p in gens.named_parameters():
        grad = p.grad.reshape(3, -1) if p.shape[0] == 3 else None
        if grad is not None:
            assert grad[1].abs().max() == 0, name
            assert grad[0].abs().max() > 0 or grad[2].abs().max() > 0, name


@pytest.mark.parametrize("make", [FlowGenerators, VAEGenerators], ids=["flow", "vae"])
def test_a_generator_with_no_weight_is_left_as_it_was(make):
    """Weight decay alone must not shrink a generator that owns no point (min_share=0)."""
    torch.manual_seed(0)
    gens = make(2, 3, hidden_features=8)
    before = {name: p.detach().clone() for name, p in gens.named_parameters()}
    weights = torch.zeros(64, 3)
    weights[:32, 0] = weights[32:, 2] = 1.0
    config = TrainConfig(max_epochs=3, batch_size=16, weight_decay=1e-2, lr_schedule="constant")
    gens.fit_weighted(torch.randn(64, 2), weights, config, torch.Generator().manual_seed(0))
    for name, p in gens.named_parameters():
        torch.testing.assert_close(p[1], before[name][1], rtol=0, atol=0, msg=name)
    trained = [0, 2]
    assert any(not torch.equal(p[trained], before[n][trained]) for n, p in gens.named_parameters())


def test_flow_log_prob_is_exact_and_vae_has_none():
    gens = FlowGenerators(2, 2, n_layers=2, hidden_features=8)
    assert gens.log_prob(torch.randn(4, 2)).shape == (4, 2)
    vae = VAEGenerators(2, 2, hidden_features=8)
    with pytest.raises(NoExactLikelihoodError, match="KDE protocol"):
        vae.log_prob(torch.randn(4, 2))
    assert vae.log_likelihood_bound(torch.randn(4, 2)).shape == (4, 2)


def test_fit_weighted_and_sample_components_refuse_what_they_would_silently_bend():
    """Negative weights were dropped, a wrong K failed deep inside ("xs has 2 component
    slices") and fractional component indices were truncated."""
    gens = FlowGenerators(2, 3, n_layers=2, hidden_features=8)
    x, config = torch.randn(10, 2), TrainConfig(max_epochs=1, batch_size=10)
    for weights, match in [
        (-torch.ones(10, 3), "non-negative"),
        (torch.full((10, 3), math.nan), "non-negative"),
        (torch.ones(10, 2), r"weights must have shape \(10, 3\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            gens.fit_weighted(x, weights, config, torch.Generator())
    with pytest.raises(TypeError, match="integer component indices"):
        gens.sample_components(torch.tensor([0.5, 1.0]), None)
    with pytest.raises(ValueError, match="non-negative"):  # the closed-form override too
        KMeansGenerators(2, 3).fit_weighted(x, -torch.ones(10, 3), config, torch.Generator())
    assert gens.sample_components(torch.tensor([0.0, 2.0]), None).shape == (2, 2)


@pytest.mark.parametrize("make", [
    lambda: FlowGenerators(2, 3, n_layers=2, hidden_features=8),
    lambda: VAEGenerators(2, 3, hidden_features=8),
    lambda: KMeansGenerators(2, 3),
])  # fmt: skip
def test_generators_refuse_bad_points_and_training_inputs_by_name(make):
    """NaN points made every training step "non-finite" and the fit return untrained (a
    k-means centre became NaN); wrong shapes gave wrong-shaped results (k-means) or
    failed deep inside torch (VAEs)."""
    gens = make()
    x, config = torch.randn(10, 2), TrainConfig(max_epochs=1, batch_size=10)
    weights = torch.ones(10, 3)
    for bad, error, match in [
        (torch.randn(2), ValueError, r"x must have shape \(N, 2\), got \(2,\)"),
        (torch.randn(4, 3), ValueError, r"x must have shape \(N, 2\), got \(4, 3\)"),
        (torch.randn(4, 2, dtype=torch.float32), TypeError, "x has dtype torch.float32"),
        (np.zeros((4, 2)), TypeError, "x must be a torch.Tensor"),
    ]:
        with pytest.raises(error, match=match):
            gens.log_likelihood_bound(bad)
        with pytest.raises(error, match=match):
            gens.per_point_loss(bad)
    nan = x.clone()
    nan[3, 1] = math.nan
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        gens.fit_weighted(nan, weights, config, torch.Generator())
    with pytest.raises(TypeError, match=r"weights must be a torch\.Tensor, got ndarray"):
        gens.fit_weighted(x, weights.numpy(), config, torch.Generator())
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        gens.fit_weighted(x, weights, config, None)
    gens.fit_weighted(x, weights.long(), config, torch.Generator())  # bootstrap counts
    assert all(bool(torch.isfinite(p).all()) for p in gens.parameters())


def test_discriminators_refuse_bad_inputs_by_name():
    discriminators = Discriminators(2, 3, hidden_features=8)
    config = TrainConfig(max_epochs=1, batch_size=8)
    real, fake = torch.randn(8, 2), torch.randn(3, 8, 2)
    for bad, error, match in [
        (torch.randn(6, 3), ValueError, r"x must have shape \(N, 2\) or \(3, N, 2\)"),
        (torch.randn(2), ValueError, r"x must have shape"),
        (torch.randn(2, 6, 2), ValueError, "x has 2 component slices, expected 3"),
        (torch.randn(6, 2, dtype=torch.float32), TypeError, "x has dtype torch.float32"),
    ]:
        with pytest.raises(error, match=match):
            discriminators(bad)
    for args, error, match in [
        ((real.numpy(), fake), TypeError, "real must be a torch.Tensor"),
        ((real, fake.float()), TypeError, "fake has dtype torch.float32"),
        ((real, real), ValueError, r"fake must be \(K, N, D\) with K = 3"),
        ((real, fake[:, :5]), ValueError, r"as many points per generator as real has \(N = 8\)"),
    ]:
        with pytest.raises(error, match=match):
            fit_discriminators(discriminators, *args, config, torch.Generator())


def test_vae_max_log_var_must_be_a_positive_number():
    for bad, error in [(math.nan, ValueError), (0.0, ValueError), (-1.0, ValueError),
                       ("8", TypeError)]:  # fmt: skip
        with pytest.raises(error, match="max_log_var"):
            VAEGenerators(2, 3, max_log_var=bad)


def test_training_discriminators_leaves_the_generators_in_their_mode():
    gens = FlowGenerators(2, 3, n_layers=2, hidden_features=8).train()
    config = TrainConfig(max_epochs=1, batch_size=8)
    train_discriminators(Discriminators(2, 3, hidden_features=8), torch.randn(8, 2), gens,
                         config, torch.Generator())  # fmt: skip
    assert gens.training


def _linear_gaussian_vaes(encoder_gain: float, encoder_var: float) -> VAEGenerators:
    """Two identical linear VAEs in float64: x = 2 z[:2] + N(0, 0.25 I), z ~ N(0, I_5),
    whose marginal is N(0, 4.25 I); encoder q(z|x) = N(gain * c x, var * v) on z[:2]
    (gain = var = 1: the exact posterior) and the prior on the other latents."""
    vaes = VAEGenerators(2, 2, n_hidden_layers=0, latent_features=5).double()
    w, s2 = 2.0, 0.25
    c, v = w / (w * w + s2), s2 / (w * w + s2)
    with torch.no_grad():
        for p in vaes.parameters():
            p.zero_()
        vaes.decoder.weights[0][:, [0, 1], [0, 1]] = w
        vaes.decoder.biases[0][:, 0, 2:] = 8 * math.atanh(math.log(s2) / 8)  # bounded log-var
        vaes.encoder.weights[0][:, [0, 1], [0, 1]] = encoder_gain * c
        vaes.encoder.biases[0][:, 0, 5:7] = 8 * math.atanh(math.log(encoder_var * v) / 8)
    return vaes


@pytest.mark.parametrize("exact_posterior", [True, False])
def test_vae_mixture_bound_stays_below_the_exact_log_likelihood(exact_posterior):
    """log sum_k pi_k exp(bound_k) must be a lower bound in expectation: with the
    closed-form-KL ELBO as bound_k its noise made it 0.19 nats *above* log p."""
    vaes = _linear_gaussian_vaes(*((1.0, 1.0) if exact_posterior else (0.7, 1.5)))
    torch.manual_seed(0)
    x = torch.randn(20_000, 2, dtype=torch.float64) * math.sqrt(4.25)
    exact = Normal(0.0, math.sqrt(4.25)).log_prob(x).sum(1)
    with torch.no_grad():
        bound = torch.logsumexp(vaes.log_likelihood_bound(x) + math.log(0.5), dim=1)
    gap = bound - exact
    if exact_posterior:  # the importance weight is then p(x) itself, noise-free
        torch.testing.assert_close(bound, exact, rtol=0, atol=1e-8)
    else:
        assert gap.mean() < -3 * gap.std() / math.sqrt(len(gap))


# --------------------------------------------------------------------------- assignment


def test_hard_assign_needs_an_n_by_k_tensor():
    with pytest.raises(ValueError, match=r"scores must be an \(N, K\) tensor"):
        hard_assign(torch.zeros(4))


def test_hard_assign_breaks_ties_deterministically():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 1.0, 3.0], [math.nan, 0.0, 1.0]])
    np.testing.assert_array_equal(hard_assign(scores).numpy(), [0, 1, 0, 2])
    previous = torch.tensor([1, 2, 1, 0])
    # keep the previous owner when it is among the maxima, else the lowest maximal index
    np.testing.assert_array_equal(hard_assign(scores, previous).numpy(), [1, 2, 0, 2])


def test_load_balancing_lends_best_points_and_zeroes_the_weight():
    scores = torch.tensor(
        [[0.0, -1.0, -5.0], [0.0, -2.0, -1.0], [0.0, -3.0, -2.0], [-4.0, 0.0, -3.0]]
    )
    owners = hard_assign(scores)  # [0, 0, 0, 1]: component 2 starves
    weights = training_weights(owners, scores, minimum=1)
    expected = torch.tensor([[1.0, 0, 0], [1, 0, 1], [1, 0, 0], [0, 1, 0]])
    torch.testing.assert_close(weights, expected)  # 2 trains on its best point, owner kept
    pi = mixing_weights(owners, 3, minimum=1)
    torch.testing.assert_close(pi, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))
    pi = mixing_weights(owners, 3, minimum=2)  # component 1 (one point) is now starved too
    torch.testing.assert_close(pi, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_a_component_owning_exactly_the_minimum_borrows_nothing():
    scores = torch.tensor([[5.0, 1.0], [0.0, -2.0], [-1.0, 0.0], [0.0, -0.5]])
    owners = hard_assign(scores)  # [0, 0, 1, 0]; component 1 scores best on point 0
    weights = training_weights(owners, scores, minimum=1)  # 1 owns exactly 1 point
    torch.testing.assert_close(weights, torch.nn.functional.one_hot(owners, 2).to(scores))
    lent = training_weights(owners, scores, minimum=2)  # now starved: borrows points 0, 2
    torch.testing.assert_close(lent[:, 1], torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_min_count_is_not_pushed_up_by_float_error():
    assert 0.1 / 7 * 210 > 3  # the float product is a hair above the exact 3
    assert min_count(210, 0.1 / 7) == 3
    assert min_count(211, 0.1 / 7) == 4
    assert min_count(100, 0.0) == 0


def test_tol_none_runs_every_round_and_counts_as_converged():
    X, _ = blobs(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = CompetitiveMixture(3, **{**FAST, "max_rounds": 3}, tol=None, random_state=0).fit(X)
    assert model.n_iter_ == len(model.history_["n_changed"]) == 3 and model.converged_
    early = CompetitiveMixture(3, **{**FAST, "max_rounds": 3}, tol=0.5, random_state=0).fit(X)
    assert early.n_iter_ == 1  # the same run with a tol stops at its first round
    with pytest.raises(ValueError, match="tol"):
        CompetitiveMixture(3, tol=-0.1).fit(X)
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\), None or 'auto', got 'exact'"):
        CompetitiveMixture(3, tol="exact").fit(X)


@pytest.mark.parametrize(("generator", "resolved"), [("flow", 0.02), ("vae", 0.02), ("kmeans", 0)])
def test_tol_auto_is_0_for_kmeans_and_0_02_for_stochastically_trained_generators(
    generator, resolved
):
    """tol=0, the old default, ended most flow fits with a ConvergenceWarning."""
    model = CompetitiveMixture(3, generator=generator)
    assert model.tol == "auto" and model._tol() == resolved
    assert CompetitiveMixture(3, generator=generator, tol=0.1)._tol() == 0.1


@pytest.mark.parametrize(
    ("generator", "rule"), [("flow", "exact"), ("kmeans", "exact"), ("vae", "discriminator")]
)
def test_assignment_auto_uses_exact_likelihoods_where_there_are_any(generator, rule, tmp_path):
    X, _ = blobs(200)
    settings = {**FAST, "max_rounds": 1, "validation_fraction": 0.0}
    model = CompetitiveMixture(2, generator=generator, random_state=0, **settings).fit(X)
    assert model.assignment == "auto" and model._exact_assignment() == (rule == "exact")
    assert (model.model_.discriminators is not None) == (rule == "discriminator")
    explicit = CompetitiveMixture(2, generator=generator, assignment=rule, random_state=0)
    np.testing.assert_array_equal(explicit.set_params(**settings).fit(X).labels_, model.labels_)
    loaded = CompetitiveMixture.load(model.save(tmp_path / "m.pt"))
    assert loaded.assignment == "auto"
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


@pytest.mark.parametrize(("generator", "activation"), [("flow", "tanh"), ("vae", "relu")])
def test_activation_defaults_to_tanh_for_flows_and_relu_for_vaes(generator, activation):
    """ReLU flows extrapolate into the tails: held-out skewed_gmm points scored up to
    107 nats below their true log density with the defaults (tanh: 4-6)."""
    X, _ = blobs(60)

    def activations(model: CompetitiveMixture) -> set[str]:
        modules = model.fit(X).model_.generators.modules()
        return {m.activation_name for m in modules if hasattr(m, "activation_name")}

    default = CompetitiveMixture(2, generator=generator, random_state=0, **FAST)
    assert activations(default) == {activation}
    assert activations(default.set_params(activation="relu")) == {"relu"}


def test_default_flow_fit_on_pinwheel_converges_without_a_warning():
    X, _ = datasets.toy("pinwheel", n_classes=3).sample(600, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = CompetitiveMixture(
            3, init="kmeans", n_layers=2, hidden_features=16, max_epochs=3, random_state=0
        ).fit(X)
    assert model.converged_ and model.n_iter_ < model.max_rounds


def test_starved_component_recovers(fitted):
    """With load balancing every component keeps (or regains) points on separated blobs."""
    model, X, y = fitted
    assert np.all(np.bincount(model.labels_, minlength=3) > 0)
    assert adjusted_rand_score(y, model.predict(X)) > 0.99


# --------------------------------------------------------------------------- k-means case


def test_kmeans_generator_reproduces_sklearn_kmeans_from_the_same_centres(tmp_path):
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(c, 1.5, size=(200, 2)) for c in ([0, 0], [4, 1], [1, 4])])
    Z = (X - X.mean(0)) / X.std(0)  # the estimator clusters in standardised units
    centres = Z[[0, 1, 2]]  # three points of the first blob: a poor start, many Lloyd steps
    owners0 = np.argmin(((Z[:, None] - centres) ** 2).sum(-1), axis=1)
    km = KMeans(3, init=centres, n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(Z)
    model = CompetitiveMixture(
        3,
        generator="kmeans",
        init=owners0,  # pre-training = the first centre update from `centres`
        max_rounds=300,
        min_share=0.0,
        validation_fraction=0.0,
        dtype="float64",
        random_state=0,
    ).fit(X)
    assert model.converged_ and model.n_iter_ > 2
    np.testing.assert_array_equal(model.labels_, km.labels_)
    np.testing.assert_array_equal(model.predict(X), km.labels_)
    np.testing.assert_allclose(
        model.model_.generators.centres.detach().numpy(), km.cluster_centers_, atol=1e-10
    )
    loaded = CompetitiveMixture.load(model.save(tmp_path / "kmeans.pt"))
    np.testing.assert_array_equal(loaded.predict(X), km.labels_)


# --------------------------------------------------------------------------- discriminators


def test_discriminator_estimate_agrees_with_exact_argmax_for_true_generators():
    """Generators equal to the true modes: the density-ratio argmax is the exact argmax."""
    torch.manual_seed(0)
    means = torch.tensor(MEANS) / 4.0
    y = torch.randint(0, 3, (1500,))
    x = means[y] + torch.randn(1500, 2) / 4.0
    fake = means[:, None, :] + torch.randn(3, 1500, 2) / 4.0  # samples of each true mode
    disc = Discriminators(2, 3, hidden_features=64)
    config = TrainConfig(
        max_epochs=6, batch_size=64, learning_rate=3e-3, adam_betas=(0.5, 0.999),
        lr_schedule="constant",
    )  # fmt: skip
    fit_discriminators(disc, x, fake, config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        estimate = disc.log_ratio(x) - log_ratio_normaliser(disc, x)
    exact = gaussian_log_prob(x * 4.0, means * 4.0)
    agreement = (estimate.argmax(1) == exact.argmax(1)).double().mean()
    assert agreement >= 0.99
    # the normalised ratio estimates log p_k - log p_data, which averages ~0 on the owner
    p_data = torch.logsumexp(exact - math.log(3), 1)
    owner_err = estimate.gather(1, y[:, None]).squeeze(1) - (exact[torch.arange(1500), y] - p_data)
    assert owner_err.median().abs() < 0.5


def test_fit_discriminators_rejects_mismatched_shapes():
    disc = Discriminators(2, 3, hidden_features=8)
    with pytest.raises(ValueError, match="fake"):
        fit_discriminators(disc, torch.randn(10, 2), torch.randn(2, 10, 2), TrainConfig(), None)


# --------------------------------------------------------------------------- estimator


def test_by_default_every_point_trains_and_no_validation_score_is_kept():
    X, _ = blobs(300)
    model = CompetitiveMixture(3, random_state=0, **FAST).fit(X)
    assert "val_score" not in model.history_
    shares = np.bincount(model.labels_, minlength=3) / len(X)
    np.testing.assert_allclose(np.sort(model.history_["share"][-1]), np.sort(shares))


def test_fit_sets_history_and_weights(fitted):
    model, X, _ = fitted
    h = model.history_
    assert set(h) == {"share", "n_changed", "epochs", "val_score", "round_time", "time"}
    assert len(h["share"]) == model.n_iter_ and all(len(s) == 3 for s in h["share"])
    assert all(np.isfinite(h["val_score"]))
    np.testing.assert_allclose(model.weights_.sum(), 1.0)
    np.testing.assert_allclose(np.sort(model.weights_), np.sort(h["share"][-1]), atol=1e-12)
    assert model.score_samples(X[:7]).shape == (7,)
    np.testing.assert_allclose(model.elbo(X[:7]), model.score_samples(X[:7]), atol=1e-10)
    samples, labels = model.sample(11, random_state=0)
    assert samples.shape == (11, 2) and labels.shape == (11,)
    np.testing.assert_allclose(model.predict_proba(X[:5]).sum(1), 1.0)


def test_kmeans_generators_are_unit_gaussians_at_their_centres():
    centres = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.5, 0.0]], dtype=torch.float64)
    gens = competitive.generators.KMeansGenerators(3, 2, centres=centres)
    x = torch.randn(20, 3, dtype=torch.float64)
    expected = torch.stack(
        [Normal(c, 1.0).log_prob(x).sum(-1) for c in centres], dim=1
    )  # fmt: skip
    torch.testing.assert_close(gens.log_prob(x), expected)


def test_save_load_round_trip(fitted, tmp_path):
    model, X, _ = fitted
    loaded = CompetitiveMixture.load(model.save(tmp_path / "m.pt"))
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_array_equal(loaded.sample(5, random_state=1)[0], model.sample(5, 1)[0])
    assert loaded.history_ == model.history_ and loaded.n_iter_ == model.n_iter_
    for name in ("pretrain_time_", "fit_time_", "converged_", "n_features_in_"):
        assert getattr(loaded, name) == getattr(model, name), name
    for name in ("labels_", "weights_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    # Format 1 built hidden_features=0 at the default width (64); it loads as None.
    default_width = CompetitiveMixture(2, n_layers=1, pretrain_epochs=1, max_rounds=0).fit(X)
    kind = "CompetitiveMixture"
    payload = load_checkpoint(default_width.save(tmp_path / "w.pt"), kind)
    del payload["format"]
    payload["params"]["hidden_features"] = 0
    old = CompetitiveMixture.load(save_checkpoint(payload, tmp_path / "old.pt", kind))
    assert old.hidden_features is None
    np.testing.assert_array_equal(old.score_samples(X), default_width.score_samples(X))


def test_same_seed_reproduces_different_seed_differs():
    X, _ = blobs(300)
    params = {**FAST, "max_rounds": 2}
    a = CompetitiveMixture(3, random_state=5, **params).fit(X)
    b = CompetitiveMixture(3, random_state=5, **params).fit(X)
    c = CompetitiveMixture(3, random_state=6, **params).fit(X)
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    for x, y in zip(a.sample(20, random_state=3), b.sample(20, random_state=3), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.history_["n_changed"] == b.history_["n_changed"]
    assert not np.array_equal(a.score_samples(X), c.score_samples(X))


def test_discriminator_assignment_with_vaes_and_its_save_load(tmp_path):
    X, _ = blobs(300)
    model = CompetitiveMixture(
        3, generator="vae", assignment="discriminator", hidden_features=16,
        discriminator_hidden=32, discriminator_batch_size=64, pretrain_epochs=3, max_epochs=2,
        max_rounds=2, batch_size=64, learning_rate=5e-3, keep_discriminators=True,
        random_state=0, dtype="float64",
    ).fit(X)  # fmt: skip
    with pytest.raises(NoExactLikelihoodError, match="KDE protocol"):
        model.score_samples(X)
    state = torch.get_rng_state()
    bound = model.elbo(X)  # a one-sample bound, from fixed noise
    assert np.all(np.isfinite(bound)) and torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(model.elbo(X), bound)
    assert model.predict(X).shape == (300,)
    ratio = model.log_ratio(X)
    assert ratio.shape == (300, 3) and np.all(np.isfinite(ratio))
    np.testing.assert_array_equal(ratio.argmax(1), model.predict(X))
    loaded = CompetitiveMixture.load(model.save(tmp_path / "vae.pt"))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_array_equal(loaded.sample(4, random_state=0)[0], model.sample(4, 0)[0])


def test_baselines_bagging_and_single_model():
    X, _ = blobs(300)
    bag = bagging(3, epochs=2, n_layers=2, hidden_features=8, random_state=0).fit(X)
    np.testing.assert_allclose(bag.weights_, 1 / 3)
    assert bag.n_iter_ == 0 and bag.converged_
    one = single_model(generator="vae", epochs=2, random_state=0).fit(X)
    assert one.weights_.tolist() == [1.0]
    assert one.model_.generators.encoder.weights[0].shape == (1, 2, 150)
    assert one.sample(10, random_state=0)[0].shape == (10, 2)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"generator": "gan"}, ValueError, "generator"),
        ({"callback": "print"}, TypeError, "callback must be callable"),
        ({"assignment": "soft"}, ValueError, "assignment"),
        ({"generator": "vae", "assignment": "exact"}, ValueError, "discriminator"),
        ({"generator": "vae", "assignment": "discriminator", "base_df": 5.0}, ValueError, "VAE"),
        ({"generator": "kmeans", "base_df": 5.0}, ValueError, "k-means generators have none"),
        ({"hidden_features": 0}, ValueError, "hidden_features"),
        ({"discriminator_hidden": 0}, ValueError, "discriminator_hidden"),
        ({"discriminator_layers": -1}, ValueError, "discriminator_layers"),
        ({"assign_with_weights": "no"}, TypeError, "assign_with_weights must be True or False"),
        ({"keep_discriminators": 2}, TypeError, "keep_discriminators"),
        ({"decoder_noise": "False"}, TypeError, "decoder_noise"),
        (
            {"generator": "vae", "assignment": "discriminator", "activation": "foo"},
            ValueError,
            "activation",
        ),
        ({"init": np.zeros((60, 3), dtype=int)}, ValueError, "init as an array must be 1-D"),
        ({"init": "kmeans++"}, ValueError, "init"),
        ({"min_share": 0.5}, ValueError, "min_share"),
        ({"tol": 1.0}, ValueError, "tol"),
        ({"max_rounds": -1}, ValueError, "max_rounds"),
        ({"pretrain_epochs": 1.5}, TypeError, "pretrain_epochs"),
        ({"discriminator_batch_size": 0}, ValueError, "discriminator_batch_size"),
        ({"adam_betas": (0.9, 1.5)}, ValueError, "adam_betas"),
        ({"adam_betas": 0.9}, TypeError, "adam_betas"),
        ({"discriminator_betas": (1.5, 0.9)}, ValueError, "discriminator_betas"),
        ({"init": np.zeros(5)}, ValueError, "init"),
    ],
)
def test_bad_parameters_name_the_argument(params, error, match):
    X, _ = blobs(60)
    with pytest.raises(error, match=match):
        CompetitiveMixture(3, **{**FAST, **params}).fit(X)


def test_components_left_without_points_are_warned_about_with_a_hint():
    """assign_with_weights with init="uniform": the generators start alike and one
    takes all three blobs through its weight; this once ended silently, converged."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(150, 2)) + c for c in ([0, 0], [10, 0], [0, 10])])
    params = dict(random_state=0, tol=0.02, n_layers=2, hidden_features=16, pretrain_epochs=3,
                  max_epochs=3, max_rounds=6, activation="relu")  # fmt: skip
    with pytest.warns(UserWarning, match=r"\(s\) \[\d, \d\] ended with mixing weight 0.*'kmeans'"):
        model = CompetitiveMixture(3, assign_with_weights=True, **params).fit(X)
    assert (model.weights_ == 0).sum() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompetitiveMixture(3, assign_with_weights=True, init="kmeans", **params).fit(X)


def test_without_rounds_discriminator_assignment_refuses_instead_of_guessing():
    """max_rounds=0 trains no discriminator: predict must not read untrained networks."""
    X, _ = blobs(60)
    params = {**FAST, "max_rounds": 0}
    model = CompetitiveMixture(2, assignment="discriminator", random_state=0, **params).fit(X)
    assert model.model_.discriminators is None
    with pytest.raises(ValueError, match="no discriminators were trained"):
        model.predict(X)
    with pytest.raises(ValueError, match="max_rounds >= 1"):
        model.log_ratio(X)
    assert model.n_parameters() == _free_parameters(model.model_.generators)
    assert np.isfinite(model.score(X))  # the flows' exact density is still there


def _free_parameters(module: torch.nn.Module) -> int:
    """Trained entries that reach the density: LULinear reads only the strict
    triangles of its (K, D, D) ``lower`` and ``upper`` factors."""
    total = sum(p.numel() for p in module.parameters())
    for layer in module.modules():
        if isinstance(layer, LULinear):
            k, d, _ = layer.lower.shape
            total -= 2 * (k * d * d - k * d * (d - 1) // 2)
    return total


def test_a_fit_failing_in_pre_training_keeps_no_untrained_discriminators(tmp_path):
    X, _ = blobs(300)
    model = CompetitiveMixture(
        2, **{**FAST, "learning_rate": 1e35, "batch_size": 8}, assignment="discriminator",
        random_state=0,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError):
        model.fit(X)
    assert model.n_iter_ == 0 and model.model_.discriminators is None
    with pytest.raises(ValueError, match="a fit that reached its first assignment"):
        model.predict(X)
    assert (model.labels_ == -1).all()  # no assignment ran, and no rule was trained
    loaded = CompetitiveMixture.load(model.save(tmp_path / "m.pt"))  # saved without them
    assert loaded.model_.discriminators is None


def test_a_fit_failing_mid_rounds_keeps_the_last_assignment():
    X, _ = blobs(300)
    shares = {}

    def blow_up_after_round_1(estimator, round_):
        if round_ == 1:
            shares["round 1"] = np.bincount(estimator.predict(X), minlength=2)
            with torch.no_grad():
                for p in estimator.model_.generators.parameters():
                    p.fill_(math.nan)

    model = CompetitiveMixture(
        2, **{**FAST, "validation_fraction": 0.0, "tol": None}, init="uniform",
        random_state=0, callback=blow_up_after_round_1,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError):
        model.fit(X)
    assert model.n_iter_ == 1
    np.testing.assert_array_equal(np.bincount(model.labels_, minlength=2), shares["round 1"])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_the_callbacks_time_is_not_counted_against_max_time(monkeypatch):
    now = [0.0]  # a clock that only the callback moves, 100 "seconds" per round
    fake_time = SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(training, "time", fake_time)
    monkeypatch.setattr(competitive.estimator, "time", fake_time)

    def slow_callback(estimator: CompetitiveMixture, round_: int) -> None:
        now[0] += 100.0

    X, _ = blobs(300)
    model = CompetitiveMixture(
        3, **FAST, max_time=50.0, callback=slow_callback, random_state=0
    ).fit(X)
    assert model.n_iter_ >= 1  # not stopped by round 0's callback
    assert model.history_["time"] == [0.0] * model.n_iter_
    assert model.pretrain_time_ == 0.0


def test_history_time_is_the_running_fit_time(monkeypatch):
    clock = itertools.count(step=1.0)  # a second passes at every look at the clock
    fake_time = SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(training, "time", fake_time)
    monkeypatch.setattr(competitive.estimator, "time", fake_time)
    X, _ = blobs(300)
    model = CompetitiveMixture(
        3, generator="kmeans", max_rounds=3, tol=None, random_state=0
    ).fit(X)  # fmt: skip
    times, rounds = model.history_["time"], model.history_["round_time"]
    assert len(times) == 3 and all(b > a for a, b in itertools.pairwise(times))
    for i, elapsed in enumerate(times):  # pre-training and every round so far, at least
        assert elapsed >= model.pretrain_time_ + sum(rounds[: i + 1])


def test_val_score_scores_the_held_out_rows(monkeypatch):
    X, _ = blobs(400)
    X[300:] += 20.0  # held-out rows far from the training ones
    monkeypatch.setattr(
        CompetitiveMixture, "_split", lambda self, n, g: (torch.arange(300), torch.arange(300, 400))
    )
    model = CompetitiveMixture(3, generator="kmeans", max_rounds=2, tol=None, random_state=0)
    model.fit(X)
    assert model.history_["val_score"][-1] == pytest.approx(model.score(X[300:]), rel=1e-6)
    assert model.history_["val_score"][-1] != pytest.approx(model.score(X[:300]), rel=0.1)


def test_baselines_refuse_rounds_they_would_drop():
    with pytest.raises(TypeError, match="no competitive round: drop max_rounds"):
        bagging(2, max_rounds=5)
    with pytest.raises(TypeError, match="no competitive round: drop max_rounds"):
        single_model(max_rounds=1)


def test_a_diverged_fit_is_flagged_not_returned_as_converged():
    X, _ = blobs(200)
    settings = {**FAST, "learning_rate": 5.0, "batch_size": 16, "max_rounds": 0}
    with pytest.warns(ConvergenceWarning, match=r"fit diverged: .* nats per point below"):
        model = CompetitiveMixture(2, **settings, random_state=0).fit(X)
    assert not model.converged_


def test_a_fit_stopped_by_max_time_says_so(monkeypatch):
    clock = itertools.count(step=10.0)  # 10 "seconds" pass at every look at the clock
    fake_time = SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(training, "time", fake_time)
    monkeypatch.setattr(competitive.estimator, "time", fake_time)
    X, _ = blobs(300)
    with pytest.warns(ConvergenceWarning, match=r"after 0 round\(s\) .*; raise max_time$"):
        model = CompetitiveMixture(3, **FAST, max_time=5.0, random_state=0).fit(X)
    assert not model.converged_


def test_labels_follow_the_rows_of_X_with_a_validation_split():
    X, y = blobs(400)
    model = CompetitiveMixture(3, **FAST, generator="kmeans", init="kmeans",
                               validation_fraction=0.2, random_state=0).fit(X)  # fmt: skip
    assert model.labels_.shape == (400,)
    np.testing.assert_array_equal(model.labels_, model.predict(X))
    assert adjusted_rand_score(y, model.labels_) > 0.95


def test_without_rounds_every_row_is_labelled_by_the_final_rule():
    X, _ = blobs(300)
    model = CompetitiveMixture(3, **{**FAST, "max_rounds": 0, "validation_fraction": 0.1},
                               init="uniform", random_state=0).fit(X)  # fmt: skip
    np.testing.assert_array_equal(model.labels_, model.predict(X))  # not init's argmax (0)


def test_set_params_after_a_fit_changes_the_next_fit_not_this_one(tmp_path):
    """Predictions and saved files keep the fitted settings: set_params(assignment=...)
    after an exact fit used to make predict refuse, and save write an unloadable file."""
    X, _ = blobs(300)
    model = CompetitiveMixture(3, random_state=0, **{**FAST, "max_rounds": 1}).fit(X)
    proba, bic = model.predict_proba(X), model.bic(X)
    model.set_params(assignment="discriminator", assign_with_weights=True, n_layers=3)
    np.testing.assert_array_equal(model.predict_proba(X), proba)
    assert model.bic(X) == bic
    loaded = CompetitiveMixture.load(model.save(tmp_path / "m.pt"))
    assert loaded.get_params()["assignment"] == "auto"  # as fitted (exact for flows)
    np.testing.assert_array_equal(loaded.predict_proba(X), proba)
    model.fit(X)
    assert model.fitted_params_["assignment"] == "discriminator"
    assert model.model_.discriminators is not None


def test_bic_counts_the_generators_and_the_free_weights_not_the_discriminators():
    X, _ = blobs(200)
    params = {**FAST, "max_rounds": 1, "discriminator_hidden": 8, "random_state": 0}
    exact = CompetitiveMixture(2, **params).fit(X)
    ratio = CompetitiveMixture(2, assignment="discriminator", **params).fit(X)
    n_flows = _free_parameters(exact.model_.generators)
    assert any(isinstance(m, LULinear) for m in exact.model_.generators.modules())
    assert exact.n_parameters() == ratio.n_parameters() == n_flows + 1  # K - 1 = 1 weight


def test_bad_input_and_labels():
    X, y = blobs(60)
    without = CompetitiveMixture(3, **FAST, random_state=0).fit(X)
    ignored = CompetitiveMixture(3, **FAST, random_state=0).fit(X, y + 7)  # any labels
    np.testing.assert_array_equal(ignored.labels_, without.labels_)
    with pytest.raises(ValueError, match="NaN"):
        CompetitiveMixture(3, **FAST).fit(np.full((10, 2), np.nan))
    with pytest.raises(ValueError, match="not fitted"):
        CompetitiveMixture(3).predict(X)


# --------------------------------------------------------------------------- the command


def test_compete_command_writes_metrics_checkpoint_and_figures(tmp_path, monkeypatch):
    clock = itertools.count()  # each call of the round recorder takes 1 "second"
    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    out = tmp_path / "run"
    argv = [
        "compete", "skewed_gmm", "--toy-param", "n_modes=3", "--n-train", "600",
        "--n-test", "600", "--rounds", "2", "--epochs", "1", "--pretrain-epochs", "1",
        "--layers", "2", "--hidden", "8", "--quiet", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["command"] == "compete"
    assert math.isfinite(report["metrics"]["kl_to_truth"])
    assert len(report["history"]["share"]) == report["fitted"]["n_rounds"]
    for name in ("model.pt", "assignments.png", "samples.png", "shares.png"):
        assert (out / name).is_file(), name
    fitted = CompetitiveMixture.load(out / "model.pt")
    assert fitted.n_components == 3
    # Recording the assignments (after pre-training and each round) is not fit time.
    assert report["metrics"]["recording_time"] == report["fitted"]["n_rounds"] + 1
    fit_time = report["metrics"]["fit_time"]
    assert fit_time == pytest.approx(fitted.fit_time_ - report["metrics"]["recording_time"])


def test_the_command_prints_warnings_as_one_line_each(tmp_path, capsys):
    argv = [
        "compete", "pinwheel", "--n-train", "200", "--n-test", "64", "--rounds", "1",
        "--tol", "0", "--epochs", "1", "--pretrain-epochs", "1", "--quiet",
        "--out", str(tmp_path / "r"),
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "vmonf: warning: CompetitiveMixture: assignments still changed" in err
    assert "raise --rounds or --tol (e.g. --tol 0.02" in err  # the options, not max_rounds
    assert ".py:" not in err  # no Python source location


@pytest.mark.parametrize(
    ("generator", "tol", "hint"),
    [
        ("flow", 0.0, "raise max_rounds or tol (e.g. tol=0.02: boundary points of "
                      "stochastically trained flows keep moving)"),
        ("vae", 0.0, "raise max_rounds or tol (e.g. tol=0.02: boundary points of "
                     "stochastically trained VAEs keep moving)"),
        ("flow", 0.02, "raise max_rounds or tol"),  # not "e.g. tol=0.02" when it is 0.02
        ("kmeans", 0.0, "raise max_rounds"),  # Lloyd's steps settle: no flows, no tol
    ],
)  # fmt: skip
def test_the_convergence_hint_fits_the_generator_and_tol(generator, tol, hint):
    """It spoke of flows for k-means and suggested tol=0.02 when tol was 0.02 already."""
    model = CompetitiveMixture(3, generator=generator, tol=tol)
    assert model._convergence_hint() == hint


def test_compete_with_vaes_says_why_there_is_no_kl(tmp_path, capsys):
    # --assignment left out: discriminator, the only one VAEs allow, is their default
    argv = [
        "compete", "pinwheel", "--generator", "vae",
        "--n-train", "200", "--n-test", "64", "--rounds", "1", "--epochs", "1",
        "--pretrain-epochs", "1", "--quiet", "--out", str(tmp_path / "r"),
    ]  # fmt: skip
    assert main(argv) == 0
    kl = next(line for line in capsys.readouterr().out.splitlines() if "KL(truth" in line)
    assert "n/a  (no exact density" in kl and "±" not in kl  # it said "n/a ± n/a"


def test_compete_without_rounds_prints_no_time_per_round(tmp_path, capsys):
    argv = [
        "compete", "pinwheel", "--n-train", "200", "--n-test", "64", "--rounds", "0",
        "--pretrain-epochs", "1", "--quiet", "--out", str(tmp_path / "r"),
    ]  # fmt: skip
    assert main(argv) == 0
    fit_time = next(line for line in capsys.readouterr().out.splitlines() if "fit time" in line)
    assert "per round" not in fit_time  # it said "(n/a s per round)"


def test_vmonf_never_imports_competitive():
    code = "import sys, vmonf, vmonf.cli; assert 'competitive' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_public_helpers_check_their_inputs():
    scores = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"previous must lie in \[0, 2\)"):
        hard_assign(scores, previous=torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="assignment must lie"):
        training_weights(torch.tensor([0, 1, 3]), scores, 1)
    with pytest.raises(ValueError, match="assignment must lie"):
        mixing_weights(torch.tensor([0, 1, 5]), 3, 1)  # was a (6,) vector
    with pytest.raises(TypeError, match=r"centres must be a torch\.Tensor"):
        KMeansGenerators(2, 3, centres=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="centres must be finite"):
        KMeansGenerators(2, 1, centres=torch.full((1, 2), math.nan))
    kmeans = KMeansGenerators(2, 3)
    with pytest.raises(ValueError, match="n must be"):
        kmeans.sample(-1)
    with pytest.raises(ValueError, match=r"components must lie in \[0, 3\)"):
        kmeans.sample_components(torch.tensor([0, 3]), None)
    discriminators = Discriminators(2, 3, hidden_features=4)
    with pytest.raises(ValueError, match="at least one point"):
        log_ratio_normaliser(discriminators, torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        discriminators.log_ratio(torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"weights of the discriminators are torch\.float64"):
        discriminators.double().log_ratio(torch.zeros(4, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="max_rounds"):
        StudySettings(max_rounds=0)


# --------------------------------------------------------------------------- mutation audit


def test_a_starved_component_keeps_training_on_the_points_it_owns():
    # Component 1 owns point 0, where its score is the lowest of its column.
    scores = torch.tensor([[-9.0, -8.0], [0.0, -1.0], [0.0, -2.0], [0.0, -3.0]])
    owners = hard_assign(scores)
    assert owners.tolist() == [1, 0, 0, 0]
    weights = training_weights(owners, scores, minimum=2)
    expected = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(weights, expected)  # its own point and its 2 best others


def test_min_count_rounds_up():
    assert min_count(10, 0.25) == 3
    assert min_count(10, 0.2) == 2
    assert min_count(7, 0.0) == 0


def test_mixing_weights_fall_back_to_plain_shares_when_nobody_reaches_the_minimum():
    pi = mixing_weights(torch.tensor([0, 0, 1]), 2, minimum=5)
    torch.testing.assert_close(pi, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


def test_gaussian_log_prob_matches_torch_distributions():
    x, mean, log_var = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    expected = Normal(mean, (0.5 * log_var).exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(diagonal_normal_log_prob(x, mean, log_var), expected)


def test_vae_loss_is_the_negative_one_sample_elbo():
    vae = VAEGenerators(3, 2, hidden_features=8, latent_features=2)
    xs = torch.randn(2, 5, 3)
    torch.manual_seed(1)
    loss = vae.stacked_loss(xs)
    torch.manual_seed(1)
    mu, log_var = vae._split(vae.encoder(xs))
    std = (0.5 * log_var).exp()
    z = mu + std * torch.randn_like(mu)  # the same reparameterised draw
    mean, decoder_log_var = vae._split(vae.decoder(z))
    kl = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(-1)
    reconstruction = Normal(mean, (0.5 * decoder_log_var).exp()).log_prob(xs).sum(-1)
    torch.testing.assert_close(loss, kl - reconstruction)


@pytest.mark.parametrize("noise", [False, True])
def test_vae_samples_are_the_decoder_mean_or_a_draw_of_p_x_given_z(noise):
    vae = VAEGenerators(3, 2, hidden_features=8, latent_features=2, decoder_noise=noise)
    with torch.no_grad():
        drawn = vae.sample(4, torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(0)
        mean, log_var = vae._split(vae.decoder(torch.randn(2, 4, 2, generator=generator)))
        expected = mean
        if noise:
            expected = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=generator)
    torch.testing.assert_close(drawn, expected)


def test_kmeans_centre_without_points_stays_where_it_was():
    generators = KMeansGenerators(2, 2, centres=torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    generators.fit_weighted(
        x, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), TrainConfig(), torch.Generator()
    )
    expected = torch.tensor([[2.0, 3.0], [5.0, 5.0]])
    torch.testing.assert_close(generators.centres.detach(), expected)


def test_weighted_training_loss_is_the_mean_over_points_of_the_weighted_sum():
    x = torch.randn(64, 2)
    generators = FlowGenerators(2, 2, n_layers=2, hidden_features=8)
    state = {k: v.clone() for k, v in generators.state_dict().items()}
    with torch.no_grad():
        expected = float(-generators.log_prob(x).sum(1).mean())
    config = TrainConfig(max_epochs=1, batch_size=64, learning_rate=1e-12)
    losses = []
    for scale in (1.0, 2.0):
        generators.load_state_dict(state)
        result = generators.fit_weighted(x, scale * torch.ones(64, 2), config, torch.Generator())
        losses.append(result.history["loss"][0])
    assert losses == pytest.approx([expected, 2 * expected], rel=1e-9)


def test_assignment_prior_is_log_pi_floored_at_min_share():
    rng = np.random.default_rng(0)
    X = np.concatenate(
        [rng.normal(c, 1.0, size=(n, 2)) for c, n in (([0, 0], 240), ([8, 0], 60), ([0, 8], 6))]
    )
    model = CompetitiveMixture(
        3, generator="kmeans", init="kmeans", assign_with_weights=True, max_rounds=3,
        dtype="float64", random_state=0,
    ).fit(X)  # fmt: skip
    with np.errstate(divide="ignore"):  # a component may end with no points
        log_weights = np.log(model.weights_)
    assert np.ptp(log_weights[np.isfinite(log_weights)]) > 0.5  # uneven shares
    prior = np.maximum(log_weights, np.log(0.1 / 3))
    u = model._standardise(model._validate_X(X), torch.float64)
    log_pk = model.model_.generators.log_prob(u).detach().numpy()
    logits = log_pk + prior
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(model.predict_proba(X), expected, rtol=1e-8, atol=1e-12)


def test_a_starved_component_trains_on_its_best_points_during_the_rounds():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0.0, 1.0, size=(99, 1)), [[100.0]]])  # one outlier
    owners = np.zeros(100, dtype=int)
    owners[-1] = 1  # component 1 starts on the outlier alone and keeps only it
    model = CompetitiveMixture(
        2, generator="kmeans", init=owners, min_share=0.05, max_rounds=5, dtype="float64",
        random_state=0,
    ).fit(X)  # fmt: skip
    assert model.labels_.tolist() == [0] * 99 + [1] and model.weights_[1] == 0.0
    centres = model.standardizer_.inverse(model.model_.generators.centres.detach()).numpy()
    best = np.sort(X[:, 0])[-5:]  # the outlier and the 4 points nearest to it (5 = 5 %)
    assert centres[1, 0] == pytest.approx(best.mean(), abs=1e-9)


# One short round of discriminator assignment (the settings, not the result, are tested).
ONE_DISCRIMINATOR_ROUND = dict(
    assignment="discriminator", n_layers=2, hidden_features=8, pretrain_epochs=1, max_epochs=1,
    max_rounds=1, batch_size=128, discriminator_hidden=16, discriminator_batch_size=128,
    dtype="float64", random_state=0,
)  # fmt: skip


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # one round
@pytest.mark.parametrize("keep", [False, True])
def test_keep_discriminators_reuses_one_set_else_trains_fresh_ones(keep):
    seen = []  # the objects themselves: ids of freed modules could be reused
    CompetitiveMixture(
        3, keep_discriminators=keep, **ONE_DISCRIMINATOR_ROUND,
        callback=lambda model, r: seen.append(model.model_.discriminators),
    ).fit(blobs(300)[0])  # fmt: skip
    assert len(seen) == 2
    assert (seen[0] is seen[1]) == keep


def spy_on_fit_weighted(monkeypatch, cls) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record the (x, weights) of every ``cls.fit_weighted`` call."""
    captured = []
    original = cls.fit_weighted

    def spy(self, x, weights, *args, **kwargs):
        captured.append((x.clone(), weights.clone()))
        return original(self, x, weights, *args, **kwargs)

    monkeypatch.setattr(cls, "fit_weighted", spy)
    return captured


def test_bagging_trains_each_generator_on_a_bootstrap_of_n_over_k_points(monkeypatch):
    captured = spy_on_fit_weighted(monkeypatch, KMeansGenerators)
    bagging(3, generator="kmeans", random_state=0, dtype="float64").fit(blobs(300)[0])
    ((_, weights),) = captured  # pre-training only: no rounds
    assert weights.shape == (300, 3)
    torch.testing.assert_close(weights.sum(0), torch.full((3,), 100.0))  # N/K draws each
    assert torch.equal(weights, weights.round()) and weights.max() > 1  # with replacement


def test_single_model_trains_on_every_point_once(monkeypatch):
    captured = spy_on_fit_weighted(monkeypatch, KMeansGenerators)
    single_model(generator="kmeans", random_state=0, dtype="float64").fit(blobs(90)[0])
    ((_, weights),) = captured
    torch.testing.assert_close(weights, torch.ones(90, 1))


def test_baselines_never_run_competitive_rounds():
    assert bagging(3).max_rounds == 0
    assert single_model().max_rounds == 0  # and refuse max_rounds (test above)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # one round
def test_validation_fraction_holds_out_that_share_of_the_points(monkeypatch):
    captured = spy_on_fit_weighted(monkeypatch, KMeansGenerators)
    CompetitiveMixture(
        3, generator="kmeans", validation_fraction=0.2, max_rounds=1, dtype="float64",
        random_state=0,
    ).fit(blobs(300)[0])  # fmt: skip
    assert [x.shape[0] for x, _ in captured] == [240, 240]  # pre-training and round 1


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # one round
def test_a_discriminator_fit_normalises_its_ratio_over_the_training_points():
    X = blobs(300)[0]
    model = CompetitiveMixture(3, **ONE_DISCRIMINATOR_ROUND).fit(X)
    # mean_i (1 - D_k) / D_k / Z_k = 1 over the points the discriminators trained on
    np.testing.assert_allclose(np.exp(model.log_ratio(X)).mean(0), 1.0, rtol=1e-9)


def test_a_point_tied_between_its_owner_and_another_component_keeps_its_owner(monkeypatch):
    calls = []

    def scores(self, u):  # round 0: component 2 wins everything; later 1 and 2 tie
        calls.append(1)
        s = torch.zeros(u.shape[0], 3, dtype=u.dtype)
        s[:, 2] = 1.0
        if len(calls) > 1:
            s[:, 1] = 1.0
        return s

    monkeypatch.setattr(CompetitiveMixture, "_likelihood_scores", scores)
    model = CompetitiveMixture(
        3, generator="kmeans", max_rounds=3, dtype="float64", random_state=0
    ).fit(blobs(60)[0])
    assert model.history_["n_changed"] == [0] and model.converged_
    assert (model.labels_ == 2).all()


def test_probabilities_sum_to_one_in_float64():
    X, _ = blobs(300)
    model = CompetitiveMixture(3, **{**FAST, "dtype": "float32", "max_rounds": 1}, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    np.testing.assert_allclose(model.predict_proba(X).sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.weights_.sum(), 1.0, rtol=0, atol=1e-12)


def test_rounds_continue_one_optimisation(monkeypatch):
    """Adam's moments carry over from pre-training through every round, and the rounds
    follow one learning-rate schedule (restarted every round, both cost the K = 9 skewed
    mixture 0.15 nats of held-out KL)."""
    calls = []
    real_train = competitive.generators.train

    def spy(*args, **kwargs):
        result = real_train(*args, **kwargs)
        calls.append((args[3], kwargs.get("optimizer_state"), result.optimizer_state))
        return result

    monkeypatch.setattr(competitive.generators, "train", spy)
    X, _ = blobs(300)
    settings = {**FAST, "max_rounds": 3, "lr_schedule": "cosine"}
    CompetitiveMixture(3, **settings, tol=None, random_state=0).fit(X)
    assert len(calls) == 4  # pre-training and 3 rounds
    assert calls[0][1] is None
    for (_, _, returned), (_, given, _) in itertools.pairwise(calls):
        assert given is returned
    for round_index, (config, _, _) in enumerate(calls[1:]):
        assert config.lr_schedule_epochs == 3 * FAST["max_epochs"]
        assert config.lr_schedule_start == round_index * FAST["max_epochs"]


def test_a_round_cut_short_by_max_time_is_no_finished_fit(monkeypatch):
    """With tol=None a fit that ran its rounds has converged, unless max_time cut the
    last round short: then it says so (as with a tol)."""
    clock = itertools.count(step=0.01)
    fake_time = SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(training, "time", fake_time)
    monkeypatch.setattr(competitive.estimator, "time", fake_time)
    X, _ = blobs(300)
    settings = {**FAST, "max_rounds": 1, "max_epochs": 100_000}
    with pytest.warns(ConvergenceWarning, match=r"after 1 round\(s\) .*; raise max_time$"):
        model = CompetitiveMixture(3, **settings, tol=None, max_time=1.0, random_state=0).fit(X)
    assert model.n_iter_ == 1 and not model.converged_


def test_keeping_idle_generators_needs_parameters_stacked_over_k():
    gens = FlowGenerators(2, 3, n_layers=2, hidden_features=8)
    gens.shared = torch.nn.Parameter(torch.zeros(2))  # not stacked over K
    weights = torch.zeros(16, 3)
    weights[:, 0] = 1.0  # components 1 and 2 idle
    config = TrainConfig(max_epochs=1, batch_size=16)
    with pytest.raises(TypeError, match="stacked over K"):
        gens.fit_weighted(torch.randn(16, 2), weights, config, torch.Generator())


# --------------------------------------------------------------------------- warm start


def generator_state(model: CompetitiveMixture) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model_.generators.state_dict().items()}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # few rounds
def test_warm_start_continues_from_the_previous_fit(monkeypatch):
    """A fit that stopped with "raise max_rounds" could only be refit from scratch."""
    X, _ = blobs(300)
    params = {**FAST, "max_rounds": 1, "tol": None}
    cold = CompetitiveMixture(3, random_state=0, **params).fit(X)
    warm = CompetitiveMixture(3, random_state=0, warm_start=True, **params).fit(X)
    np.testing.assert_array_equal(warm.score_samples(X), cold.score_samples(X))  # 1st: as cold
    first, standardizer = generator_state(warm), warm.standardizer_
    pretraining = spy_on_fit_weighted(monkeypatch, FlowGenerators)
    warm.set_params(max_rounds=3, init="kmeans").fit(X[:200])  # the first fit's units kept
    assert len(pretraining) == 3  # one call per round, no pre-training
    assert warm.pretrain_time_ == 0.0 and warm.n_iter_ == 3
    assert len(warm.history_["n_changed"]) == 3 and warm.labels_.shape == (200,)
    torch.testing.assert_close(warm.standardizer_.mean, standardizer.mean)
    assert warm.standardizer_ is not standardizer  # the previous fit's objects are kept
    assert any(not torch.equal(first[k], v) for k, v in generator_state(warm).items())
    # Continued from the previous weights: rounds that barely step give them back.
    state = generator_state(warm)
    warm.set_params(learning_rate=1e-30, max_rounds=1).fit(X)
    for name, value in generator_state(warm).items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=1e-9, msg=name)
    # Without rounds a warm fit would train nothing: refused, the model left as it was.
    scores = warm.score_samples(X)
    with pytest.raises(ValueError, match="warm_start=True with max_rounds=0 would train nothing"):
        warm.set_params(max_rounds=0).fit(X)
    np.testing.assert_array_equal(warm.score_samples(X), scores)


@pytest.mark.parametrize("keep", [True, False])
def test_warm_start_continues_the_discriminators_only_when_told_to_keep_them(keep):
    X, _ = blobs(300)
    params = {**ONE_DISCRIMINATOR_ROUND, "tol": None, "keep_discriminators": keep}
    model = CompetitiveMixture(3, warm_start=True, **params).fit(X)
    kept = {k: v.clone() for k, v in model.model_.discriminators.state_dict().items()}
    model.set_params(discriminator_learning_rate=1e-30).fit(X)  # steps too small to see
    trained = model.model_.discriminators.state_dict()
    same = all(torch.allclose(v, kept[k], rtol=0, atol=1e-9) for k, v in trained.items())
    assert same == keep  # continued from the previous fit's, or trained afresh


def test_a_warm_start_to_exact_assignment_drops_the_discriminators():
    """They were kept, trained against generators that had since moved on."""
    X, _ = blobs(300)
    params = {**ONE_DISCRIMINATOR_ROUND, "tol": None, "keep_discriminators": True}
    model = CompetitiveMixture(3, warm_start=True, **params).fit(X)
    model.set_params(assignment="exact").fit(X)
    assert model.model_.discriminators is None
    with pytest.raises(ValueError, match="no discriminators were trained"):
        model.log_ratio(X)


def test_warm_start_refuses_what_it_cannot_continue(tmp_path):
    X, _ = blobs(300)
    params = {**FAST, "max_rounds": 1, "tol": None}
    model = CompetitiveMixture(3, random_state=0, warm_start=True, **params).fit(X)
    scores = model.score_samples(X)
    with pytest.raises(ValueError, match="warm_start: X has 3 features, the previous fit 2"):
        model.fit(np.column_stack([X, X[:, 0] ** 2]))
    changes = ({"hidden_features": 9}, {"generator": "kmeans"}, {"activation": "relu"},
               {"n_components": 2})  # fmt: skip
    for change in changes:
        name = next(iter(change))
        with pytest.raises(ValueError, match=f"warm_start: {name} changed .*{name}="):
            model.set_params(**change).fit(X)
        model.set_params(**{name: model.fitted_params_[name]})
    np.testing.assert_array_equal(model.score_samples(X), scores)  # left as it was
    with pytest.raises(ValueError, match="warm_start=True cannot be combined with a checkpoint"):
        CompetitiveMixture(3, warm_start=True, checkpoint=tmp_path / "s.pt", **params).fit(X)
    with pytest.raises(TypeError, match="warm_start"):
        CompetitiveMixture(3, warm_start="no", **params).fit(X)
