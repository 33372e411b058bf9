"""The comparison report's tables, options and study internals, and the reporting helpers
they use, checked cell by cell on synthetic results (float64)."""

from __future__ import annotations

import argparse
import copy
import functools
import math
from types import SimpleNamespace

import matplotlib.figure
import numpy as np
import pytest

from competitive import report, studies
from vmonf import VMoNF, metrics, plots, reporting


def test_markdown_table_escapes_pipes_inside_cells():
    table = reporting.markdown_table(["method", "what"], [["VMoNF", "soft, amortised q(c|x)"]])
    row = table.splitlines()[2]
    assert row == "| VMoNF | soft, amortised q(c\\|x) |"
    assert len(row.replace("\\|", "").strip("|").split("|")) == 2  # two columns, as the header


# --------------------------------------------------------------- report tables (R1-R4, R7)


def _result(seed, kl, acc, ari, agreement, exact, disc, spearman, pearson):
    method = {"kl_to_truth": kl, "ari": ari, "accuracy": acc, "components_used": 2,
              "fit_time": 1.0 + seed, "epochs": 4, "uses_labels": False,
              "convergence_warnings": ["VMoNF: ... raise max_time"] * seed}  # fmt: skip
    stats = {k: 0.0 for k in ("agreement", "ari", "mae", "mae_owned", "bias", "saturated")}
    stats |= {"decisive_agreement": 0.9 + 0.1 * seed, "decisive_share": 0.25}
    cmp = {"truth": {**stats, "spearman": spearman, "pearson": pearson},
           "mixture": {**stats, "spearman": 0.0, "pearson": 0.0}}  # fmt: skip
    history = {
        "agreement": agreement,
        "decisive_agreement": [a + 0.1 for a in agreement],
        "decisive_share": [0.5] * len(agreement),
    }
    rounds = {"history": history, "log_likelihood_exact": exact,
              "log_likelihood_discriminator": disc, "rounds_exact": 2 + seed}  # fmt: skip
    return {
        "case": "toy", "seed": seed, "k": 2, "n_train": 10, "n_test": 10, "n_labelled": 4,
        "epochs": 4, "truth": {"log_likelihood": -1.0, "bayes_accuracy": 1.0},
        "methods": {name: dict(method) for name in studies.METHODS}
        | {"VMoNF (ELBO)": {**method, "uses_labels": True},
           "GaussianMixture": {**method, "epochs": None}},
        "comparisons": {name: cmp for name in studies.COMPARED},
        "rounds": {"kmeans": rounds, "uniform": rounds},
    }  # fmt: skip


RESULTS = [
    _result(0, kl=1.0, acc=0.9, ari=0.2, agreement=[0.5, 0.7, 0.8], exact=-1.0, disc=-3.0,
            spearman=0.11, pearson=0.99),
    _result(1, kl=3.0, acc=0.7, ari=0.4, agreement=[0.5, 0.9, 1.0], exact=-2.0, disc=-4.0,
            spearman=0.13, pearson=0.97),
]  # fmt: skip


def _row(table: str, first_cells: str) -> list[str]:
    (line,) = [x for x in table.splitlines() if x.startswith(first_cells)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_tables_average_over_seeds_in_the_right_columns():
    # KL mean over both seeds (1, 3) -> 2.000 ± 1.414, not seed 0 alone
    assert _row(report.pivot(RESULTS, "kl_to_truth"), "| bagging |")[1] == "2.000 ± 1.414"
    row = _row(report.soft_hard_tables(RESULTS), "| VMoNF (ELBO) |")
    assert row[-5] == "0.300 ± 0.141"  # ARI (from the end: "q(c|x)" holds a pipe)
    assert row[-4] == "0.800 ± 0.141"  # accuracy, not ARI
    assert row[-2:] == ["4.0 ± 0.0", "1.5 ± 0.7"]  # epochs trained, fit time
    assert _row(report.soft_hard_tables(RESULTS), "| GaussianMixture |")[-2] == "n/a"
    row = _row(report.rounds_markdown_table(RESULTS), "| toy | uniform |")
    assert row[2:7] == [  # agreement after pre-training and at the end, decisive points
        "0.500 ± 0.000", "0.600 ± 0.000", "0.500 ± 0.000", "0.900 ± 0.141", "1.000 ± 0.141",
    ]  # fmt: skip
    assert row[7] == "2.0 ± 0.0"  # the discriminator run's rounds = entries after round 0
    assert row[8] == "2.5 ± 0.7"  # the exact run's, recorded apart
    assert row[11:13] == ["2.000 ± 0.000", "2 of 2"]  # exact - discriminator, seeds ahead
    row = _row(report.comparison_markdown_table(RESULTS), "| toy | VMoNF (ELBO) |")
    assert row[3:5] == ["0.950 ± 0.071", "0.250 ± 0.000"]  # decisive points, their share
    assert row[6] == "0.120 ± 0.014" and row[7] == "0.980 ± 0.014"  # Spearman, Pearson


def test_report_tables_read_results_from_before_the_decisive_agreement():
    old = copy.deepcopy(RESULTS)
    for result in old:
        for comparison in result["comparisons"].values():
            for key in ("decisive_agreement", "decisive_share"):  # the dicts are shared
                comparison["truth"].pop(key, None)
        for entry in result["rounds"].values():
            entry["history"] = {"agreement": entry["history"]["agreement"]}
    assert _row(report.rounds_markdown_table(old), "| toy | uniform |")[3:5] == ["n/a", "n/a"]
    row = _row(report.comparison_markdown_table(old), "| toy | VMoNF (ELBO) |")
    assert row[3:5] == ["n/a", "n/a"]


def test_cells_of_methods_fitted_with_labels_are_marked():
    table = report.pivot(RESULTS, "ari")
    assert _row(table, "| VMoNF (ELBO) |")[1] == "0.300 ± 0.141" + report.LABELS_MARK
    assert _row(table, "| competitive (exact) |")[1] == "0.300 ± 0.141"


def test_the_report_says_how_close_fits_came_to_the_budget():
    text = report._longest_fits(RESULTS)
    n_flow_fits = 2 * (len(studies.METHODS) - 1)  # GaussianMixture has no epochs
    assert text.startswith("The longest flow fit took 2.0 s")
    assert f"the cap stopped {n_flow_fits // 2} of {n_flow_fits}" in text  # seed 1's
    # Section 3's uniform pre-training runs count too (older results have no "fits").
    with_uniform = copy.deepcopy(RESULTS)
    for result in with_uniform:
        capped = {"fit_time": 9.5, "convergence_warnings": ["max_time stopped the fit"]}
        fits = {"discriminator": capped, "exact": {"fit_time": 0.5, "convergence_warnings": []}}
        result["rounds"]["uniform"] = {**result["rounds"]["uniform"], "fits": fits}
    text = report._longest_fits(with_uniform)
    assert text.startswith("The longest flow fit took 9.5 s (competitive (discriminator), ")
    assert f"the cap stopped {n_flow_fits // 2 + 2} of {n_flow_fits + 4}" in text


# --------------------------------------------------------------- report options (R5, R8)


def _args(argv):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(argv)


def test_report_budget_and_seeds_options_are_used():
    settings, seeds = report._settings(_args(["--quick", "--budget", "0.5", "--seeds", "2"]))
    assert settings.budget == 0.5 and seeds == 2
    settings, seeds = report._settings(_args([]))
    assert settings.budget == report.FULL.budget and seeds == 3


# --------------------------------------------------------------- studies (S3, S4, S7)


class _FakeToy:
    n_classes = 2

    def log_prob(self, X):
        return np.full(len(X), -1.0)

    def predict(self, X):
        return (np.asarray(X)[:, 0] > 0).astype(int)


class _FakeModel:
    """Predicts class 1 - truth (swapped names); one stray point in a 3rd cluster."""

    def __init__(self, stray=True):
        self.stray = stray

    def score_samples(self, X):
        return np.full(len(X), -1.5)

    def predict(self, X):
        pred = 1 - (np.asarray(X)[:, 0] > 0).astype(int)
        if self.stray:
            pred[0] = 2
        return pred

    def predict_proba(self, X):
        return np.eye(3)[self.predict(X)]


def _data(n=400, labelled=True):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 2))
    y = (X[:, 0] > 0).astype(int)
    data = {"X": X, "X_test": X, "y_test": y, "true_test": np.full(n, -1.0)}
    if labelled:
        data["y_fit"] = np.where(np.arange(n) % 2 == 0, y, -1)
    return data


def test_components_used_ignores_components_owning_under_one_percent():
    out = studies._evaluate(_FakeModel(), _FakeToy(), _data(), uses_labels=False)
    assert out["components_used"] == 2  # the stray cluster owns 1/400 < 1 %


def test_label_supervised_models_keep_their_own_accuracy():
    # A model fitted with the labels is scored on its own names (all wrong here), not
    # renamed by Hungarian matching on the labelled training points.
    out = studies._evaluate(_FakeModel(stray=False), _FakeToy(), _data(), uses_labels=True)
    assert out["accuracy"] == 0.0
    out = studies._evaluate(_FakeModel(stray=False), _FakeToy(), _data(), uses_labels=False)
    assert out["accuracy"] == 1.0


def test_study_settings_n_test_overrides_the_case():
    case = studies.FULL_CASES[0]
    assert studies.StudySettings(n_test=7).scaled(case).n_test == 7
    assert studies.StudySettings().scaled(case).n_test == case.n_test


class _Clock:
    """A stand-in for time.perf_counter that moves only when a fake fit or tracker works."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


# Held-out mean log-likelihood of each run: the run each number came from is recognisable.
_LOG_LIKELIHOOD = {"competitive (exact)": -1.0, "competitive (discriminator)": -2.0,
                   "uniform exact": -3.0, "uniform discriminator": -4.0}  # fmt: skip


class _StudyModel:
    """Any model of run_study: a fit takes 2 s of the clock plus its callback's tracking."""

    def __init__(self, clock, name):
        self.clock, self.name, self.callback, self.fitted_on = clock, name, None, None

    def set_params(self, **params):
        self.callback = params["callback"]
        return self

    def fit(self, X, y=None):
        self.fitted_on = X
        self.clock.now += 2.0
        for round_ in range(3):
            if self.callback is not None:
                self.callback(self, round_)
        self.history_ = {"n_changed": [4, 0]}
        self.n_iter_ = 2
        return self

    def score_samples(self, X):
        return np.full(len(X), _LOG_LIKELIHOOD.get(self.name, -9.0))

    def score(self, X):
        return float(self.score_samples(X).mean())

    def predict(self, X):
        return (np.asarray(X)[:, 0] > 0.5).astype(int)

    def predict_proba(self, X):  # no exact posterior: evaluate_on_toy reports NaN
        return np.eye(2)[self.predict(X)]


class _StudyTracker:
    """RoundTracker as run_study uses it: each round's tracking takes 0.5 s of the clock."""

    def __init__(self, X_eval, true_log_prob, clock):
        self.X_eval, self.clock = X_eval, clock
        self.seconds, self.history, self.owners = 0.0, {"round": []}, []

    def __call__(self, estimator, round_):
        self.clock.now += 0.5
        self.seconds += 0.5
        self.history["round"].append(round_)


@pytest.fixture
def fake_study(monkeypatch):
    """run_study with instant stand-ins for the fits, the tracker and the comparisons;
    returns (run, held-out sets passed to the comparisons, their training sets)."""
    clock = _Clock()
    monkeypatch.setattr(studies, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(
        studies, "_builders",
        lambda case, k, seed, settings: {n: functools.partial(_StudyModel, clock, n)
                                         for n in studies.METHODS},
    )  # fmt: skip
    monkeypatch.setattr(
        studies, "_competitive",
        lambda case, k, seed, settings, init="kmeans", assignment="exact": _StudyModel(
            clock, f"{init} {assignment}"
        ),
    )  # fmt: skip
    monkeypatch.setattr(studies, "RoundTracker", functools.partial(_StudyTracker, clock=clock))
    train, test = [], []

    def compare(model, X, X_test, **kwargs):
        train.append(X)
        test.append(X_test)
        stats = SimpleNamespace(summary=dict, as_dict=dict)
        return SimpleNamespace(stats={"truth": stats}, estimate=SimpleNamespace(train_time=0.0))

    monkeypatch.setattr(studies, "compare_with_exact", compare)
    case = studies.Case("moons", "moons", n_train=300, n_test=300)  # same sizes: see below

    def run(seed):
        return studies.run_study(case, seed, studies.StudySettings(n_test=300))

    return run, test, train


def _rows(X):
    return {tuple(row) for row in np.asarray(X).tolist()}


def test_study_held_out_points_are_no_seeds_training_points(fake_study):
    run, test, train = fake_study
    for seed in range(3):
        run(seed)
    for i, X_test in enumerate(test):
        assert X_test.shape == (300, 2)
        for X in train:  # this seed's training set and every other seed's
            assert not _rows(X_test) & _rows(X), f"test set of run {i} is training data"


def test_study_fit_time_leaves_out_the_round_trackers_time(fake_study):
    run, _, _ = fake_study
    methods = run(0)["methods"]
    assert methods["competitive (discriminator)"]["fit_time"] == 2.0  # 3.5 s, 1.5 s tracking
    assert methods["competitive (exact)"]["fit_time"] == 2.0  # untracked, as every other


def test_study_rounds_table_takes_each_exact_score_from_its_own_run(fake_study):
    run, _, _ = fake_study
    rounds = run(0)["rounds"]
    assert rounds["kmeans"]["log_likelihood_exact"] == -1.0  # competitive (exact)
    assert rounds["kmeans"]["log_likelihood_discriminator"] == -2.0
    assert rounds["uniform"]["log_likelihood_exact"] == -3.0  # its own uniform exact run
    assert rounds["uniform"]["log_likelihood_discriminator"] == -4.0
    assert rounds["kmeans"]["history"]["round"] == [0, 1, 2]
    assert rounds["uniform"]["rounds_exact"] == 2  # the exact run's own count


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("full_case", studies.FULL_CASES, ids=lambda c: c.name)
def test_every_flow_method_is_planned_the_same_epochs(full_case, quick):
    """The same k-means pre-training (VMoNF's default init_steps, scaled like the epochs,
    in whole epochs) and then E epochs for every flow mixture; the baselines get both."""
    settings = report.QUICK if quick else studies.StudySettings()
    case = settings.scaled(full_case)
    built = {name: make() for name, make in studies._builders(case, 3, 0, settings).items()}
    steps_per_epoch = -(-case.n_train // case.batch_size)
    pretrain = studies.pretrain_epochs(case, settings)
    steps = settings.epoch_scale * VMoNF().init_steps
    assert (pretrain - 1) * steps_per_epoch < max(steps, 1) <= pretrain * steps_per_epoch
    if not quick:
        assert studies.training_epochs(case, settings) == case.epochs  # whole rounds here
    case = studies.Case(case.name, case.toy, epochs=studies.training_epochs(case, settings),
                        n_train=case.n_train, batch_size=case.batch_size)  # fmt: skip
    for name in ("VMoNF (ELBO)", "VMoNF (annealed T)", "VMoNF (exact marginal)"):
        vmonf = built[name]
        assert vmonf.init_steps == pretrain * steps_per_epoch
        assert vmonf.max_epochs == case.epochs
    for name in ("competitive (exact)", "competitive (discriminator)"):
        comp = built[name]
        assert comp.tol is None and comp.pretrain_epochs == pretrain  # every round runs
        assert comp.max_rounds * comp.max_epochs == case.epochs
    for name in ("single flow (larger)", "bagging"):
        assert built[name].pretrain_epochs == pretrain + case.epochs
        assert built[name].max_rounds == 0
    # Every flow method trains on all the training points, and each row is what it says.
    for name, model in built.items():
        if name != "GaussianMixture":
            assert model.validation_fraction == 0.0, name
    assert built["VMoNF (ELBO)"].objective == "elbo"
    assert built["VMoNF (exact marginal)"].objective == "marginal"
    assert built["VMoNF (annealed T)"].temperature == "anneal"
    assert built["competitive (exact)"].assignment == "exact"
    assert built["competitive (discriminator)"].assignment == "discriminator"
    assert built["bagging"].init == "bootstrap"
    # Epochs counted as trained: pre-training plus the rounds that ran.
    comp = built["competitive (exact)"]
    comp.n_iter_ = comp.max_rounds  # as after a fit that ran every round
    comp.history_ = {"epochs": [comp.max_epochs] * comp.max_rounds}
    vmonf = built["VMoNF (ELBO)"]
    vmonf.n_iter_ = vmonf.max_epochs
    assert studies._epochs_trained(comp, case, settings) == pretrain + case.epochs
    comp.history_["epochs"][-1] = 1  # max_time cut the last round short: what ran counts
    assert studies._epochs_trained(comp, case, settings) == pretrain + case.epochs - (
        comp.max_epochs - 1
    )
    comp.history_ = {}  # a model saved before rounds' epochs were kept: every round full
    assert studies._epochs_trained(comp, case, settings) == pretrain + case.epochs
    assert studies._epochs_trained(vmonf, case, settings) == pretrain + case.epochs


# --------------------------------------------------------------- reporting (P3, P4, P5)


def test_log_likelihood_stderr_is_sd_over_sqrt_n():
    values = np.array([0.0, 1.0, 2.0, 3.0])
    assert metrics.mean_estimate(values).stderr == pytest.approx(np.std(values, ddof=1) / 2.0)
    assert metrics.mean_estimate(np.r_[values, -np.inf]).stderr == math.inf
    assert metrics.mean_estimate(values[:1]).stderr == math.inf
    assert metrics.mean_estimate([0.0, 1.0, 2.0, 3.0]) == metrics.mean_estimate(values)
    for bad, match in [([1.0, math.nan], "NaN"), ([], "empty"), ([[0.0, 10.0]], "1-D")]:
        with pytest.raises(ValueError, match=match):
            metrics.mean_estimate(bad)


def test_accuracy_with_fixed_names_is_not_hungarian():
    out = reporting.evaluate_on_toy(
        _FakeModel(stray=False), _FakeToy(), _data()["X_test"], _data()["y_test"], labelled=True
    )
    assert out["accuracy"] == 0.0 and out["clustering_accuracy"] == 1.0


def test_plot_bounds_uses_each_axis_own_range():
    X = np.array([[0.0, 10.0], [1.0, 30.0]])
    assert reporting.plot_bounds(X, margin=0.0) == (0.0, 1.0, 10.0, 30.0)


def test_study_fits_record_their_convergence_warnings_and_pass_others_on():
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    class Warns:
        def fit(self, X):
            warnings.warn("VMoNF: stopped; raise max_time", ConvergenceWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
            return self

    with pytest.warns(UserWarning, match="something else"):
        seconds, messages = studies._fit(Warns(), np.zeros((3, 2)), None)
    assert messages == ["VMoNF: stopped; raise max_time"] and seconds >= 0


def test_partial_labels_and_kde_helpers_name_bad_arguments():
    """numpy's "object of type 'NoneType' has no len()", a 7 GiB allocation, labels
    beyond n_classes silently never labelled, a truthy string taken as shuffle=True."""
    y = np.arange(20) % 4
    for args, error, match in [
        ((y, 4, 4, None), TypeError, "seed must be an int"),
        ((y, 4, 10**9, 0), ValueError, "n_classes must be <= 20"),
        ((y, 3, 3, 0), ValueError, r"class labels in \[0, 3\)"),
    ]:
        with pytest.raises(error, match=match):
            reporting.partial_labels(*args)
    assert (reporting.partial_labels(y, 8, 4, 0) >= 0).sum() == 8
    with pytest.raises(ValueError, match="standardise the points first"):
        metrics.kde_bandwidth_grid(1e308)
    points = np.random.default_rng(0).normal(size=(60, 2))
    with pytest.raises(TypeError, match="shuffle"):
        metrics.kde_log_likelihood(points, points, n_select=20, n_test=None, shuffle="False")


def test_the_training_figure_leaves_out_flat_curves_and_the_clock():
    """A constant temperature and the wall clock filled two of four panels."""
    history = {
        "loss": [2.0, 1.5, 1.4], "val_loss": [2.1, 1.6, math.nan], "lr": [1e-3, 5e-4, 1e-4],
        "temperature": [1.0, 1.0, 1.0], "time": [0.1, 0.2, 0.3],
    }  # fmt: skip
    assert reporting._curves_worth_drawing(history).keys() == {
        "loss", "val_loss", "learning rate"
    }  # fmt: skip
    assert reporting._curves_worth_drawing({"temperature": [1.0, 0.5, math.nan]}) == {
        "temperature": [1.0, 0.5, math.nan]
    }


def test_report_figures_carry_the_note_of_the_run(tmp_path, monkeypatch):
    """Figures drawn inside run_study (a worker process in a real report) carry the
    report's figure_note, as `vmonf fit` figures carry theirs."""
    noted: list[list[str]] = []
    savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        noted.append([t.get_text() for t in fig.texts])
        return savefig(fig, *args, **kwargs)

    def fake_study(case, seed, settings, figures_dir):
        if figures_dir is not None:
            plots.save_figure(plots.new_figure(2.0, 2.0), figures_dir / "a.png", 30)
        return {"case": case.name, "seed": seed}

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    monkeypatch.setattr(report, "run_study", fake_study)
    jobs = [(SimpleNamespace(name="toy"), 0), (SimpleNamespace(name="toy"), 1)]
    results = report._run_all(jobs, studies.StudySettings(), tmp_path, 1, True, "vmonf 0.1 · x")
    assert [r["seed"] for r in results] == [0, 1]
    assert noted == [["vmonf 0.1 · x"]]  # seed 0 only draws, with the note
