"""The comparison report's tables, options and study internals, and the reporting helpers
they use, checked cell by cell on synthetic results (float64)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from competitive import report, studies
from vmonf import reporting


def test_markdown_table_escapes_pipes_inside_cells():
    table = reporting.markdown_table(["method", "what"], [["VMoNF", "soft, amortised q(c|x)"]])
    row = table.splitlines()[2]
    assert row == "| VMoNF | soft, amortised q(c\\|x) |"
    assert len(row.replace("\\|", "").strip("|").split("|")) == 2  # two columns, as the header


# --------------------------------------------------------------- report tables (R1-R4, R7)


def _result(seed, kl, acc, ari, agreement, exact, disc, spearman, pearson):
    method = {"kl_to_truth": kl, "ari": ari, "accuracy": acc, "components_used": 2,
              "fit_time": 1.0}  # fmt: skip
    stats = {k: 0.0 for k in ("agreement", "ari", "mae", "mae_owned", "bias", "saturated")}
    cmp = {"truth": {**stats, "spearman": spearman, "pearson": pearson},
           "mixture": {**stats, "spearman": 0.0, "pearson": 0.0}}  # fmt: skip
    rounds = {"history": {"agreement": agreement}, "log_likelihood_exact": exact,
              "log_likelihood_discriminator": disc}  # fmt: skip
    return {
        "case": "toy", "seed": seed, "k": 2, "n_train": 10, "n_test": 10, "n_labelled": 4,
        "epochs": 4, "truth": {"log_likelihood": -1.0, "bayes_accuracy": 1.0},
        "methods": {name: dict(method) for name in studies.METHODS},
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
    assert _row(report.pivot(RESULTS, "kl_to_truth"), "| VMoNF (ELBO) |")[1] == "2.000 ± 1.414"
    row = _row(report.soft_hard_tables(RESULTS), "| VMoNF (ELBO) |")
    assert row[-4] == "0.300 ± 0.141"  # ARI (from the end: "q(c|x)" holds a pipe)
    assert row[-3] == "0.800 ± 0.141"  # accuracy, not ARI
    row = _row(report.rounds_markdown_table(RESULTS), "| toy | uniform |")
    assert row[4] == "2.0 ± 0.0"  # rounds = entries after round 0
    assert row[7] == "2.000 ± 0.000"  # exact - discriminator, positive here
    row = _row(report.comparison_markdown_table(RESULTS), "| toy | VMoNF (ELBO) |")
    assert row[4] == "0.120 ± 0.014" and row[5] == "0.980 ± 0.014"  # Spearman, Pearson


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


# --------------------------------------------------------------- reporting (P3, P4, P5)


def test_log_likelihood_stderr_is_sd_over_sqrt_n():
    values = np.array([0.0, 1.0, 2.0, 3.0])
    assert reporting._stderr(values) == pytest.approx(np.std(values, ddof=1) / 2.0)


def test_accuracy_with_fixed_names_is_not_hungarian():
    out = reporting.evaluate_on_toy(
        _FakeModel(stray=False), _FakeToy(), _data()["X_test"], _data()["y_test"], labelled=True
    )
    assert out["accuracy"] == 0.0 and out["clustering_accuracy"] == 1.0


def test_plot_bounds_uses_each_axis_own_range():
    X = np.array([[0.0, 10.0], [1.0, 30.0]])
    assert reporting.plot_bounds(X, margin=0.0) == (0.0, 1.0, 10.0, 30.0)
