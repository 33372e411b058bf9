"""The comparison module: discriminator estimates vs exact likelihoods, its figures, the report."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from helpers.frames import Frame
from PIL import Image
from scipy.special import logsumexp

import competitive.figures
from competitive import CompetitiveMixture, NoExactLikelihoodError
from competitive.compare import (
    RoundTracker,
    compare_log_ratios,
    compare_with_exact,
    component_log_prob,
    discriminator_estimate,
    exact_log_ratios,
    own_discriminator_estimate,
)
from competitive.figures import (
    plot_agreement_rounds,
    plot_assignment_rounds,
    plot_disagreement,
    plot_estimate_vs_exact,
)
from competitive.report import _choose_cases
from competitive.studies import StudySettings, _accuracy_via_labels
from vmonf import VMoNF
from vmonf.base import NotFittedError
from vmonf.cli import main
from vmonf.plots import class_colours
from vmonf.reporting import mean_sd

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

MEANS = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
SMALL_DISCRIMINATORS = CompetitiveMixture(
    3,
    discriminator_hidden=64,
    discriminator_epochs=4,
    discriminator_batch_size=64,
    discriminator_learning_rate=3e-3,
)
FAST = dict(
    n_layers=2, hidden_features=8, pretrain_epochs=2, max_epochs=1, max_rounds=2,
    batch_size=128, dtype="float64", discriminator_hidden=16, discriminator_batch_size=128,
)  # fmt: skip


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return MEANS[y] + rng.normal(size=(n, 2)), y


def true_log_prob(x: np.ndarray) -> np.ndarray:
    """log (1/3) sum_k N(x; mean_k, I)."""
    log_joint = -0.5 * ((x[:, None, :] - MEANS) ** 2).sum(-1) - math.log(2 * math.pi * 3)
    return logsumexp(log_joint, axis=1)


@pytest.fixture(scope="module")
def true_modes() -> tuple[CompetitiveMixture, np.ndarray, np.ndarray]:
    """A fitted mixture whose generators ARE the true modes: N(mean_k, I), weights 1/3."""
    X, _ = blobs(900, 0)
    est = CompetitiveMixture(3, generator="kmeans", max_rounds=0, dtype="float64").fit(X)
    with torch.no_grad():
        est.standardizer_.mean.zero_()
        est.standardizer_.scale.fill_(1.0)
        est.model_.generators.centres.copy_(torch.tensor(MEANS))
    return est, X, blobs(1000, 1)[0]


# --------------------------------------------------------------------------- known answer


def test_exact_log_ratios_of_true_modes_equal_the_analytic_values(true_modes):
    est, _, X_eval = true_modes
    log_pk = -0.5 * ((X_eval[:, None, :] - MEANS) ** 2).sum(-1) - math.log(2 * math.pi)
    np.testing.assert_allclose(component_log_prob(est, X_eval), log_pk, atol=1e-10)
    exact = exact_log_ratios(est, X_eval, true_log_prob(X_eval))
    np.testing.assert_allclose(exact["truth"], log_pk - true_log_prob(X_eval)[:, None], atol=1e-10)
    np.testing.assert_allclose(exact["mixture"], exact["truth"], atol=1e-10)  # mixture = truth


def test_discriminators_on_true_modes_agree_with_the_exact_argmax(true_modes):
    """Generators equal to the true modes: discriminator argmax = exact argmax on >= 99 %."""
    est, X, X_eval = true_modes
    result = compare_with_exact(
        est, X, X_eval, true_log_prob=true_log_prob(X_eval), settings=SMALL_DISCRIMINATORS
    )
    stats = result.stats["truth"]
    assert stats.agreement >= 0.99
    assert stats.ari >= 0.97
    # Where it matters (each component's own points) the estimate is within a fraction of
    # a nat of log p_k - log p_data (about log 3 there); far away it is compressed.
    assert np.all(stats.mae_owned < 0.5)
    assert np.all(stats.spearman > 0.9)
    assert np.all(stats.bias > 1.0)  # it cannot follow log p_k - log p_data down to -50 nats
    exact_owner, disc_owner = result.owners()
    assert (exact_owner == disc_owner).mean() == stats.agreement


def test_compare_with_exact_checks_its_arguments_before_training_anything(true_modes, monkeypatch):
    est, X, X_eval = true_modes

    def no_training(*args, **kwargs):
        raise AssertionError("discriminators trained before the arguments were checked")

    monkeypatch.setattr("competitive.compare.discriminator_estimate", no_training)
    truth = true_log_prob(X_eval)
    with pytest.raises(ValueError, match="true_log_prob"):
        compare_with_exact(est, X, X_eval, true_log_prob=truth[:-1])
    with pytest.raises(ValueError, match="saturation"):
        compare_with_exact(est, X, X_eval, saturation=0.7)
    with pytest.raises(ValueError, match="X_eval must have at least 2 rows"):
        compare_with_exact(est, X, X_eval[:1])


@pytest.mark.parametrize(
    "setting",
    [
        {"discriminator_hidden": 0},
        {"discriminator_batch_size": 0},
        {"discriminator_learning_rate": -1.0},
        {"discriminator_layers": -1},
    ],
)
def test_bad_discriminator_settings_are_named_as_the_user_wrote_them(true_modes, setting):
    est, X, X_eval = true_modes
    (name,) = setting
    with pytest.raises(ValueError, match=f"^{name} must be"):
        discriminator_estimate(est, X, X_eval, settings=CompetitiveMixture(3, **setting))


def test_discriminator_estimate_is_seeded_and_leaves_the_global_rng_alone(true_modes):
    est, X, X_eval = true_modes
    settings = CompetitiveMixture(3, discriminator_hidden=8, discriminator_epochs=1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = discriminator_estimate(est, X, X_eval[:50], settings=settings, random_state=4)
    assert torch.rand(1) == before  # the caller's stream is where it was
    b = discriminator_estimate(est, X, X_eval[:50], settings=settings, random_state=4)
    np.testing.assert_array_equal(a.log_ratio, b.log_ratio)
    torch.set_default_dtype(torch.float32)  # this suite's default is float64 (conftest)
    f32 = discriminator_estimate(est, X, X_eval[:50], settings=settings, random_state=4)
    torch.set_default_dtype(torch.float64)
    np.testing.assert_array_equal(a.log_ratio, f32.log_ratio)  # the same initial weights
    assert a.log_ratio.shape == a.logits.shape == (50, 3)
    # normalised over X: mean_i exp(estimate) over the training points is 1
    c = discriminator_estimate(est, X, X, settings=settings, random_state=4)
    np.testing.assert_allclose(np.exp(c.log_ratio).mean(0), 1.0, rtol=1e-6)
    # None draws a fresh seed (it once meant seed 0, silently)
    fresh = [
        discriminator_estimate(est, X, X_eval[:50], settings=settings, random_state=None)
        for _ in range(2)
    ]
    assert not np.array_equal(fresh[0].log_ratio, fresh[1].log_ratio)


# --------------------------------------------------------------------------- statistics


def test_compare_log_ratios_on_constructed_values():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(200, 3))
    exact[:, 2] -= 10.0  # component 2 owns no point
    shifted = compare_log_ratios(exact + 0.5, exact)
    np.testing.assert_allclose(shifted.bias, 0.5)
    np.testing.assert_allclose(shifted.mae, 0.5)
    np.testing.assert_allclose(shifted.pearson, 1.0)
    np.testing.assert_allclose(shifted.spearman, 1.0)
    assert shifted.agreement == 1.0 and shifted.ari == 1.0
    assert np.isnan(shifted.mae_owned[2]) and np.isnan(shifted.saturated).all()
    swapped = compare_log_ratios(exact[:, [1, 0, 2]], exact)
    assert swapped.agreement == 0.0
    assert np.all(np.abs(swapped.spearman[:2]) < 0.2)  # independent columns: no correlation
    logits = np.tile([[8.0, 0.0, -8.0], [1.0, 7.0, 0.0]], (100, 1))
    sat = compare_log_ratios(exact, exact, logits=logits, saturation=1e-3).saturated
    np.testing.assert_allclose(sat, [0.5, 0.5, 0.5])
    summary = shifted.summary()
    assert summary["bias"] == pytest.approx(0.5) and math.isnan(summary["saturated"])
    assert summary["mae_owned"] == pytest.approx(0.5)  # the mean over components owning points
    mixed = exact.copy()
    mixed[:100, 0] += 1.0
    mixed[100:, 0] -= 3.0
    errors = compare_log_ratios(mixed, exact)  # bias is the signed mean, mae the absolute
    assert errors.bias[0] == pytest.approx(-1.0) and errors.mae[0] == pytest.approx(2.0)
    assert json.dumps(shifted.as_dict(), allow_nan=True)


def test_agreement_on_decisive_points_leaves_out_near_ties():
    # exact leads: 0.5, 2, 3 and 0.2 nats; the estimate's argmax is right on rows 1 and 3
    exact = np.array([[0.0, -0.5], [0.0, -2.0], [-3.0, 0.0], [0.0, -0.2]])
    estimate = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    stats = compare_log_ratios(estimate, exact)
    assert stats.agreement == 0.5
    assert stats.decisive_share == 0.5  # rows 1 and 2 lead by >= 1 nat
    assert stats.decisive_agreement == 0.5  # right on row 1, wrong on row 2
    assert compare_log_ratios(estimate, exact, margin=2.5).decisive_agreement == 0.0
    none = compare_log_ratios(estimate, exact, margin=5.0)
    assert none.decisive_share == 0.0 and math.isnan(none.decisive_agreement)
    summary = stats.summary()
    assert summary["decisive_agreement"] == 0.5 and summary["decisive_share"] == 0.5
    one = compare_log_ratios(np.zeros((3, 1)), np.arange(3.0)[:, None])  # K = 1: no runner-up
    assert one.decisive_share == 1.0 and one.decisive_agreement == 1.0
    with pytest.raises(ValueError, match="margin"):
        compare_log_ratios(estimate, exact, margin=0.0)


@pytest.mark.parametrize(
    ("estimate", "exact", "kwargs", "match"),
    [
        (np.zeros((5, 2)), np.zeros((5, 3)), {}, "shape"),
        (np.zeros((5,)), np.zeros((5,)), {}, r"\(N, K\)"),
        (np.full((5, 2), np.nan), np.zeros((5, 2)), {}, "NaN or infinite"),
        (np.zeros((5, 2)) + 1j, np.zeros((5, 2)), {}, "Complex data not supported: estimate"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"saturation": 0.7}, "saturation"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"logits": np.zeros((4, 2))}, "logits"),
    ],
)
def test_compare_log_ratios_rejects_bad_input(estimate, exact, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare_log_ratios(estimate, exact, **kwargs)


# --------------------------------------------------------------------------- estimators


def test_component_log_prob_adds_up_to_score_samples_for_both_estimators():
    X, _ = blobs(300, 2)
    X = X * [3.0, 0.5] + 5.0  # standardisation must be undone
    vm = VMoNF(3, n_layers=2, hidden_features=8, max_epochs=2, init_steps=10, random_state=0,
               dtype="float64").fit(X)  # fmt: skip
    cm = CompetitiveMixture(3, random_state=0, **FAST).fit(X)
    for est, log_w in ((vm, np.log(vm.weights_)), (cm, np.log(cm.weights_))):
        log_pk = component_log_prob(est, X)
        np.testing.assert_allclose(logsumexp(log_pk + log_w, axis=1), est.score_samples(X))
    with pytest.raises(ValueError, match="true_log_prob"):
        exact_log_ratios(cm, X, np.zeros(5))
    with pytest.raises(ValueError, match="Complex data not supported: true_log_prob"):
        exact_log_ratios(cm, X[:3], np.zeros(3) + 1j)
    with pytest.raises(ValueError, match="X_eval has 3 features, but the tracked"):
        RoundTracker(np.zeros((5, 3)))(cm, 0)


def test_component_log_prob_refuses_what_has_no_exact_likelihood():
    X, _ = blobs(120, 3)
    with pytest.raises(NotFittedError):
        component_log_prob(VMoNF(3), X)
    with pytest.raises(TypeError, match="VMoNF or CompetitiveMixture"):
        component_log_prob(object(), X)
    vae = CompetitiveMixture(
        3, generator="vae", assignment="discriminator", hidden_features=8, max_rounds=0,
        pretrain_epochs=1, random_state=0,
    ).fit(X)  # fmt: skip
    with pytest.raises(NoExactLikelihoodError):
        component_log_prob(vae, X)


def test_same_seed_pretrains_the_same_flows_whatever_the_assignment():
    """The hook the rounds study relies on: exact and discriminator runs part at round 1."""
    X, _ = blobs(300, 4)
    states = {}

    def keep(assignment: str):
        def callback(est: CompetitiveMixture, round_: int) -> None:
            if round_ == 0:
                states[assignment] = {
                    k: v.clone() for k, v in est.model_.generators.state_dict().items()
                }

        return callback

    for assignment in ("exact", "discriminator"):
        CompetitiveMixture(
            3, assignment=assignment, random_state=7, callback=keep(assignment), **FAST
        ).fit(X)
    for name, value in states["exact"].items():
        torch.testing.assert_close(states["discriminator"][name], value, rtol=0, atol=0)


def test_round_tracker_records_every_round():
    X, _ = blobs(300, 5)
    X_eval, _ = blobs(200, 6)
    tracker = RoundTracker(X_eval, true_log_prob=true_log_prob(X_eval))
    disc = CompetitiveMixture(
        3, assignment="discriminator", tol=0.0, random_state=0, callback=tracker, **FAST
    ).fit(X)
    assert tracker.history["round"] == list(range(disc.n_iter_ + 1))
    assert len(tracker.owners) == disc.n_iter_ + 1
    assert all(0.0 <= a <= 1.0 for a in tracker.history["agreement"])
    # the run's own discriminators: the last record is its final assignment
    np.testing.assert_array_equal(tracker.owners[-1][1], disc.log_ratio(X_eval).argmax(1))
    with pytest.raises(ValueError, match="X_train"):
        CompetitiveMixture(3, random_state=0, callback=RoundTracker(X_eval), **FAST).fit(X)
    fresh = RoundTracker(X_eval, X_train=X)  # exact runs: fresh discriminators each round
    exact = CompetitiveMixture(3, random_state=0, callback=fresh, **FAST).fit(X)
    assert len(fresh.history["agreement"]) == exact.n_iter_ + 1
    assert "saturated" in fresh.history


def test_round_tracker_trains_each_rounds_discriminators_with_their_own_seed(monkeypatch):
    import competitive.compare

    seeds = []

    def recording_estimate(estimator, X_train, X_eval, random_state):
        seeds.append(random_state)
        zeros = np.zeros((len(X_eval), estimator.n_components))
        return competitive.compare.DiscriminatorEstimate(zeros, zeros)

    monkeypatch.setattr(competitive.compare, "discriminator_estimate", recording_estimate)
    X, _ = blobs(300, 5)
    model = CompetitiveMixture(3, random_state=0, **FAST).fit(X)
    tracker = RoundTracker(blobs(50, 6)[0], X_train=X, random_state=7)
    for round_ in range(3):
        tracker(model, round_)
    assert seeds == [7, 8, 9]


def test_tracking_a_fit_on_a_data_frame_checks_its_names_without_warnings():
    """The tracker and discriminator_estimate hand the caller's frames on: converted to
    arrays first, each round warned four times that X had lost its feature names."""
    X, _ = blobs(300, 5)
    X_eval, _ = blobs(200, 6)
    frame, frame_eval = Frame(X, ["a", "b"]), Frame(X_eval, ["a", "b"])
    tracker = RoundTracker(frame_eval, true_log_prob=true_log_prob(X_eval), X_train=frame)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*feature names")
        model = CompetitiveMixture(3, random_state=0, callback=tracker, **FAST).fit(frame)
    assert len(tracker.history["round"]) == model.n_iter_ + 1
    model.set_params(n_components=2)  # the next fit's: the fitted K = 3 is estimated
    estimate = discriminator_estimate(model, frame, frame_eval, settings=SMALL_DISCRIMINATORS)
    assert estimate.log_ratio.shape == (200, 3)
    with pytest.raises(ValueError, match="feature names should match"):
        discriminator_estimate(model, frame.reorder([1, 0]), frame_eval)


def test_accuracy_via_labels_names_clusters_by_the_labelled_points():
    y_fit = np.array([0, 1, -1, -1, 1, 0])
    pred_train = np.array([2, 0, 1, 1, 0, 2])  # cluster 2 = class 0, cluster 0 = class 1
    pred_test = np.array([2, 0, 1, 2])
    y_test = np.array([0, 1, 1, 1])
    assert _accuracy_via_labels(pred_train, y_fit, pred_test, y_test) == 0.5  # cluster 1 unnamed


# --------------------------------------------------------------------------- figures


def test_comparison_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(300, 3)) * 20
    paths = [
        plot_estimate_vs_exact(np.maximum(exact, -8.0), exact, tmp_path / "a.png"),
        plot_agreement_rounds({"x": [0.3, 0.8, 1.0], "y": [1.0]}, tmp_path / "b.png"),
        plot_disagreement(
            rng.normal(size=(300, 2)),
            exact.argmax(1),
            exact[:, [1, 0, 2]].argmax(1),
            tmp_path / "c.png",
            n_components=3,
        ),
    ]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(ValueError, match="titles"):
        plot_estimate_vs_exact(exact, exact, tmp_path / "d.png", titles=["a"])
    with pytest.raises(ValueError, match="owners"):
        plot_disagreement(exact[:, :2], np.zeros(300, int), np.full(300, 5), tmp_path / "e.png",
                          n_components=3)  # fmt: skip
    with pytest.raises(ValueError, match="curves"):
        plot_agreement_rounds({}, tmp_path / "f.png")
    X2, good = exact[:, :2], np.zeros(300, int)
    with pytest.raises(TypeError, match="integer"):
        plot_disagreement(X2, good, good + 0.5, tmp_path / "g.png", n_components=3)
    with pytest.raises(ValueError, match=r"owners\[1\]: owners must lie in \[0, 3\)"):
        plot_assignment_rounds(X2, [good, good + 3], ["a", "b"], tmp_path / "h.png", n_components=3)
    with pytest.raises(ValueError, match="max_panels"):
        plot_assignment_rounds(X2, [good], ["a"], tmp_path / "i.png", n_components=3, max_panels=0)
    path = plot_assignment_rounds(
        X2, [good, good + 2], ["a", "b"], tmp_path / "j.png", n_components=3
    )
    assert path.exists()
    # dpi and path are checked as vmonf.plots checks them (dpi was not checked at all)
    with pytest.raises(ValueError, match="dpi must be >= 1, got 0"):
        plot_agreement_rounds({"x": [1.0]}, tmp_path / "k.png", dpi=0)
    with pytest.raises(ValueError, match=r"path must end in \.png or \.pdf or \.svg"):
        plot_agreement_rounds({"x": [1.0]}, tmp_path / "k.gif")


# --------------------------------------------------------------------------- the report


def test_report_command_writes_report_results_and_figures(tmp_path):
    out = tmp_path / "report"
    argv = ["report", "--quick", "--cases", "skewed_gmm_3", "--budget", "0.3", "--jobs", "1",
            "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    (result,) = payload["results"]
    assert set(result["methods"]) >= {"VMoNF (ELBO)", "competitive (discriminator)", "bagging"}
    assert result["methods"]["single flow (larger)"]["components_used"] == 1
    for method in result["methods"].values():
        assert method["fit_time"] < 5.0  # the budget holds (0.3 s, plus one epoch or round)
    rounds = result["rounds"]["uniform"]["history"]
    assert rounds["round"][0] == 0 and len(rounds["agreement"]) == len(rounds["round"])
    text = (out / "report.md").read_text()
    assert "vmonf report --quick" in text and "| skewed_gmm_3 | uniform |" in text
    for link in [part.split(")")[0] for part in text.split("](")[1:]]:
        assert (out / link).is_file(), link
    assert main(["report", "--cases", "nope", "--out", str(out)]) == 2


def test_report_helpers_count_seeds_honestly():
    assert mean_sd([1.0, 2.0, 3.0]) == "2.000 ± 1.000"  # the sample sd
    assert mean_sd([0.1, math.inf, 0.2]) == "0.150 ± 0.071 (2 of 3 finite)"
    assert mean_sd([None, None]) == "n/a"  # a metric that does not apply
    assert [case.name for case in _choose_cases("moons,moons")] == ["moons"]
    with pytest.raises(ValueError, match="figure_points"):
        StudySettings(figure_points=0)
    with pytest.raises(ValueError, match="unknown discriminator setting"):
        StudySettings(discriminator={"hiden": 16})
    with pytest.raises(ValueError, match="discriminator_hidden must be >= 1"):
        StudySettings(discriminator={"hidden": 0})  # at once, not after hours of fits
    assert len({tuple(c) for c in class_colours(25)}) == 25
    assert competitive.figures.class_colours is class_colours  # its own cycled 20 reds


def test_round_tracker_checks_its_inputs_when_made():
    X = np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"X_eval has 1 sample.* minimum of 2 is required"):
        RoundTracker(X[:1])
    with pytest.raises(ValueError, match="true_log_prob must hold 5 values, one per row of X_eval"):
        RoundTracker(X, true_log_prob=np.zeros(4))
    with pytest.raises(ValueError, match="true_log_prob contains NaN"):
        RoundTracker(X, true_log_prob=np.r_[np.zeros(4), np.nan])
    with pytest.raises(ValueError, match="Complex data not supported: true_log_prob"):
        RoundTracker(X, true_log_prob=np.zeros(5) + 1j)
    with pytest.raises(TypeError, match="true_log_prob must hold numbers"):
        RoundTracker(X, true_log_prob=list("abcde"))
    with pytest.raises(ValueError, match="saturation"):
        RoundTracker(X, saturation=0.7)
    with pytest.raises(TypeError, match="random_state must be an int"):
        RoundTracker(X, random_state="a")
    with pytest.raises(ValueError, match="random_state must be in"):
        RoundTracker(X, random_state=-5)
    with pytest.raises(TypeError, match="a CompetitiveMixture callback, got VMoNF"):
        RoundTracker(X)(VMoNF(2), 0)


def test_mae_owned_is_taken_on_the_exact_owners_points():
    exact = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    estimate = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # row 0 misassigned
    stats = compare_log_ratios(estimate, exact)
    np.testing.assert_allclose(stats.mae_owned, [0.5, 0.0])
    assert stats.agreement == 0.75


def test_discriminator_estimate_is_normalised_over_x_train_not_x_eval():
    X = blobs(300, 0)[0]
    model = CompetitiveMixture(
        3, generator="kmeans", max_rounds=0, dtype="float64", random_state=0
    ).fit(X)
    settings = CompetitiveMixture(3, discriminator_hidden=8, discriminator_epochs=1)
    whole = discriminator_estimate(model, X, X, settings=settings, random_state=4)
    part = discriminator_estimate(model, X, X[:50], settings=settings, random_state=4)
    np.testing.assert_allclose(part.logits, whole.logits[:50], rtol=0, atol=1e-12)
    np.testing.assert_allclose(part.log_ratio, whole.log_ratio[:50], rtol=0, atol=1e-12)


def test_own_estimate_logits_are_log_d_over_1_minus_d():
    X = blobs(300, 0)[0]
    model = CompetitiveMixture(3, assignment="discriminator", random_state=0, **FAST).fit(X)
    own = own_discriminator_estimate(model, X)
    # log_ratio = log (1 - D) / D - log Z = -logit - log Z
    log_norm = model.model_.log_norm.double().numpy()
    np.testing.assert_allclose(own.logits, -own.log_ratio - log_norm, atol=1e-10)


def test_round_tracker_with_the_truth_scores_against_the_truth():
    X, X_eval = blobs(300, 5)[0], blobs(200, 6)[0]
    truth = true_log_prob(X_eval)
    tracker = RoundTracker(X_eval, true_log_prob=truth)
    model = CompetitiveMixture(
        3, assignment="discriminator", random_state=0, callback=tracker, **FAST
    ).fit(X)
    own = own_discriminator_estimate(model, X_eval)  # the last record's discriminators
    exact = exact_log_ratios(model, X_eval, truth)
    want = compare_log_ratios(own.log_ratio, exact["truth"], logits=own.logits).summary()
    other = compare_log_ratios(own.log_ratio, exact["mixture"], logits=own.logits).summary()
    assert abs(want["mae"] - other["mae"]) > 1e-3  # the two targets differ here
    assert tracker.history["mae"][-1] == pytest.approx(want["mae"], rel=1e-12)
