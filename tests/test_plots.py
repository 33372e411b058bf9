"""Tests for vmonf.plots: every figure is written, opens in PIL, and bad input raises."""

from __future__ import annotations

from pathlib import Path

import matplotlib.axes
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from scipy.stats import multivariate_normal

from vmonf import plots, reporting
from vmonf.plots import (
    animate_assignments,
    animate_density,
    density_grid,
    grid_points,
    plot_decision_regions,
    plot_density_comparison,
    plot_image_grid,
    plot_samples,
    plot_training_curves,
)

BOUNDS = (-3.0, 3.0, -2.0, 2.0)
_TRUE = multivariate_normal(np.zeros(2), np.eye(2))
_MODEL = multivariate_normal(np.array([0.5, 0.0]), np.diag([1.5, 0.5]))


def _true_log_prob(x: np.ndarray) -> np.ndarray:
    return _TRUE.logpdf(x)


def _model_log_prob(x: np.ndarray) -> torch.Tensor:  # torch output is accepted
    return torch.from_numpy(_MODEL.logpdf(x))


def _data(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 2))
    y = (X[:, 0] > 0).astype(int)
    y[::5] = -1
    return X, y


def _assert_image(path: Path, fmt: str, n_frames: int = 1) -> None:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == fmt
        assert im.size[0] > 0 and im.size[1] > 0
        assert im.mode in {"RGBA", "RGB", "P", "L"}
        assert getattr(im, "n_frames", 1) == n_frames


def test_density_grid_shapes_and_orientation():
    xx, yy, dens = density_grid(_true_log_prob, BOUNDS, resolution=11)
    assert xx.shape == yy.shape == dens.shape == (11, 11)
    assert xx[0, 0] == -3.0 and xx[0, -1] == 3.0 and yy[0, 0] == -2.0 and yy[-1, 0] == 2.0
    np.testing.assert_allclose(dens[5, 5], _TRUE.pdf([0.0, 0.0]))
    gx, gy = grid_points(BOUNDS, 11)
    np.testing.assert_array_equal(gx, xx)
    np.testing.assert_array_equal(gy, yy)


def test_density_grid_rejects_nan_and_wrong_shape():
    with pytest.raises(ValueError, match="NaN"):
        density_grid(lambda x: np.full(len(x), np.nan), BOUNDS, 5)
    with pytest.raises(ValueError, match="must return shape"):
        density_grid(lambda x: np.zeros(3), BOUNDS, 5)
    with pytest.raises(TypeError, match="log_prob must be callable"):
        density_grid(None, BOUNDS, 5)


def test_an_estimator_passed_for_a_callable_is_told_which_method_to_pass(tmp_path):
    class Estimator:  # what a user passes: the fitted model itself
        def score_samples(self, X): ...
        def predict_proba(self, X): ...

    with pytest.raises(TypeError, match=r"got Estimator \(pass its method, e.g. model.score_s"):
        density_grid(Estimator(), BOUNDS, 5)
    with pytest.raises(TypeError, match=r"model_log_prob must .* e.g. model.score_samples"):
        plot_density_comparison(None, Estimator(), BOUNDS, tmp_path / "d.png")
    with pytest.raises(TypeError, match=r"predict must .* e.g. model.predict_proba\)"):
        plot_decision_regions(Estimator(), BOUNDS, tmp_path / "r.png")
    with pytest.raises(ValueError, match="resolution must be >= 2"):
        density_grid(_true_log_prob, BOUNDS, 1)


def test_plot_density_comparison(tmp_path):
    out = plot_density_comparison(
        _true_log_prob, _model_log_prob, BOUNDS, tmp_path / "sub" / "d.png", resolution=30
    )
    assert isinstance(out, Path) and out == tmp_path / "sub" / "d.png"
    _assert_image(out, "PNG")
    single = plot_density_comparison(
        None, _model_log_prob, BOUNDS, str(tmp_path / "m.png"), resolution=30
    )
    _assert_image(single, "PNG")
    with Image.open(out) as two, Image.open(single) as one:
        assert two.size[0] > one.size[0]  # two panels are wider than one


def test_plot_samples(tmp_path):
    X, y = _data()
    _assert_image(plot_samples(X, y, tmp_path / "s.png", title="samples"), "PNG")
    _assert_image(
        plot_samples(torch.from_numpy(X), None, tmp_path / "s2.png", bounds=BOUNDS), "PNG"
    )


def test_plot_decision_regions_labels_and_probabilities(tmp_path):
    X, y = _data()

    def predict(x: np.ndarray) -> np.ndarray:
        return (x[:, 0] > 0).astype(int)

    def proba(x: np.ndarray) -> np.ndarray:
        logits = np.column_stack([-x[:, 0], x[:, 0], np.zeros(len(x))])
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    out = plot_decision_regions(predict, BOUNDS, tmp_path / "r.png", X=X, y=y, resolution=25)
    _assert_image(out, "PNG")
    out = plot_decision_regions(proba, BOUNDS, tmp_path / "p.png", X=X, resolution=25)
    _assert_image(out, "PNG")
    _assert_image(plot_decision_regions(predict, BOUNDS, tmp_path / "n.png", resolution=25), "PNG")


def test_plot_training_curves(tmp_path):
    history = {
        "loss": [3.0, 2.0, 1.5, 1.4],
        "val_loss": [3.1, 2.2, 1.7, 1.6],
        "temperature": list(np.exp(-np.arange(4.0))),
        "grad_norm": [1.0, np.nan, 0.5, 0.4],
    }
    out = plot_training_curves(history, tmp_path / "c.png", log_scale=["temperature"])
    _assert_image(out, "PNG")
    # A competitive fit's history: per-round shares (rounds, K) as K lines.
    shares = {"share": [[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]], "n_changed": [10, 2]}
    _assert_image(plot_training_curves(shares, tmp_path / "s.png"), "PNG")


def test_plot_image_grid(tmp_path):
    rng = np.random.default_rng(0)
    _assert_image(plot_image_grid(rng.random((7, 8, 8)), tmp_path / "g.png", n_cols=3), "PNG")
    _assert_image(plot_image_grid(rng.random((4, 5, 6, 3)), tmp_path / "rgb.png"), "PNG")
    _assert_image(plot_image_grid(torch.rand(2, 4, 4, 1), tmp_path / "c1.png"), "PNG")


def test_animate_density(tmp_path):
    frames = [density_grid(_true_log_prob, BOUNDS, 20)[2] * s for s in (0.5, 1.0, 1.5)]
    out = animate_density(frames, BOUNDS, tmp_path / "a.gif", fps=4, titles=["a", "b", "c"])
    _assert_image(out, "GIF", n_frames=3)


def test_animate_assignments(tmp_path):
    X, y = _data()
    out = animate_assignments(X, [y, np.zeros(len(X), int), y[::-1]], tmp_path / "l.gif")
    _assert_image(out, "GIF", n_frames=3)


@pytest.mark.parametrize(
    "bounds",
    [
        (1.0, 1.0, 0.0, 1.0),
        (2.0, 1.0, 0.0, 1.0),
        (0.0, 1.0, 1.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, np.inf, 0.0, 1.0),
    ],
)
def test_bad_bounds_raise(tmp_path, bounds):
    with pytest.raises(ValueError, match="bounds"):
        plot_density_comparison(None, _model_log_prob, bounds, tmp_path / "x.png", resolution=5)
    with pytest.raises(ValueError, match="bounds"):
        plot_decision_regions(lambda x: np.zeros(len(x), int), bounds, tmp_path / "x.png")
    with pytest.raises(ValueError, match="bounds"):
        animate_density([np.ones((3, 3))], bounds, tmp_path / "x.gif")
    assert not (tmp_path / "x.png").exists()


def test_mismatched_lengths_raise(tmp_path):
    X, y = _data()
    with pytest.raises(ValueError, match="labels has 59 labels but X has 60 rows"):
        plot_samples(X, y[:-1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="y has 59 labels"):
        plot_decision_regions(
            lambda x: np.zeros(len(x), int), BOUNDS, tmp_path / "x.png", X=X, y=y[:-1]
        )
    with pytest.raises(ValueError, match=r"label_frames\[1\] has 59 labels"):
        animate_assignments(X, [y, y[:-1]], tmp_path / "x.gif")


def test_other_bad_arguments_raise(tmp_path):
    X, y = _data()
    with pytest.raises(ValueError, match="X has 3 features"):
        plot_samples(np.zeros((4, 3)), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="n_classes=1"):
        plot_samples(X, y, tmp_path / "x.png", n_classes=1)
    with pytest.raises(ValueError, match="history is empty"):
        plot_training_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="log_scale names keys not in history"):
        plot_training_curves({"loss": [1.0]}, tmp_path / "x.png", log_scale=["nope"])
    with pytest.raises(ValueError, match=r"history\['loss'\] must be a non-empty"):
        plot_training_curves({"loss": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="images must have shape"):
        plot_image_grid(np.zeros((3, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"frames\[1\] has shape"):
        animate_density([np.ones((3, 3)), np.ones((4, 4))], BOUNDS, tmp_path / "x.gif")
    with pytest.raises(ValueError, match="titles has 1 entries"):
        animate_density([np.ones((3, 3))] * 2, BOUNDS, tmp_path / "x.gif", titles=["a"])
    with pytest.raises(ValueError, match="y was given without X"):
        plot_decision_regions(lambda x: np.zeros(len(x), int), BOUNDS, tmp_path / "x.png", y=y)
    with pytest.raises(TypeError, match="path must be a str"):
        plot_samples(X, y, 123)
    with pytest.raises(ValueError, match="must name a file"):
        plot_samples(X, y, tmp_path)  # a directory
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="part of its folder is a file"):
        plot_samples(X, y, tmp_path / "file" / "x.png")
    with pytest.raises(TypeError, match="titles must be a sequence of 2 strings"):
        plot_density_comparison(None, lambda x: np.zeros(len(x)), BOUNDS, tmp_path / "x.png",
                                titles="ab")  # fmt: skip
    images = np.random.default_rng(0).random((4, 5, 5))
    with pytest.raises(ValueError, match="vmin must be below vmax"):
        plot_image_grid(images, tmp_path / "x.png", vmin=1.0, vmax=0.0)
    with pytest.raises(TypeError, match="vmin must be a number"):
        plot_image_grid(images, tmp_path / "x.png", vmin="0")
    with pytest.raises(ValueError, match="vmax must be finite"):
        plot_image_grid(images, tmp_path / "x.png", vmax=float("nan"))


def test_training_curves_clip_a_huge_first_epoch_and_pair_validation(tmp_path):
    history = {
        "loss": [470.0, 1.2, 1.0, 0.9, 0.85],
        "val_loss": [400.0, 1.3, 1.1, 1.0, 0.95],
        "lr": [1e-3] * 5,
    }
    path = plot_training_curves(history, tmp_path / "t.png")
    with Image.open(path) as image:
        assert image.size[0] > image.size[1]  # two panels side by side: loss (+val), lr


# --------------------------------------------------------------- plots (L1, L2, L3)


def test_density_grid_value_at_each_node_is_the_density_there():
    bounds = (-3.0, 3.0, -2.0, 2.0)
    xx, yy, dens = plots.density_grid(lambda p: p[:, 0] + 2.0 * p[:, 1], bounds, resolution=7)
    np.testing.assert_allclose(dens, np.exp(xx + 2.0 * yy))


@pytest.fixture
def imshow_vmax(monkeypatch):
    seen = []
    original = matplotlib.axes.Axes.imshow

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("vmax"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    return seen


def test_density_comparison_shares_one_colour_scale(tmp_path, imshow_vmax):
    bounds = (-1.0, 1.0, -1.0, 1.0)
    plots.plot_density_comparison(
        lambda p: np.full(len(p), np.log(5.0)), lambda p: np.zeros(len(p)), bounds,
        tmp_path / "d.png", resolution=5,
    )  # fmt: skip
    assert imshow_vmax == [pytest.approx(5.0)] * 2  # the truth's peak, on both panels


def test_animate_density_uses_the_given_vmax(tmp_path, imshow_vmax):
    plots.animate_density([np.ones((4, 4))], (0.0, 1.0, 0.0, 1.0), tmp_path / "a.gif", vmax=3.0)
    assert imshow_vmax == [3.0]


def test_training_curves_label_the_units_given(tmp_path, monkeypatch):
    labels: list[str] = []
    record = lambda ax, label, *args, **kwargs: labels.append(label)  # noqa: E731
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", record)
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "lr": [1e-3, 1e-3], "time": [1, 2]}
    plot_training_curves(history, tmp_path / "t.png", units={"loss": "nats", "time": "s"})
    assert labels == ["nats", "s"]  # val_loss shares the loss panel; lr has no unit
    with pytest.raises(ValueError, match=r"units names keys not in history: \['temp'\]"):
        plot_training_curves(history, tmp_path / "x.png", units={"temp": "K"})
    with pytest.raises(TypeError, match="units must map history keys to labels, got str"):
        plot_training_curves(history, tmp_path / "x.png", units="nats")


def test_a_one_epoch_history_gets_one_integer_tick(tmp_path, monkeypatch):
    ticks: list[list[float]] = []
    savefig = Figure.savefig

    def record(fig, *args, **kwargs):
        fig.canvas.draw()  # the ticks as drawn
        ticks.extend(
            [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            for ax in fig.axes
        )
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    plot_training_curves({"loss": [1.08]}, tmp_path / "t.png")  # 0.945, 0.960, ... before
    assert ticks == [[1.0]]


def test_a_huge_label_is_refused_not_given_a_palette_row_per_value(tmp_path):
    # A label of 10**9 used to allocate a 10**9-colour palette (7.5 GiB, then killed).
    with pytest.raises(ValueError, match=r"plots colour labels 0\.\.999, got a label 1000000000"):
        plot_samples(np.zeros((2, 2)), [0, 10**9], tmp_path / "s.png")
    with pytest.raises(ValueError, match="got a label 1000000"):
        plots.plot_component_images(np.zeros((2, 4, 4)), [0, 10**6], tmp_path / "c.png")
    with pytest.raises(ValueError, match="n_classes must be <= 1000"):
        plots.class_colours(10**6)
    assert plots.class_colours(1000).shape == (1000, 4)


def test_paths_dpi_and_colormaps_are_checked_before_drawing(tmp_path):
    X, y = _data()
    for name in ("s.jpg", "s"):  # PNG bytes under another name misled viewers
        with pytest.raises(ValueError, match=r"must end in \.png or \.pdf or \.svg: this "):
            plot_samples(X, y, tmp_path / "sub" / name)
    assert not (tmp_path / "sub").exists()  # refused before its folder was made
    _assert_image(plot_samples(X, y, tmp_path / "s.PNG"), "PNG")
    # The format follows the suffix (PNG only before: a .pdf was refused).
    assert plot_samples(X, y, tmp_path / "s.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in plot_samples(X, y, tmp_path / "s.svg").read_bytes()[:1000]
    with pytest.raises(ValueError, match=r"path must end in \.gif"):
        animate_assignments(X, [y], tmp_path / "a.png")
    with pytest.raises(ValueError, match="dpi must be <= 1200, got 1000000"):
        plot_samples(X, y, tmp_path / "s.png", dpi=10**6)  # Agg fails past 2**16 pixels
    with pytest.raises(ValueError, match="cmap 'nope' is not a matplotlib colormap"):
        plot_density_comparison(None, _model_log_prob, BOUNDS, tmp_path / "d.png", cmap="nope")
    with pytest.raises(TypeError, match="cmap must be a colormap name or a Colormap, got int"):
        plot_image_grid(np.zeros((2, 4, 4)), tmp_path / "g.png", cmap=3)
    from matplotlib import colormaps

    out = plot_image_grid(np.zeros((2, 4, 4)), tmp_path / "g.png", cmap=colormaps["magma"])
    _assert_image(out, "PNG")


def test_animations_take_torch_tensors(tmp_path):
    X, y = _data()
    grids = torch.from_numpy(np.stack([density_grid(_true_log_prob, BOUNDS, 12)[2]] * 2))
    _assert_image(animate_density(grids, BOUNDS, tmp_path / "d.gif"), "GIF", n_frames=2)
    labels = torch.from_numpy(np.stack([y, y[::-1]]))
    _assert_image(animate_assignments(X, labels, tmp_path / "a.gif"), "GIF", n_frames=2)


def test_densities_beyond_float64_are_refused_by_plots_and_clipped_by_the_recorder():
    """A log density of 800 gave a blank panel (and an inf frame that failed the run's
    figures after model.pt); a 20000-point grid asked numpy for 3 GiB."""
    bounds = (-1.0, 1.0, -1.0, 1.0)

    def spike(points):
        return np.where(np.abs(points).sum(1) < 0.2, 800.0, -1.0)

    with pytest.raises(ValueError, match=r"too large to plot.*800"):
        plots.density_grid(spike, bounds, 20)
    recorder = reporting.DensityRecorder(bounds, resolution=20)
    recorder.add(spike, "diverging")
    assert np.isfinite(recorder.frames[0]).all()
    with pytest.raises(ValueError, match="resolution must be <= 4000"):
        plots.density_grid(spike, bounds, 20_000)
    with pytest.raises(ValueError, match="resolution must be <= 4000"):
        reporting.DensityRecorder(bounds, resolution=10**6)


def test_decision_regions_read_a_label_column_as_labels_and_refuse_nan(tmp_path, monkeypatch):
    """An (M, 1) column of labels was taken as one-class probabilities (one region)."""
    bounds = (-1.0, 1.0, -1.0, 1.0)
    palettes = []
    real = plots.class_colours
    monkeypatch.setattr(plots, "class_colours", lambda n: palettes.append(n) or real(n))
    plots.plot_decision_regions(
        lambda p: (p[:, :1] > 0).astype(int), bounds, tmp_path / "r.png", resolution=10
    )
    assert palettes == [2]  # two regions, labels 0 and 1
    plots.plot_decision_regions(  # K = 1: predict_proba's (M, 1) column of ones
        lambda p: np.ones((len(p), 1)), bounds, tmp_path / "k1.png", resolution=10
    )
    assert palettes[-1] == 1  # one region, component 0 (was read as label 1)
    with pytest.raises(ValueError, match="NaN probabilities"):
        plots.plot_decision_regions(
            lambda p: np.full((len(p), 2), np.nan), bounds, tmp_path / "n.png", resolution=10
        )


def test_training_curves_name_a_string_log_scale_and_ragged_rows(tmp_path):
    """log_scale="loss" was read as the keys 'l', 'o', 's'; None failed inside Python."""
    history = {"loss": [1.0, 0.5]}
    for log_scale in ("loss", None):
        with pytest.raises(TypeError, match="log_scale must be a sequence of history keys"):
            plots.plot_training_curves(history, tmp_path / "t.png", log_scale=log_scale)
    with pytest.raises(ValueError, match="rows of different lengths"):
        plots.plot_training_curves({"share": [[0.5, 0.5], [1.0]]}, tmp_path / "t.png")
    assert plots.plot_training_curves(history, tmp_path / "t.png", log_scale=["loss"]).exists()


def test_plots_name_non_numeric_input(tmp_path):
    """numpy's "could not convert string to float: np.str_('a')" named nothing."""
    bounds = (-1.0, 1.0, -1.0, 1.0)
    with pytest.raises(TypeError, match="log_prob's output must hold numbers"):
        plots.density_grid(lambda p: np.array(["a"] * len(p)), bounds, 4)
    with pytest.raises(ValueError, match="frames must be a non-empty sequence"):
        plots.animate_density("abc", bounds, tmp_path / "a.gif")
    with pytest.raises(TypeError, match="images must hold numbers"):
        plots.plot_component_images(np.array([["a"] * 4] * 2), [0, 1], tmp_path / "c.png")


def test_draw_functions_draw_on_the_users_axes_and_return_their_artists(tmp_path):
    fig = plots.new_figure(9.0, 3.0)
    density_ax, samples_ax, regions_ax = fig.subplots(1, 3)
    X, y = _data()

    image = plots.draw_density(density_ax, _true_log_prob, BOUNDS, resolution=21, vmax=0.5)
    assert image in density_ax.images and image.get_clim() == (0.0, 0.5)
    np.testing.assert_allclose(
        image.get_array(), density_grid(_true_log_prob, BOUNDS, resolution=21)[2]
    )
    assert image.get_extent() == list(BOUNDS)
    default_scale = plots.draw_density(density_ax, _true_log_prob, BOUNDS, resolution=21)
    assert default_scale.get_clim()[1] == pytest.approx(_TRUE.pdf([0.0, 0.0]))

    scatter = plots.draw_samples(samples_ax, X, y, bounds=BOUNDS, n_classes=3)
    assert scatter in samples_ax.collections
    np.testing.assert_array_equal(scatter.get_offsets(), X)
    grey = scatter.get_facecolors()[y == -1]
    assert np.allclose(grey, plots._UNLABELLED_COLOUR)  # unlabelled points are grey
    assert samples_ax.get_xlim() == BOUNDS[:2] and samples_ax.get_legend() is not None

    regions = plots.draw_decision_regions(
        regions_ax, lambda g: (g[:, 0] > 0).astype(int), BOUNDS, X=X, y=y, resolution=11
    )
    assert regions in regions_ax.images
    region_labels = np.asarray(regions.get_array())
    assert region_labels.shape == (11, 11)
    assert (region_labels[:, :5] == 0).all() and (region_labels[:, 6:] == 1).all()
    _assert_image(plots.save_figure(fig, tmp_path / "panels.png", 80), "PNG")


def test_probability_regions_fade_where_the_probabilities_are_unsure():
    def proba(g: np.ndarray) -> np.ndarray:  # sure at x1 = -3 and 3, undecided at 0
        right = np.clip(0.5 + g[:, 0] / 4, 0.0, 1.0)
        return np.column_stack([1 - right, right])

    ax = plots.new_figure(3.0, 3.0).subplots()
    image = plots.draw_decision_regions(ax, proba, BOUNDS, resolution=5)  # x1 = -3, -1.5, ...
    alpha = np.asarray(image.get_alpha())
    np.testing.assert_allclose(alpha[0], plots.REGION_ALPHA * np.array([1, 0.75, 0, 0.75, 1]))
    assert (alpha == alpha[0]).all()  # the same in every row: only x1 matters
    labels = plots.draw_decision_regions(ax, lambda g: (g[:, 0] > 0).astype(int), BOUNDS)
    assert labels.get_alpha() == plots.REGION_ALPHA  # labels carry no doubt to show
    scores = plots.draw_decision_regions(ax, lambda g: np.log(proba(g) + 1e-9), BOUNDS)
    assert (np.asarray(scores.get_alpha()) == plots.REGION_ALPHA).all()  # nor do scores


def test_draw_functions_refuse_what_is_not_an_axes():
    X, _ = _data()
    for call in (
        lambda ax: plots.draw_density(ax, _true_log_prob, BOUNDS),
        lambda ax: plots.draw_samples(ax, X),
        lambda ax: plots.draw_decision_regions(ax, lambda g: g[:, 0] > 0, BOUNDS),
    ):
        with pytest.raises(TypeError, match=r"ax must be a matplotlib Axes .* got Figure"):
            call(plots.new_figure(3.0, 3.0))  # the figure, not its axes
    ax = plots.new_figure(3.0, 3.0).add_subplot()
    with pytest.raises(ValueError, match=r"vmax must be finite and > 0, got 0\.0"):
        plots.draw_density(ax, _true_log_prob, BOUNDS, vmax=0.0)


def test_plots_check_their_data_before_the_path_and_make_no_folder_for_bad_data(tmp_path):
    with pytest.raises(ValueError, match="X has 3 features"):
        plot_samples(np.zeros((3, 3)), None, tmp_path / "sub" / "s.png")
    with pytest.raises(ValueError, match="bounds need xmin < xmax"):
        plot_decision_regions(lambda g: g[:, 0] > 0, (1, 0, 0, 1), tmp_path / "sub" / "r.png")
    assert not (tmp_path / "sub").exists()
    with pytest.raises(TypeError, match="predict must be callable"):
        plot_decision_regions("predict", BOUNDS, tmp_path / "r.jpg")  # not the path's error
    with pytest.raises(TypeError, match="X must hold numbers"):
        plot_samples(np.array([["a", "b"]]), None, tmp_path / "s.jpg")


def test_draw_functions_can_leave_the_users_legend_alone():
    X, y = _data()
    ax = plots.new_figure(4.0, 4.0).add_subplot()
    ax.plot([0, 1], [0, 1], label="mine")
    ax.legend()
    plots.draw_samples(ax, X, y, legend=False)
    plots.draw_decision_regions(ax, lambda g: g[:, 0] > 0, BOUNDS, X=X, y=y, legend=False)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mine"]
    plots.draw_samples(ax, X, y)  # the default: the labels' legend
    assert "unlabelled" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(TypeError, match="legend must be True or False, got 'no'"):
        plots.draw_samples(ax, X, y, legend="no")


def test_log_scale_shows_the_tails_on_one_colour_scale(tmp_path, monkeypatch):
    """On the linear scale the tails, where held-out points lose most nats, are one colour."""
    ranges: list[tuple[float, float]] = []
    original = matplotlib.axes.Axes.imshow

    def spy(self, *args, **kwargs):
        ranges.append((kwargs.get("vmin"), kwargs.get("vmax")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    bounds = (-1.0, 1.0, -1.0, 1.0)
    plots.plot_density_comparison(
        lambda p: np.full(len(p), 2.0), lambda p: np.where(p[:, 0] > 0, -np.inf, -30.0),
        bounds, tmp_path / "d.png", resolution=5, scale="log", log_range=4.0,
    )  # fmt: skip
    assert ranges[:2] == [(pytest.approx(-2.0), pytest.approx(2.0))] * 2  # the top 4 nats
    assert ranges[2] == (-2.0, 2.0)  # log p_model - log p_true, +-log_range / 2
    fig = plots.new_figure(3.0, 3.0)
    ax = fig.add_subplot()
    image = plots.draw_density(ax, lambda p: -np.square(p).sum(1), bounds, resolution=5,
                               scale="log")  # fmt: skip
    assert image.get_clim() == (pytest.approx(-10.0), pytest.approx(0.0))
    assert ax.get_aspect() == 1.0  # x1 and x2 are in the same units
    # Where the density is 0 (log p = -inf) the bottom colour, not a blank (imshow's NaN).
    zero = plots.draw_density(ax, lambda p: np.where(p[:, 0] > 0, -np.inf, 0.0), bounds,
                              resolution=4, scale="log")  # fmt: skip
    assert (zero.to_rgba(zero.get_array())[..., 3] == 1.0).all()
    # A strip of a window (features on other scales) is not squeezed to equal aspect.
    strip = plots.draw_density(ax, _true_log_prob, (-100.0, 100.0, -1.0, 1.0), resolution=4)
    assert strip.axes.get_aspect() == "auto"
    for bad, error in [({"scale": "symlog"}, ValueError), ({"log_range": 0.0}, ValueError),
                       ({"log_range": "10"}, TypeError)]:  # fmt: skip
        with pytest.raises(error, match=next(iter(bad))):
            plots.plot_density_comparison(None, _model_log_prob, BOUNDS, tmp_path / "e.png", **bad)


def test_animations_hold_the_final_frame(tmp_path):
    """The final model flashed by for one frame in a looping GIF."""
    out = animate_density([np.ones((4, 4)) * s for s in (1.0, 2.0, 3.0)], (0.0, 1.0, 0.0, 1.0),
                          tmp_path / "a.gif", fps=4)  # fmt: skip
    with Image.open(out) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert sum(durations) == pytest.approx((3 + 2 * 4) * 250, abs=30)  # 3 frames, 2 s held


def test_one_panel_figures_put_their_legend_beside_the_plane(tmp_path, monkeypatch):
    """Placed "best" inside, the legend hid samples in the tails."""
    figures = []
    real = plots.save_figure

    def spy(fig, path, dpi):
        figures.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", spy)
    X, y = _data()
    plot_samples(X, np.abs(y), tmp_path / "s.png")
    legend = figures[0].axes[0].get_legend()
    anchor = legend.get_bbox_to_anchor().transformed(figures[0].axes[0].transAxes.inverted())
    assert anchor.x0 > 1.0  # right of the axes


def test_the_log_density_figure_shows_where_the_model_is_too_high_or_low(tmp_path, monkeypatch):
    shown = []
    original = matplotlib.axes.Axes.imshow

    def spy(self, data, *args, **kwargs):
        shown.append(np.asarray(data, dtype=float))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    truth = lambda p: np.where(p[:, 0] < 0, 0.0, -50.0)  # noqa: E731 (negligible right)
    model = lambda p: np.where(p[:, 1] < 0, -1.0, 3.0)  # noqa: E731
    plots.plot_density_comparison(truth, model, (-1.0, 1.0, -1.0, 1.0), tmp_path / "d.png",
                                  resolution=4, scale="log", log_range=4.0)  # fmt: skip
    ratio = shown[2]
    assert np.isnan(ratio[:, 2:]).all()  # where the truth is negligible: blank
    np.testing.assert_array_equal(ratio[:2, :2], -1.0)  # too low by 1 nat
    np.testing.assert_array_equal(ratio[2:, :2], 2.0)  # too high by 3 nats, clipped at 2
    plots.plot_density_comparison(truth, model, (-1.0, 1.0, -1.0, 1.0), tmp_path / "e.png",
                                  resolution=4)  # fmt: skip
    assert len(shown) == 5  # the linear scale: no difference panel


def test_a_figure_note_marks_every_figure_saved_within_it(tmp_path, monkeypatch):
    """What each savefig call drew (GIF frames are savefig calls too), and the figure
    left as it was afterwards."""
    X, y = _data()
    seen: list[tuple[list[str], float]] = []
    savefig = Figure.savefig

    def record(fig, *args, **kwargs):
        engine = fig.get_layout_engine()
        bottom = engine.get()["rect"][1] if engine is not None else fig.subplotpars.bottom
        seen.append(([t.get_text() for t in fig.texts], bottom))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    with plots.figure_note("pinwheel · K=5 · seed 0"):
        plots.plot_samples(X, y, tmp_path / "s.png")
        with plots.figure_note("inner"):
            plots.plot_samples(X, y, tmp_path / "t.svg")
        plots.animate_density([np.ones((4, 4))] * 2, BOUNDS, tmp_path / "a.gif")
    plots.plot_samples(X, y, tmp_path / "u.png")
    notes = [texts for texts, _ in seen]
    assert notes[:2] == [["pinwheel · K=5 · seed 0"], ["inner"]] and notes[-1] == []
    assert all(n == ["pinwheel · K=5 · seed 0"] for n in notes[2:-1]) and len(notes) > 3
    assert all(bottom > 0 for _, bottom in seen[:-1]) and seen[-1][1] == 0  # a strip below

    fig = plots.new_figure(2.0, 2.0)  # narrow: the note wraps to the width
    fig.get_layout_engine().set(rect=(0.1, 0.1, 0.8, 0.8))  # the user's own layout
    plain = Figure(figsize=(6.0, 2.0))  # no layout engine: the subplots move up, then back
    plain.subplots()
    note = (r"$\frac{$ " + "a note, " * 10).strip()  # as maths, it would not parse
    with plots.figure_note(note):  # and no maths in it
        plots.save_figure(fig, tmp_path / "narrow.png", 50)
        plots.save_figure(plain, tmp_path / "plain.pdf", 50)
    narrow, on_plain = seen[-2][0][0], seen[-1][0][0]
    assert narrow.count("\n") >= 1 and narrow.replace("\n", " ") == note
    assert on_plain == note  # fits: one line
    assert seen[-2][1] > 0.1 and seen[-1][1] > plain.subplotpars.bottom  # room for 2 lines
    assert fig.get_layout_engine().get()["rect"] == (0.1, 0.1, 0.8, 0.8)
    assert fig.texts == [] and plain.texts == []
    with pytest.raises(TypeError, match="text must be a str"), plots.figure_note(3):  # type: ignore[arg-type]
        pass
