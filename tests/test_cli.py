"""The ``vmonf`` command: ``vmonf fit`` writes a complete run folder; bad input exits 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from vmonf import VMoNF, __version__, cli, datasets, plots, reporting
from vmonf.cli import UsageError, build_parser, in_cli_terms, main, toy_param
from vmonf.reporting import partial_labels

BASE = [
    "--epochs", "2", "--n-train", "200", "--n-test", "200",
    "--layers", "2", "--hidden", "16", "--init-steps", "20", "--quiet",
]  # fmt: skip
TINY = [*BASE, "--no-animation"]

FIGURES = ("density.png", "log_density.png", "samples.png", "posterior.png", "training.png")
METRICS = (
    "log_likelihood",
    "log_likelihood_stderr",
    "true_log_likelihood",
    "kl_to_truth",
    "kl_to_truth_stderr",
    "elbo",
    "amortization_gap",
    "ari",
    "clustering_accuracy",
    "bayes_accuracy",
    "fit_time",
)


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons")
    status = main(["fit", "moons", *TINY, "--out", str(out)])
    return status, out


def _report(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_fit_writes_metrics_model_and_figures(moons_run, capsys):
    status, out = moons_run
    assert status == 0
    report = _report(out)
    for key in METRICS:
        assert math.isfinite(report["metrics"][key]), key
    assert report["metrics"]["accuracy"] is None  # unlabelled: component names are arbitrary
    m = report["metrics"]
    assert m["amortization_gap"] == pytest.approx(m["log_likelihood"] - m["elbo"])
    assert m["kl_to_truth"] == pytest.approx(m["true_log_likelihood"] - m["log_likelihood"])
    assert report["settings"]["toy"] == "moons"
    assert report["settings"]["n_components"] == 2
    assert report["settings"]["estimator_params"]["max_epochs"] == 2
    assert report["settings"]["torch_threads"] == 1  # the estimator's, what it ran on
    model = VMoNF.load(out / "model.pt")
    assert report["fitted"]["train_elbo"] == pytest.approx(model.elbo_)
    assert {"python", "torch", "vmonf"} <= set(report["versions"])
    for name in FIGURES:
        assert (out / name).stat().st_size > 1000, name
    assert not (out / "training.gif").exists()
    assert "train_state.pt" in report["files"]  # the resumable state the run keeps there
    assert all((out / name).is_file() for name in report["files"])


def test_fit_model_reloads_with_the_reported_score(moons_run):
    from vmonf.datasets import toy

    _, out = moons_run
    model = VMoNF.load(out / "model.pt")
    X_test, _ = toy("moons").sample(200, seed=1)  # --seed 0 -> test seed 1
    assert model.score(X_test) == pytest.approx(_report(out)["metrics"]["log_likelihood"])


def test_fit_prints_the_table_and_notes_its_run_on_every_figure(tmp_path, capsys, monkeypatch):
    notes: list[list[str]] = []
    savefig = Figure.savefig

    def record(fig, *args, **kwargs):  # what each figure carries as it is saved
        notes.append([t.get_text() for t in fig.texts])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    status = main(["fit", "moons", *TINY, "--epochs", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert status == 0
    header = next(line for line in printed.out.splitlines() if line.startswith("moons: VMoNF"))
    assert notes and all(f"vmonf {__version__} · {header}" in n for n in notes)
    for label in ("log-likelihood", "KL", "ELBO", "amortisation gap", "ARI", "clustering"):
        assert label in printed.out
    assert "accuracy  " not in printed.out.replace("clustering accuracy", "")
    assert printed.err == ""  # --quiet


def test_semi_supervised_fit_reports_accuracy(tmp_path, capsys):
    status = main(["fit", "moons", *TINY, "--labels", "10", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0
    report = _report(tmp_path)
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    assert report["settings"]["n_labelled"] == 10
    assert "Bayes-optimal" in printed


def test_animation_is_written(tmp_path, capsys):
    status = main(["fit", "moons", *BASE, "--out", str(tmp_path)])
    assert status == 0
    gif = tmp_path / "training.gif"
    assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    VMoNF.load(tmp_path / "model.pt")  # the recorder callback is not saved
    capsys.readouterr()
    # A run without the animation into the same folder says the old one is still there.
    loud = [a for a in TINY if a != "--quiet"]
    assert main(["fit", "moons", *loud, "--out", str(tmp_path)]) == 0
    assert f"{tmp_path}/ also holds training.gif from an earlier run" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text('{"files": null}')  # someone else's: no matter
    assert main(["fit", "moons", *TINY, "--out", str(tmp_path)]) == 0


def test_fit_time_leaves_out_the_animation_frames_drawn_during_the_fit(tmp_path, monkeypatch):
    clock = iter(range(10**6))  # every frame takes exactly 1 "second" on this clock
    monkeypatch.setattr(reporting, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(reporting, "write_figures", lambda *args, **kwargs: [])  # not needed
    assert main(["fit", "moons", *BASE, "--out", str(tmp_path)]) == 0
    metrics = _report(tmp_path)["metrics"]
    assert metrics["recording_time"] == 2.0  # epochs 1 and 2; not the final model's frame
    fit_time = VMoNF.load(tmp_path / "model.pt").fit_time_  # the fit's wall time
    assert metrics["fit_time"] == pytest.approx(fit_time - 2.0, abs=1e-12)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["fit", "no_such_toy"], "no_such_toy"),
        (["fit", "moons", "--epochs", "0"], "--epochs"),
        (["fit", "moons", "--epochs", "two"], "--epochs"),
        (["fit", "moons", "--objective", "mle"], "--objective"),
        (["fit", "moons", "--toy-param", "noise"], "key=value"),
        (["fit", "moons", "--toy-param", "sigma=1"], "sigma"),
        (["fit", "moons", "--toy-param", "noise=-1"], "noise"),
        (["fit", "moons", "--labels", "10", "--components", "1"], "--components"),
        (["fit", "moons", "--n-train", "20", "--labels", "30"], "label"),
        (["fit", "pinwheel", "--labels", "2"], "at least the toy's 5 classes"),
        (["fit", "moons", "--seed", str(2**64)], "--seed"),
        (["fit", "moons", "--n-test", "1"], "--n-test: expected at least 2 held-out points"),
        (["compete", "moons", "--device", "gpu"], "expected cpu, cuda, cuda:N or auto"),
        (["compete", "moons", "--seed", str(2**63 - 2)], "--seed"),  # seed + 2 is used
        (
            ["compete", "moons", "--generator", "vae", "--assignment", "exact"],
            "--assignment discriminator",
        ),
        (["compete", "moons", "--generator", "vae", "--rounds", "0"], "use --rounds >= 1"),
        (["compete", "moons", "--rounds", "0", "--assignment", "discriminator"], "--rounds 0"),
        (["compete", "moons", "--tol", "1"], "--tol: expected a fraction in [0, 1)"),
        (["compete", "moons", "--tol", "nan"], "--tol"),
        (["report", "--seeds", "1001"], "--seeds: expected at most 1000"),
        (["report", "--out", ""], "--out: expected a folder, got an empty path"),
        (["frobnicate"], "frobnicate"),
        ([], "required"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    writes = argv[:1] in (["fit"], ["compete"])
    status = main([*argv, *(["--out", str(tmp_path)] if writes else [])])
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vmonf: error: ")
    assert needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # the estimators' messages in the commands' terms (elbo_top_k, n_components=5 before)
        (["fit", "pinwheel", "--elbo-top-k", "9"], "--elbo-top-k must be <= --components"),
        (["fit", "pinwheel", "--n-train", "3"], "--components 5 is larger than the number"),
        (["compete", "pinwheel", "--n-train", "3"], "--components 5 is larger than the number"),
        (["fit", "pinwheel", "--nproc", "2", "--n-train", "3"], "--components 5 is larger"),
        (["compete", "moons", "--nproc", "2", "--n-train", "1"], "is larger than the number"),
    ],
)
def test_bad_settings_fail_once_before_any_folder_or_process(
    argv, needle, capsys, tmp_path, monkeypatch
):
    """Settings the estimator refuses fail before the output folder is made and before
    torchrun starts its ranks (each printed the error, then torchrun's traceback)."""
    launched = []
    monkeypatch.setattr(cli, "_relaunch_under_torchrun", lambda *a: launched.append(a) or 1)
    out = tmp_path / "run"
    status = main([*argv, "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not out.exists() and not launched


def test_help_returns_0(capsys):
    assert main(["--help"]) == 0
    assert "fit" in capsys.readouterr().out
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--components", "--labels", "--toy-param", "--no-animation", "pinwheel"):
        assert option in text


def test_python_m_vmonf_help():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "vmonf", "--help"],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: vmonf" in done.stdout
    assert "fit" in done.stdout


def test_toy_param_parsing():
    assert toy_param("n_modes=6") == ("n_modes", 6)
    assert toy_param("noise=0.2") == ("noise", 0.2)
    assert toy_param("radii=0.5,1.0") == ("radii", (0.5, 1.0))
    assert toy_param("name=abc") == ("name", "abc")


def test_partial_labels_spread_evenly():
    y = np.repeat(np.arange(3), 50)
    part = partial_labels(y, 10, 3, seed=0)
    counts = np.bincount(part[part >= 0], minlength=3)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1
    kept = part >= 0
    assert np.array_equal(part[kept], y[kept])
    assert np.array_equal(part, partial_labels(y, 10, 3, seed=0))
    with pytest.raises(ValueError, match="class 2"):
        partial_labels(np.array([0, 0, 1, 1, 0]), 3, 3, seed=0)


@pytest.mark.parametrize("command", ["fit", "compete"])
def test_base_df_option_is_parsed_and_checked(command):
    parser = build_parser()
    assert parser.parse_args([command, "pinwheel", "--base-df", "20"]).base_df == 20.0
    assert parser.parse_args([command, "pinwheel"]).base_df is None
    for bad in ("0", "1e-300"):  # 1e-300 is zero in float32
        with pytest.raises(UsageError, match="--base-df"):
            parser.parse_args([command, "pinwheel", "--base-df", bad])


def test_elbo_top_k_option_is_parsed_and_checked(tmp_path):
    parser = build_parser()
    assert parser.parse_args(["fit", "pinwheel", "--elbo-top-k", "2"]).elbo_top_k == 2
    assert parser.parse_args(["fit", "pinwheel"]).elbo_top_k is None
    with pytest.raises(UsageError, match="--elbo-top-k"):
        parser.parse_args(["fit", "pinwheel", "--elbo-top-k", "1"])


def test_reporting_checks_its_inputs_up_front(tmp_path):
    X = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(ValueError, match="margin"):
        reporting.plot_bounds(X, margin=float("nan"))
    far = reporting.plot_bounds(np.full((3, 2), 1e12))  # constant data far from 0
    assert far[0] < far[1] and far[2] < far[3]  # was xmin == xmax, refused by the plots
    with pytest.raises(ValueError, match="more than float64 can hold"):
        reporting.plot_bounds(np.array([[-1e308, 0.0], [1e308, 1.0]]))
    with pytest.raises(ValueError, match="bounds"):  # at construction, not mid-fit
        reporting.DensityRecorder((1.0, 0.0, 0.0, 1.0))
    model = VMoNF(2, max_epochs=1, n_layers=2, hidden_features=8, init_steps=5).fit(X)
    with pytest.raises(ValueError, match="y_test has 5 labels but X_test has 50 rows"):
        reporting.write_figures(
            model, None, X, np.zeros(5, int), tmp_path, reporting.plot_bounds(X), labelled=False
        )
    with pytest.raises(ValueError, match=r"y_test must hold the true classes \(>= 0\)"):
        reporting.evaluate_on_toy(model, datasets.toy("moons"), X, np.full(50, -1))
    with pytest.raises(TypeError, match="true_log_prob must be callable"):
        plots.plot_density_comparison(5, model.score_samples, (0, 1, 0, 1), tmp_path / "d.png")
    path = reporting.write_json({"a": float("nan")}, str(tmp_path / "m.json"))  # a str path
    assert path.read_text().strip().endswith("}")


def test_infinities_are_told_apart_from_not_applicable(tmp_path):
    values = (None, math.nan, np.float32("nan"), math.inf, -np.float32("inf"), 0.5)
    assert [reporting.format_number(v) for v in values] == [
        "n/a", "n/a", "n/a", "inf", "-inf", "0.500"
    ]  # fmt: skip
    table = reporting.format_table({"kl_to_truth": math.inf, "ari": math.nan}, labelled=False)
    assert "inf ± n/a  nats" in table
    values = {"nan": math.nan, "inf": math.inf, "minus_inf": -math.inf, "one": 1.0}
    read = json.loads(reporting.write_json(values, tmp_path / "m.json").read_text())
    assert read["nan"] is None and read["inf"] == "Infinity"  # strict JSON
    back = {k: reporting.as_float(v) for k, v in read.items()}
    assert math.isnan(back.pop("nan")) and back == {"inf": math.inf, "minus_inf": -math.inf,
                                                    "one": 1.0}  # fmt: skip
    zero_d = json.loads(reporting.write_json({"a": np.array(1.5)}, tmp_path / "z.json").read_text())
    assert zero_d == {"a": 1.5}  # was "'float' object is not iterable"
    with pytest.raises(ValueError, match="collide as JSON strings"):  # one was lost, silently
        reporting.write_json({1: "a", "1": "b"}, tmp_path / "c.json")


@pytest.mark.parametrize(("device", "has_cuda", "joins_on"), [
    ("auto", True, "cuda"), ("auto", False, "cpu"), ("cuda", True, "cuda"), ("cpu", True, "cpu"),
])  # fmt: skip
def test_under_torchrun_ranks_join_on_the_device_they_compute_on(
    monkeypatch, device, has_cuda, joins_on
):
    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    monkeypatch.setattr(cli, "init_from_env", lambda d: joined.append(d.type))
    assert cli._join_process_group(argparse.Namespace(device=device, quiet=False))
    assert joined == [joins_on]


def test_vmonf_never_imports_competitive_unless_a_command_needs_it():
    code = (
        "import sys\n"
        "from vmonf.cli import build_parser, main\n"
        "build_parser()\n"
        "assert main(['fit', '--help']) == 0\n"
        "assert 'competitive' not in sys.modules, 'imported'\n"
        "assert main(['report', '--cases', 'nope']) == 2  # its options: competitive's\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nope" in done.stderr


# --------------------------------------------------------------- cli (C2, C4)


class _Stop(BaseException):
    pass


def _capture(monkeypatch, target, name):
    seen = {}

    class Fake:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

        device = "cpu"

        def get_params(self):
            return {}

        def _validate_settings(self):
            pass

        def _check_n_samples(self, n_samples):
            pass

        def fit(self, *args, **kwargs):
            raise _Stop

    monkeypatch.setattr(target, name, Fake)
    return seen


def test_fit_passes_lr_to_the_estimator(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, cli, "VMoNF")
    with pytest.raises(_Stop):
        cli.main(["fit", "moons", "--lr", "0.0123", "--quiet", "--no-animation",
                  "--out", str(tmp_path)])  # fmt: skip
    assert seen["learning_rate"] == 0.0123


def test_compete_passes_pretrain_epochs_to_the_estimator(monkeypatch, tmp_path):
    import competitive

    seen = _capture(monkeypatch, competitive, "CompetitiveMixture")
    with pytest.raises(_Stop):
        cli.main(["compete", "moons", "--pretrain-epochs", "3", "--quiet",
                  "--out", str(tmp_path)])  # fmt: skip
    assert seen["pretrain_epochs"] == 3
    assert seen["tol"] == "auto"  # 0.02 for flows (which rarely reach 0), 0 for k-means


def test_compete_passes_tol_to_the_estimator(monkeypatch, tmp_path):
    import competitive

    seen = _capture(monkeypatch, competitive, "CompetitiveMixture")
    with pytest.raises(_Stop):
        cli.main(["compete", "moons", "--tol", "0", "--quiet", "--out", str(tmp_path)])
    assert seen["tol"] == 0.0


def test_training_figure_labels_the_loss_in_nats_per_point(tmp_path, monkeypatch):
    X = np.random.default_rng(0).normal(size=(50, 2))
    model = VMoNF(2, max_epochs=1, n_layers=2, hidden_features=8, init_steps=5).fit(X)
    seen: dict[str, object] = {}
    real = reporting.plots.plot_training_curves

    def spy(history, path, **options):
        seen.update(options)
        return real(history, path, **options)

    monkeypatch.setattr(reporting.plots, "plot_training_curves", spy)
    reporting.write_figures(
        model, None, X, np.zeros(50, int), tmp_path, reporting.plot_bounds(X), labelled=False,
        history={"loss": [1.0], "lr": [1e-3], "temperature": [1.0]},
    )  # fmt: skip
    assert seen["units"] == {"loss": "nats per point"}  # only the keys the history has


def test_the_posterior_figure_marks_the_labelled_training_points(tmp_path, monkeypatch):
    """A semi-supervised run's figure looked the same as an unsupervised one's."""
    X = np.random.default_rng(0).normal(size=(50, 2))
    model = VMoNF(2, max_epochs=1, n_layers=2, hidden_features=8, init_steps=5).fit(X)
    saved = {}
    real = reporting.plots.save_figure

    def spy(fig, path, dpi):
        saved[Path(path).name] = fig
        return real(fig, path, dpi)

    monkeypatch.setattr(reporting.plots, "save_figure", spy)
    reporting.write_figures(
        model, None, X, np.zeros(50, int), tmp_path, reporting.plot_bounds(X), labelled=True,
        labelled_points=(X[:3], np.array([0, 1, 1])),
    )  # fmt: skip
    ax = saved["posterior.png"].axes[0]
    stars = [c for c in ax.collections if c.get_offsets().shape == (3, 2)]
    assert len(stars) == 1 and "3 labelled training points" in ax.get_title()
    with pytest.raises(ValueError, match="labelled_points y must hold the true classes"):
        reporting.write_figures(
            model, None, X, np.zeros(50, int), tmp_path, reporting.plot_bounds(X),
            labelled=True, labelled_points=(X[:2], np.array([0, -1])),
        )  # fmt: skip


def test_compete_stopped_by_max_time_before_any_round_still_reports(tmp_path):
    """No round finished: the shares figure has nothing to draw (it raised, after the
    table was printed and before metrics.json was written)."""
    argv = ["compete", "moons", "--n-train", "200", "--n-test", "100", "--epochs", "1",
            "--pretrain-epochs", "1", "--rounds", "1", "--max-time", "1e-9", "--quiet",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "metrics.json").exists() and not (tmp_path / "shares.png").exists()


def test_estimator_messages_name_the_commands_options():
    """A CLI warning said "raise max_rounds or tol (e.g. tol=0.02 ...)": the options are
    --rounds and --tol."""
    assert in_cli_terms("raise max_rounds or tol (e.g. tol=0.02: points move)") == (
        "raise --rounds or --tol (e.g. --tol 0.02: points move)"
    )
    assert in_cli_terms('raise max_time, lower learning_rate or try init="kmeans"') == (
        "raise --max-time, lower --lr or try --init kmeans"
    )
    assert in_cli_terms("on the device it was fitted on") == "on the device it was fitted on"
    assert in_cli_terms("--max-time 3") == "--max-time 3"
    # Paths, quoted names and Python code are the user's or vmonf's own words: left alone.
    for text in (
        "results/max_epochs=10/metrics.json",
        "cannot create runs/max_time/a",
        "{'max_epochs': 10, 'tol': 0.02}",
        "VMoNF.load(path, device='cpu')",
    ):
        assert in_cli_terms(text) == text
    # Only options the command has: vmonf fit has no --init.
    fit_options = {"--max-time", "--lr", "--components"}
    assert in_cli_terms('raise max_time or try init="kmeans"', fit_options) == (
        'raise --max-time or try init="kmeans"'
    )


def test_an_os_error_keeps_its_path_as_written(tmp_path, capsys):
    blocker = tmp_path / "max_time"
    blocker.write_text("a file where a folder is needed")
    out = blocker / "run"
    argv = ["fit", "moons", "--n-train", "50", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert str(blocker) in err and "--max-time" not in err


def test_vaes_without_rounds_are_not_told_to_use_exact_assignment(capsys):
    """--rounds 0 suggested --assignment exact, which VAEs are refused."""
    assert main(["compete", "moons", "--generator", "vae", "--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("use --rounds >= 1") and "--assignment exact" not in err
