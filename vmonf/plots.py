"""Figures: density heatmaps, samples, decision regions, training curves, animations, images.

Two kinds of function:

* ``plot_*`` and ``animate_*`` draw on their own ``matplotlib.figure.Figure``
  rendered by the Agg canvas (no pyplot global state, safe in headless and threaded
  code), write the file at ``path`` (parent folders are created; a still figure as
  PNG, PDF or SVG by the path's suffix, an animation as GIF) and return it as a
  ``Path``;
* ``draw_*`` draw on an ``Axes`` you give them (e.g. one of ``plt.subplots()``) and
  return the artist they added, as ``ax.imshow`` and ``ax.scatter`` do; titles,
  colour bars and saving are yours.

Functions take plain callables and arrays, never estimator objects: pass
``m.score_samples`` or ``m.predict``.

``bounds`` is always ``(xmin, xmax, ymin, ymax)`` in data units. Density
callables map an (M, 2) array to (M,) log densities in nats (numpy or torch).
"""

from __future__ import annotations

import math
import numbers
import os
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import numpy as np
from matplotlib import colormaps
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vmonf._validation import (
    as_numpy,
    check_array,
    check_bool,
    check_choice,
    check_integer_labels,
    check_output_file,
    check_positive_float,
    check_positive_int,
    check_real_numbers,
    unnamed_points,
)
from vmonf.atomic import write_atomically, write_file_atomically

__all__ = [
    "MAX_DPI",
    "MAX_RESOLUTION",
    "animate_assignments",
    "animate_density",
    "check_cmap",
    "check_dpi",
    "class_colours",
    "density_grid",
    "draw_decision_regions",
    "draw_density",
    "draw_samples",
    "figure_file",
    "figure_note",
    "grid_points",
    "legend_beside",
    "log_density_grid",
    "new_figure",
    "one_panel_figure",
    "plane_aspect",
    "plot_component_images",
    "plot_decision_regions",
    "plot_density_comparison",
    "plot_image_grid",
    "plot_samples",
    "plot_training_curves",
    "save_figure",
    "save_png",
]

Bounds = tuple[float, float, float, float]
PathLike = str | os.PathLike[str]
LogProbFn = Callable[[np.ndarray], object]

_UNLABELLED_COLOUR = (0.6, 0.6, 0.6, 1.0)
MAX_CLASSES = 1000  # colours a plot tells apart (and palette rows it allocates)
MAX_EQUAL_ASPECT = 4.0  # a wider (or taller) x1-x2 window is drawn with aspect "auto"
MAX_HOLD_FRAMES = 20  # repeats of a GIF's last frame (each is rendered again)
FIGURE_NOTE_POINTS = 6.0  # type size of a figure_note
REGION_ALPHA = 0.35  # opacity of a decision region's tint where predict is sure
# A 5-inch figure is then 6000 pixels wide; Agg refuses images beyond 2**16 pixels a side.
MAX_DPI = 1200
# Grid points a side: 4000**2 float64 values are 128 MB per grid; more is no sharper.
MAX_RESOLUTION = 4000


# --------------------------------------------------------------------------- helpers


def _check_bounds(bounds: object) -> Bounds:
    """Return ``bounds`` as four finite floats with xmin < xmax and ymin < ymax."""
    try:
        values = [float(v) for v in bounds]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise TypeError(
            f"bounds must be a sequence of 4 numbers (xmin, xmax, ymin, ymax), got {bounds!r}"
        ) from None
    if len(values) != 4:
        raise ValueError(f"bounds must have 4 entries (xmin, xmax, ymin, ymax), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"bounds must be finite, got {values}")
    xmin, xmax, ymin, ymax = values
    if not xmin < xmax:
        raise ValueError(f"bounds need xmin < xmax, got xmin={xmin}, xmax={xmax}")
    if not ymin < ymax:
        raise ValueError(f"bounds need ymin < ymax, got ymin={ymin}, ymax={ymax}")
    return xmin, xmax, ymin, ymax


def _check_titles(titles: object, n: int, what: str) -> list[str] | None:
    """``titles`` as a list of ``n`` strings (one per ``what``), or None."""
    if titles is None:
        return None
    if isinstance(titles, str | bytes) or not isinstance(titles, Iterable):
        raise TypeError(f"titles must be a sequence of {n} strings, got {titles!r}")
    titles = list(titles)
    if len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries but there are {n} {what}")
    return [str(t) for t in titles]


def _check_finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _to_numpy(x: object) -> np.ndarray:
    return np.asarray(as_numpy(x))


def _numbers(x: object, name: str) -> np.ndarray:
    """``x`` as a float64 array; TypeError naming ``name`` for anything but numbers."""
    arr = _to_numpy(x)
    check_real_numbers(arr, name)
    return arr.astype(np.float64, copy=False)


def _check_points_2d(X: object, name: str = "X") -> np.ndarray:
    return check_array(X, name, n_features=2)


def _check_axes(ax: object) -> Axes:
    if not isinstance(ax, Axes):
        raise TypeError(
            f"ax must be a matplotlib Axes (e.g. from plt.subplots()), got {type(ax).__name__}"
        )
    return ax


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: The formats a still figure is written in, by the path's suffix.
STILL_FORMATS = (".png", ".pdf", ".svg")


def figure_file(path: object, suffixes: tuple[str, ...] = STILL_FORMATS) -> Path:
    """``path`` as a writable file ending in one of ``suffixes`` (the format written)."""
    if (
        isinstance(path, str | os.PathLike)
        and Path(path).suffix.lower() not in suffixes
        and not Path(path).is_dir()  # check_output_file says what is wrong with that
    ):
        kinds = " or ".join(suffix[1:].upper() for suffix in suffixes)
        raise ValueError(
            f"path must end in {' or '.join(suffixes)}: this function writes a {kinds} "
            f"image, got {str(path)!r}"
        )
    return check_output_file(path)


def _check_callable(fn: object, name: str, method: str) -> None:
    """``fn`` must be callable; an estimator is told which of its methods to pass."""
    if callable(fn):
        return
    hint = f" (pass its method, e.g. model.{method})" if hasattr(fn, method) else ""
    raise TypeError(f"{name} must be callable, got {type(fn).__name__}{hint}")


def check_dpi(dpi: object) -> int:
    """Dots per inch in [1, ``MAX_DPI``]."""
    return check_positive_int(dpi, "dpi", maximum=MAX_DPI)


def check_cmap(cmap: object) -> str | Colormap:
    """A matplotlib colormap or the name of a registered one."""
    if isinstance(cmap, Colormap):
        return cmap
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a colormap name or a Colormap, got {type(cmap).__name__}")
    if cmap not in colormaps:
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap (e.g. 'viridis', 'gray')")
    return cmap


# The note figure_note() puts on every figure saved within it.
_FIGURE_NOTE: ContextVar[str | None] = ContextVar("vmonf_figure_note", default=None)


@contextmanager
def figure_note(text: str) -> Iterator[None]:
    """Within the block, every figure vmonf saves (still images and GIFs) carries
    ``text`` in small grey type in a strip below its axes: the run that made it (data,
    model, seed), so that a figure passed on alone still says where it came from. The
    figure itself is left as it was. A note set here does not reach other threads."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    token = _FIGURE_NOTE.set(text)
    try:
        yield
    finally:
        _FIGURE_NOTE.reset(token)


@contextmanager
def _noted(fig: Figure) -> Iterator[None]:
    """The :func:`figure_note` in force on ``fig`` while the block saves it, wrapped to
    the figure's width, in a strip the axes leave free; then the figure as it was."""
    note = _FIGURE_NOTE.get()
    if not note:
        yield
        return
    engine = fig.get_layout_engine()
    constrained = engine if isinstance(engine, ConstrainedLayoutEngine) else None
    rect = (0.0, 0.0, 1.0, 1.0) if constrained is None else tuple(constrained.get()["rect"])
    bottom = fig.subplotpars.bottom
    text = fig.text(
        0.995, 0.0, note, ha="right", va="bottom", fontsize=FIGURE_NOTE_POINTS, color="0.45",
        parse_math=False,
    )  # fmt: skip
    try:
        width = text.get_window_extent().width / fig.dpi  # inches
        room = 0.98 * fig.get_figwidth()
        if width > room:  # wrapped at the characters that fit the width
            text.set_text(textwrap.fill(note, max(10, int(len(note) * room / width))))
        line = FIGURE_NOTE_POINTS * 1.2 / 72 / fig.get_figheight()  # in figure units
        strip = (text.get_text().count("\n") + 1.8) * line
        text.set_y(0.3 * line)
        if constrained is not None:  # new_figure's engine: the axes stay off the strip
            x0, y0, w, h = rect
            constrained.set(rect=(x0, max(y0, strip), w, h - max(0.0, strip - y0)))
        elif engine is None:
            fig.subplots_adjust(bottom=min(bottom + strip, fig.subplotpars.top - 0.05))
        yield
    finally:
        text.remove()
        if constrained is not None:
            constrained.set(rect=rect)
        elif engine is None:
            fig.subplots_adjust(bottom=bottom)


def save_figure(fig: Figure, path: Path, dpi: int) -> Path:
    """Write ``fig`` at ``path`` (checked by :func:`figure_file`) in the format its suffix
    names (PNG, PDF or SVG), with the :func:`figure_note` in force; returns it."""
    image_format = path.suffix.lower().removeprefix(".")
    with _noted(fig):
        return write_atomically(
            path, lambda handle: fig.savefig(handle, format=image_format, dpi=dpi)
        )


save_png = save_figure  # its name before PDF and SVG: kept for code that imports it


def class_colours(n_classes: int) -> np.ndarray:
    """(n_classes, 4) RGBA categorical colours (tab10, then tab20, then hsv); at most
    ``MAX_CLASSES`` (a label of 10**9 would otherwise ask for a 10**9-colour palette)."""
    n_classes = check_positive_int(n_classes, "n_classes", minimum=0, maximum=MAX_CLASSES)
    if n_classes <= 10:
        return colormaps["tab10"](np.arange(n_classes))
    if n_classes <= 20:
        return colormaps["tab20"](np.arange(n_classes))
    return colormaps["hsv"](np.linspace(0.0, 1.0, n_classes, endpoint=False))


def _label_colours(labels: np.ndarray, n_classes: int) -> np.ndarray:
    palette = class_colours(max(n_classes, 1))
    colours = np.tile(np.array(_UNLABELLED_COLOUR), (labels.shape[0], 1))
    known = labels >= 0
    colours[known] = palette[labels[known]]
    return colours


def _infer_n_classes(*label_arrays: np.ndarray | None) -> int:
    top = -1
    for arr in label_arrays:
        if arr is not None and arr.size:
            top = max(top, int(arr.max()))
    return top + 1


def grid_points(bounds: Bounds, resolution: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Regular grid over ``bounds``: ``(xx, yy)``, each (resolution, resolution).

    Row i runs along x at height ``yy[i, 0]`` (image convention with ``origin="lower"``);
    the (resolution**2, 2) query array is ``np.column_stack([xx.ravel(), yy.ravel()])``.
    """
    xmin, xmax, ymin, ymax = _check_bounds(bounds)
    resolution = check_positive_int(resolution, "resolution", minimum=2, maximum=MAX_RESOLUTION)
    xs = np.linspace(xmin, xmax, resolution)
    ys = np.linspace(ymin, ymax, resolution)
    xx, yy = np.meshgrid(xs, ys)
    return xx, yy


def density_grid(
    log_prob: LogProbFn, bounds: Bounds, resolution: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate ``exp(log_prob)`` on a grid: ``(xx, yy, density)``, each (resolution, resolution).

    ``log_prob`` maps (M, 2) float64 points to (M,) log densities (nats); ``-inf``
    gives density 0; NaN, and values whose density overflows float64 (log p > ~709: a
    degenerate density), raise ``ValueError``.
    """
    xx, yy, values = log_density_grid(log_prob, bounds, resolution)
    with np.errstate(over="ignore"):
        density = np.exp(values)
    if np.isinf(density).any():
        raise ValueError(
            f"log_prob is too large to plot at {int(np.isinf(density).sum())} grid point(s) "
            f"(max {values.max():.4g} nats: the density overflows float64, a degenerate fit)"
        )
    return xx, yy, density


def log_density_grid(
    log_prob: LogProbFn, bounds: Bounds, resolution: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate ``log_prob`` on a grid: ``(xx, yy, log density)`` (nats), each (resolution,
    resolution); NaN raises ``ValueError``, ``-inf`` (density 0) stays."""
    _check_callable(log_prob, "log_prob", "score_samples")
    xx, yy = grid_points(bounds, resolution)
    points = np.column_stack([xx.ravel(), yy.ravel()])
    with unnamed_points():
        values = _numbers(log_prob(points), "log_prob's output")
    values = values.reshape(-1) if values.ndim == 2 and 1 in values.shape else values
    if values.shape != (points.shape[0],):
        raise ValueError(
            f"log_prob must return shape ({points.shape[0]},) for {points.shape[0]} points, "
            f"got {values.shape}"
        )
    if np.isnan(values).any():
        raise ValueError(f"log_prob returned NaN at {int(np.isnan(values).sum())} grid point(s)")
    if np.isposinf(values).any():
        n_inf = int(np.isposinf(values).sum())
        raise ValueError(f"log_prob returned +inf at {n_inf} grid point(s): a degenerate fit")
    return xx, yy, values.reshape(xx.shape)


# --------------------------------------------------------------------------- static figures


def _density_image(
    ax: Axes,
    density: np.ndarray,
    bounds: Bounds,
    cmap: str | Colormap,
    vmax: float,
    vmin: float = 0.0,
) -> AxesImage:
    """Draw a (H, W) grid (row 0 at ``ymin``) over ``bounds`` on [``vmin``, ``vmax``]
    (log densities below ``vmin``, -inf included, take its colour: imshow would leave
    -inf blank)."""
    return ax.imshow(
        np.maximum(density, vmin), origin="lower", extent=bounds, cmap=cmap, vmin=vmin,
        vmax=vmax, aspect=plane_aspect(bounds),
    )  # fmt: skip


def plane_aspect(bounds: Bounds) -> Literal["equal", "auto"]:
    """``"equal"`` for an x1-x2 window (x1 and x2 in the same units), unless it is more
    than ``MAX_EQUAL_ASPECT`` times wider than tall or taller than wide (features on
    other scales: a strip), then ``"auto"``."""
    xmin, xmax, ymin, ymax = bounds
    ratio = (xmax - xmin) / (ymax - ymin)
    return "equal" if 1 / MAX_EQUAL_ASPECT <= ratio <= MAX_EQUAL_ASPECT else "auto"


def _colour_top(densities: Iterable[np.ndarray]) -> float:
    """The top of a shared colour scale: the largest density (1 when all are 0)."""
    top = max(float(d.max()) for d in densities)
    return top if top > 0 else 1.0


SCALES = ("linear", "log")
_SCALE_LABELS = {"linear": "density", "log": "log density (nats)"}


def _density_values(log_prob: LogProbFn, bounds: Bounds, resolution: int, scale: str) -> np.ndarray:
    """The grid a density panel shows: densities, or log densities (nats) for ``"log"``."""
    if scale == "log":
        return log_density_grid(log_prob, bounds, resolution)[2]
    return density_grid(log_prob, bounds, resolution)[2]


def _colour_range(
    grids: Sequence[np.ndarray], scale: str, vmax: float | None, log_range: float
) -> tuple[float, float]:
    """(vmin, vmax) of a colour scale shared by ``grids``: [0, largest density], or the
    ``log_range`` nats below the largest log density."""
    if scale == "linear":
        return 0.0, _colour_top(grids) if vmax is None else vmax
    if vmax is None:
        finite = [g[np.isfinite(g)] for g in grids]
        vmax = max((float(f.max()) for f in finite if f.size), default=0.0)
    return vmax - log_range, vmax


def draw_density(
    ax: Axes,
    log_prob: LogProbFn,
    bounds: Bounds,
    *,
    resolution: int = 200,
    cmap: str | Colormap = "viridis",
    vmax: float | None = None,
    scale: str = "linear",
    log_range: float = 10.0,
) -> AxesImage:
    """Heatmap of ``exp(log_prob)`` over ``bounds`` on ``ax``; returns the image.

    The colour scale is [0, ``vmax``] (default: the largest density on the grid); pass
    one ``vmax`` to compare panels, and the image to ``fig.colorbar`` for a colour bar.
    ``scale="log"`` shows log p (nats) from ``vmax`` (default: its largest value) down
    to ``log_range`` nats below it: the tails, where a linear scale shows nothing.
    """
    ax = _check_axes(ax)
    bounds = _check_bounds(bounds)
    cmap = check_cmap(cmap)
    scale = check_choice(scale, "scale", SCALES)
    span = check_positive_float(log_range, "log_range")
    if vmax is not None:
        top: float | None = (
            check_positive_float(vmax, "vmax") if scale == "linear" else _check_finite(vmax, "vmax")
        )
    else:
        top = None
    values = _density_values(log_prob, bounds, resolution, scale)
    low, high = _colour_range([values], scale, top, span)
    image = _density_image(ax, values, bounds, cmap, high, low)
    _plane_axes(ax, None)
    return image


def plot_density_comparison(
    true_log_prob: LogProbFn | None,
    model_log_prob: LogProbFn,
    bounds: Bounds,
    path: PathLike,
    *,
    resolution: int = 200,
    titles: tuple[str, str] = ("true density", "model density"),
    cmap: str | Colormap = "viridis",
    dpi: int = 100,
    scale: str = "linear",
    log_range: float = 10.0,
) -> Path:
    """Heatmaps of the true and model densities side by side, on one colour scale.

    With ``true_log_prob=None`` only the model panel is drawn (titled ``titles[1]``).
    ``scale`` and ``log_range`` as in :func:`draw_density`; on the log scale, with the
    truth, a third panel shows log p_model - log p_true (nats, red: the model too high,
    blue: too low, within +-``log_range`` / 2) where the truth is shown (no more than
    ``log_range`` nats below the shared scale's top; blank elsewhere).
    """
    for name, fn in (("true_log_prob", true_log_prob), ("model_log_prob", model_log_prob)):
        if not (fn is None and name == "true_log_prob"):
            _check_callable(fn, name, "score_samples")
    bounds = _check_bounds(bounds)
    names = _check_titles(titles, 2, "panels (true, model)") or ["true density", "model density"]
    dpi = check_dpi(dpi)
    cmap = check_cmap(cmap)
    scale = check_choice(scale, "scale", SCALES)
    span = check_positive_float(log_range, "log_range")
    out = figure_file(path)
    panels: list[tuple[str, np.ndarray]] = []
    if true_log_prob is not None:
        panels.append((names[0], _density_values(true_log_prob, bounds, resolution, scale)))
    panels.append((names[1], _density_values(model_log_prob, bounds, resolution, scale)))
    low, high = _colour_range([d for _, d in panels], scale, None, span)
    difference = scale == "log" and len(panels) == 2
    fig = new_figure(4.2 * (len(panels) + difference) + 0.8 * (1 + difference), 4.0)
    axes = fig.subplots(1, len(panels) + difference, squeeze=False)[0]
    image = None
    for ax, (title, dens) in zip(axes[: len(panels)], panels, strict=True):
        image = _density_image(ax, dens, bounds, cmap, high, low)
        _plane_axes(ax, None)
        ax.set_title(title)
    for ax in axes[1:]:
        ax.set_ylabel("")
    assert image is not None  # there is always the model's panel
    fig.colorbar(image, ax=list(axes[: len(panels)]), label=_SCALE_LABELS[scale])
    if difference:
        _draw_log_ratio(axes[-1], panels[1][1], panels[0][1], low, span / 2, bounds)
    return save_figure(fig, out, dpi)


def _draw_log_ratio(
    ax: Axes, model: np.ndarray, truth: np.ndarray, shown_from: float, limit: float, bounds: Bounds
) -> None:
    """log p_model - log p_true (H, W grids, nats) where log p_true >= ``shown_from``, on
    a diverging scale of +-``limit`` nats, with its own colour bar."""
    with np.errstate(invalid="ignore"):  # -inf - -inf where both vanish: masked anyway
        ratio = np.where(truth >= shown_from, model - truth, np.nan)
    image = ax.imshow(
        np.clip(ratio, -limit, limit), origin="lower", extent=bounds, cmap="RdBu_r",
        vmin=-limit, vmax=limit, aspect=plane_aspect(bounds),
    )  # fmt: skip
    _plane_axes(ax, None)
    ax.set_ylabel("")
    ax.set_title("log p_model - log p_true")
    ax.figure.colorbar(image, ax=ax, label="nats (model too high: red)")


def _plane_axes(ax: Axes, bounds: Bounds | None) -> None:
    """Label a 2-D plot's axes and, when given, fix its window to ``bounds`` (aspect as
    :func:`plane_aspect`)."""
    if bounds is not None:
        xmin, xmax, ymin, ymax = _check_bounds(bounds)
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
        ax.set_aspect(plane_aspect((xmin, xmax, ymin, ymax)))
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


class _Scatter(NamedTuple):
    """Checked arguments of :func:`draw_samples`."""

    points: np.ndarray  # (N, 2)
    labels: np.ndarray | None  # (N,)
    bounds: Bounds | None
    n_classes: int
    marker_size: float


def _check_scatter(
    X: object, labels: object, bounds: object, n_classes: int | None, marker_size: object
) -> _Scatter:
    pts = _check_points_2d(X)
    lab = None if labels is None else check_integer_labels(labels, "labels", pts.shape[0])
    return _Scatter(
        pts,
        lab,
        None if bounds is None else _check_bounds(bounds),
        _resolve_n_classes(n_classes, lab),
        check_positive_float(marker_size, "marker_size"),
    )


def _draw_scatter(ax: Axes, scatter: _Scatter, legend: bool) -> PathCollection:
    pts, lab = scatter.points, scatter.labels
    if lab is None:
        drawn = ax.scatter(pts[:, 0], pts[:, 1], s=scatter.marker_size, color="C0", linewidths=0)
    else:
        colours = _label_colours(lab, scatter.n_classes)
        drawn = ax.scatter(pts[:, 0], pts[:, 1], s=scatter.marker_size, c=colours, linewidths=0)
        if legend:
            _add_legend(ax, lab, scatter.n_classes)
    _plane_axes(ax, scatter.bounds)
    return drawn


def draw_samples(
    ax: Axes,
    X: object,
    labels: object | None = None,
    *,
    bounds: Bounds | None = None,
    n_classes: int | None = None,
    marker_size: float = 4.0,
    legend: bool = True,
) -> PathCollection:
    """Scatter of 2-D points ``X`` (N, 2) on ``ax``, coloured by integer ``labels`` (N,);
    returns the scatter.

    ``labels=None`` draws one colour; label -1 (unlabelled) is grey. ``n_classes``
    fixes the palette so colours match other figures (default: largest label + 1).
    ``bounds`` fixes the window (default: matplotlib's). ``legend`` (of the labels)
    replaces a legend ``ax`` already has: pass False to keep yours.
    """
    ax = _check_axes(ax)
    scatter = _check_scatter(X, labels, bounds, n_classes, marker_size)
    return _draw_scatter(ax, scatter, check_bool(legend, "legend"))


def plot_samples(
    X: object,
    labels: object | None,
    path: PathLike,
    *,
    title: str | None = None,
    bounds: Bounds | None = None,
    n_classes: int | None = None,
    marker_size: float = 4.0,
    dpi: int = 100,
) -> Path:
    """:func:`draw_samples` in a figure of its own, written at ``path``."""
    scatter = _check_scatter(X, labels, bounds, n_classes, marker_size)
    return one_panel_figure(path, lambda ax: _draw_scatter(ax, scatter, True), title, dpi)


def one_panel_figure(
    path: PathLike, draw: Callable[[Axes], object], title: str | None, dpi: int
) -> Path:
    """A 6 x 4.6 inch figure of one ``draw(ax)`` panel, titled, its legend beside the
    panel (:func:`legend_beside`), written at ``path`` (checked, and its folder made,
    before drawing)."""
    out = figure_file(path)
    dpi = check_dpi(dpi)
    fig = new_figure(6.0, 4.6)
    ax = fig.add_subplot()
    draw(ax)
    legend_beside(ax)
    if title is not None:
        ax.set_title(title)
    return save_figure(fig, out, dpi)


def legend_beside(ax: Axes) -> None:
    """Move ``ax``'s legend, if any, to the right of the panel: inside, it hid points."""
    legend = ax.get_legend()
    if legend is not None:
        legend.set_loc("upper left")
        legend.set_bbox_to_anchor((1.02, 1.0))


def _resolve_n_classes(n_classes: int | None, *labels: np.ndarray | None) -> int:
    inferred = _infer_n_classes(*labels)
    if inferred > MAX_CLASSES:
        raise ValueError(
            f"plots colour labels 0..{MAX_CLASSES - 1}, got a label {inferred - 1}: "
            "renumber the labels (e.g. np.unique(labels, return_inverse=True)[1])"
        )
    if n_classes is None:
        return max(inferred, 1)
    n_classes = check_positive_int(n_classes, "n_classes", maximum=MAX_CLASSES)
    if n_classes < inferred:
        raise ValueError(f"n_classes={n_classes} but a label {inferred - 1} is present")
    return n_classes


def _add_legend(ax: Axes, labels: np.ndarray, n_classes: int) -> None:
    palette = class_colours(n_classes)
    present = sorted(set(labels.tolist()))
    handles = []
    for value in present:
        colour = _UNLABELLED_COLOUR if value < 0 else palette[value]
        name = "unlabelled" if value < 0 else str(value)
        handles.append(
            Line2D([], [], marker="o", linestyle="", color=colour, markersize=6, label=name)
        )
    if len(handles) <= 25:
        ax.legend(handles=handles, title="component", loc="best", fontsize="small")


class _Regions(NamedTuple):
    """Checked arguments of :func:`draw_decision_regions` (the grid is predicted when drawn)."""

    predict: Callable[[np.ndarray], object]
    bounds: Bounds
    points: np.ndarray | None  # (N, 2)
    labels: np.ndarray | None  # (N,)
    n_classes: int | None
    resolution: int
    marker_size: float


def _check_regions(
    predict: object,
    bounds: object,
    X: object,
    y: object,
    n_classes: int | None,
    resolution: object,
    marker_size: object,
) -> _Regions:
    _check_callable(predict, "predict", "predict_proba")
    checked_bounds = _check_bounds(bounds)
    marker = check_positive_float(marker_size, "marker_size")
    pts = None if X is None else _check_points_2d(X)
    if y is not None and pts is None:
        raise ValueError("y was given without X")
    lab = None if y is None or pts is None else check_integer_labels(y, "y", pts.shape[0])
    side = check_positive_int(resolution, "resolution", minimum=2, maximum=MAX_RESOLUTION)
    return _Regions(
        cast(Callable[[np.ndarray], object], predict),
        checked_bounds,
        pts,
        lab,
        n_classes,
        side,
        marker,
    )


def _certainty(probabilities: np.ndarray) -> np.ndarray:
    """How sure (M, K) probabilities are of their argmax, (M,) in [0, 1]: 0 where the
    largest is 1/K (no winner), 1 where it is 1; 1 everywhere for scores that are not
    probabilities (rows in [0, 1] summing to 1), e.g. log-probabilities."""
    k = probabilities.shape[1]
    in_range = bool(((probabilities >= 0) & (probabilities <= 1)).all())
    if k == 1 or not (in_range and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)):
        return np.ones(probabilities.shape[0])
    top = probabilities.max(axis=1)
    return np.clip((top - 1.0 / k) / (1.0 - 1.0 / k), 0.0, 1.0)


def _draw_regions(ax: Axes, regions: _Regions, legend: bool) -> AxesImage:
    xx, yy = grid_points(regions.bounds, regions.resolution)
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    with unnamed_points():
        raw = _to_numpy(regions.predict(grid))
    label_column = raw.ndim == 2 and raw.shape[1:] == (1,) and raw.dtype.kind in "iub"
    if raw.ndim == 2 and raw.shape[0] == grid.shape[0] and not label_column:
        probabilities = raw.astype(np.float64)
        if np.isnan(probabilities).any():
            raise ValueError("predict returned NaN probabilities on the grid")
        region = np.argmax(probabilities, axis=1)
        n_from_proba = raw.shape[1]
        opacity: float | np.ndarray = REGION_ALPHA * _certainty(probabilities).reshape(xx.shape)
    else:  # labels, also as an (M, 1) integer column
        raw = raw.reshape(-1) if label_column else raw
        region = check_integer_labels(raw, "predict(...) output", grid.shape[0])
        n_from_proba = 0
        opacity = REGION_ALPHA
    if (region < 0).any():
        raise ValueError("predict returned negative labels on the grid")
    pts, lab = regions.points, regions.labels
    n_classes = max(_resolve_n_classes(regions.n_classes, region, lab), n_from_proba)
    palette = class_colours(n_classes)
    image = ax.imshow(
        region.reshape(xx.shape),
        origin="lower",
        extent=regions.bounds,
        cmap=ListedColormap(palette[:, :3]),
        norm=BoundaryNorm(np.arange(n_classes + 1) - 0.5, n_classes),
        alpha=opacity,
        aspect=plane_aspect(regions.bounds),
        interpolation="nearest",
    )
    if pts is not None:
        size = regions.marker_size
        if lab is None:
            ax.scatter(pts[:, 0], pts[:, 1], s=size, color="k", linewidths=0)
        else:
            colours = _label_colours(lab, n_classes)
            ax.scatter(pts[:, 0], pts[:, 1], s=size, c=colours, edgecolors="k", linewidths=0.2)
            if legend:
                _add_legend(ax, lab, n_classes)
    _plane_axes(ax, regions.bounds)
    return image


def draw_decision_regions(
    ax: Axes,
    predict: Callable[[np.ndarray], object],
    bounds: Bounds,
    *,
    X: object | None = None,
    y: object | None = None,
    n_classes: int | None = None,
    resolution: int = 200,
    marker_size: float = 6.0,
    legend: bool = True,
) -> AxesImage:
    """Filled regions of the predicted component over ``bounds`` on ``ax``, data points
    on top; returns the regions' image.

    ``predict`` maps (M, 2) points to (M,) (or an (M, 1) integer column of) labels, or
    to (M, K) probabilities (e.g. q(c|x)) or scores, whose argmax is taken; for
    probabilities the tint fades to white where they are unsure, in proportion to
    (max - 1/K) / (1 - 1/K). Points ``X`` (N, 2) are
    coloured by ``y`` (N,) when given (-1 = unlabelled, grey), black otherwise;
    ``legend`` as in :func:`draw_samples`.
    """
    ax = _check_axes(ax)
    regions = _check_regions(predict, bounds, X, y, n_classes, resolution, marker_size)
    return _draw_regions(ax, regions, check_bool(legend, "legend"))


def plot_decision_regions(
    predict: Callable[[np.ndarray], object],
    bounds: Bounds,
    path: PathLike,
    *,
    X: object | None = None,
    y: object | None = None,
    n_classes: int | None = None,
    resolution: int = 200,
    title: str | None = None,
    marker_size: float = 6.0,
    dpi: int = 100,
) -> Path:
    """:func:`draw_decision_regions` in a figure of its own, written at ``path``."""
    regions = _check_regions(predict, bounds, X, y, n_classes, resolution, marker_size)
    return one_panel_figure(path, lambda ax: _draw_regions(ax, regions, True), title, dpi)


def plot_training_curves(
    history: Mapping[str, Sequence[float]],
    path: PathLike,
    *,
    log_scale: Sequence[str] = (),
    units: Mapping[str, str] | None = None,
    title: str | None = None,
    x_label: str = "epoch",
    dpi: int = 100,
) -> Path:
    """One panel per key of ``history`` (e.g. loss, val_loss, temperature); x = 1..n in
    whole steps of ``x_label`` (``"round"`` for a competitive fit's ``history_``).

    Each value is a sequence of numbers, or of rows (n, K) drawn as K lines (e.g. a
    competitive fit's per-component ``share``); NaN/inf are drawn as gaps. Keys named
    in ``log_scale`` get a logarithmic y axis; ``units`` labels a key's y axis
    (e.g. ``{"loss": "nats", "time": "s"}``).
    """
    if not isinstance(history, Mapping):
        raise TypeError(
            f"history must be a mapping of name -> values, got {type(history).__name__}"
        )
    if len(history) == 0:
        raise ValueError("history is empty")
    series: list[tuple[str, np.ndarray]] = []
    for key, values in history.items():
        try:
            arr = _to_numpy(values)
        except ValueError:  # ragged rows
            raise ValueError(f"history[{key!r}] has rows of different lengths") from None
        if arr.ndim not in (1, 2) or 0 in arr.shape:
            raise ValueError(
                f"history[{key!r}] must be a non-empty sequence of numbers or of rows, got "
                f"shape {arr.shape}"
            )
        check_real_numbers(arr, f"history[{key!r}]")
        series.append((str(key), arr.astype(np.float64)))
    if isinstance(log_scale, str) or not isinstance(log_scale, Sequence | set | frozenset):
        raise TypeError(
            f"log_scale must be a sequence of history keys (e.g. ({log_scale!r},)), got "
            f"{type(log_scale).__name__}"
        )
    if units is not None and not isinstance(units, Mapping):
        raise TypeError(f"units must map history keys to labels, got {type(units).__name__}")
    units = {} if units is None else dict(units)
    for option, keys in (("log_scale", log_scale), ("units", units)):
        unknown = set(keys) - set(history)
        if unknown:
            raise ValueError(f"{option} names keys not in history: {sorted(unknown)}")
    if not isinstance(x_label, str):
        raise TypeError(f"x_label must be a str, got {type(x_label).__name__}")
    out = figure_file(path)
    dpi = check_dpi(dpi)
    # "val_loss" is drawn on the "loss" panel, so the two can be compared.
    panels: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, arr in series:
        panel = "loss" if key == "val_loss" and "loss" in history else key
        columns = (
            [(key, arr)] if arr.ndim == 1 else [(f"{key} {j}", c) for j, c in enumerate(arr.T)]
        )
        panels.setdefault(panel, []).extend(columns)
    n = len(panels)
    n_cols = min(n, 3)
    n_rows = math.ceil(n / n_cols)
    fig = new_figure(3.6 * n_cols, 2.8 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (name, curves) in zip(axes, panels.items(), strict=False):
        for key, arr in curves:
            epochs = np.arange(1, arr.shape[0] + 1)
            ax.plot(epochs, arr, marker="." if arr.shape[0] <= 30 else None, label=key)
        if len(curves) > 1:
            ax.legend(fontsize="small")
        ax.set_title(name + _clip_to_bulk(ax, np.concatenate([a for _, a in curves])))
        ax.set_xlabel(x_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 1.5
        if max(a.shape[0] for _, a in curves) == 1:  # one integer: the locator gives 0.1s
            ax.set_xlim(0.5, 1.5)
            ax.set_xticks([1])
        if name in units:
            ax.set_ylabel(units[name])
        if name in log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title is not None:
        fig.suptitle(title)
    return save_figure(fig, out, dpi)


def _clip_to_bulk(ax: Axes, values: np.ndarray) -> str:
    """Clip the y axis to the bulk of ``values`` (a first epoch after pre-training
    can be orders of magnitude higher); returns a title note on what was clipped."""
    finite = values[np.isfinite(values)]
    if finite.size < 3:
        return ""
    low, p90, high = finite.min(), np.percentile(finite, 90), finite.max()
    limit = p90 + (p90 - low)
    if high <= limit:
        return ""
    pad = 0.05 * max(limit - low, 1e-9)
    ax.set_ylim(low - pad, limit + pad)
    return f" ({int((finite > limit).sum())} above the axis, up to {high:.3g})"


def plot_image_grid(
    images: object,
    path: PathLike,
    *,
    n_cols: int | None = None,
    cmap: str | Colormap = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
    padding: int = 1,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    dpi: int = 100,
) -> Path:
    """Tile ``images`` (N, H, W) grey or (N, H, W, 3) RGB into one mosaic image.

    ``n_cols`` defaults to ceil(sqrt(N)); the colour range defaults to the data range
    (RGB arrays are clipped to it and rescaled to [0, 1]). ``row_labels`` (one per
    row of the mosaic) are written left of the rows.
    """
    arr = _to_numpy(images)
    check_real_numbers(arr, "images")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, 3), got {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"images is empty (shape {arr.shape})")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("images contains NaN or infinite values")
    n = arr.shape[0]
    n_cols = math.ceil(math.sqrt(n)) if n_cols is None else check_positive_int(n_cols, "n_cols")
    n_cols = min(n_cols, n)
    n_rows = math.ceil(n / n_cols)
    padding = check_positive_int(padding, "padding", minimum=0)
    out = figure_file(path)
    dpi = check_dpi(dpi)
    cmap = check_cmap(cmap)
    lo = float(arr.min()) if vmin is None else _check_finite(vmin, "vmin")
    hi = float(arr.max()) if vmax is None else _check_finite(vmax, "vmax")
    if hi <= lo:
        if vmin is not None and vmax is not None:
            raise ValueError(f"vmin must be below vmax, got vmin={lo}, vmax={hi}")
        hi = lo + 1.0  # constant images
    h, w = arr.shape[1], arr.shape[2]
    tile_h, tile_w = h + padding, w + padding
    mosaic_shape = (n_rows * tile_h + padding, n_cols * tile_w + padding, *arr.shape[3:])
    mosaic = np.full(mosaic_shape, hi if arr.ndim == 3 else 1.0)
    for i in range(n):
        r, c = divmod(i, n_cols)
        y0, x0 = padding + r * tile_h, padding + c * tile_w
        img = arr[i] if arr.ndim == 3 else np.clip((arr[i] - lo) / (hi - lo), 0.0, 1.0)
        mosaic[y0 : y0 + h, x0 : x0 + w] = img
    scale = max(1.0, 512.0 / max(mosaic.shape[0], mosaic.shape[1]))
    fig = new_figure(
        mosaic.shape[1] * scale / dpi + 0.2, mosaic.shape[0] * scale / dpi + (0.5 if title else 0.2)
    )
    ax = fig.add_subplot()
    if arr.ndim == 3:
        ax.imshow(mosaic, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    if row_labels is None:
        ax.set_axis_off()
    else:
        labels = [str(label) for label in row_labels]
        if len(labels) != n_rows:
            raise ValueError(f"row_labels has {len(labels)} entries for {n_rows} rows")
        ax.set_xticks([])
        ax.set_yticks([padding + r * tile_h + h / 2 - 0.5 for r in range(n_rows)], labels)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    if title is not None:
        ax.set_title(title)
    return save_figure(fig, out, dpi)


def plot_component_images(
    images: object,
    components: object,
    path: PathLike,
    *,
    n_per_component: int = 10,
    n_components: int | None = None,
    title: str | None = None,
    **grid_options: Any,
) -> Path:
    """One row per mixture component: up to ``n_per_component`` of its images.

    ``images`` (N, H, W) (or RGB) and ``components`` (N,) non-negative integer labels
    (the component that generated each sample, or the cluster of each real image).
    Rows are labelled ``k (count)``; missing tiles stay blank (zero). Other keyword
    options go to :func:`plot_image_grid`.
    """
    arr = _numbers(images, "images")
    labels = check_integer_labels(
        components, "components", arr.shape[0] if arr.ndim else 0, rows_of="images"
    )
    if (labels < 0).any():
        raise ValueError("components must be non-negative")
    n_per_component = check_positive_int(n_per_component, "n_per_component")
    k = _resolve_n_classes(n_components, labels)
    counts = np.bincount(labels, minlength=k)
    tiles = np.zeros((k * n_per_component, *arr.shape[1:]), dtype=np.float64)
    for c in range(k):
        chosen = arr[labels == c][:n_per_component]
        tiles[c * n_per_component : c * n_per_component + chosen.shape[0]] = chosen
    return plot_image_grid(
        tiles,
        path,
        n_cols=n_per_component,
        title=title,
        row_labels=[f"{c} ({counts[c]})" for c in range(k)],
        **grid_options,
    )


# --------------------------------------------------------------------------- animations


def _write_gif(
    fig: Figure,
    update: Callable[[int], Iterable[Artist]],
    n_frames: int,
    path: Path,
    fps: int,
    dpi: int,
) -> Path:
    # The last frame (the final model) held for 2 s: a looping GIF otherwise flashes it.
    order = [*range(n_frames), *[n_frames - 1] * min(2 * fps, MAX_HOLD_FRAMES)]
    anim = FuncAnimation(fig, update, frames=order, blit=False, repeat=False)
    with _noted(fig):
        write_file_atomically(
            path, lambda tmp: anim.save(str(tmp), writer=PillowWriter(fps=fps), dpi=dpi)
        )
    return path


def animate_density(
    frames: Sequence[object],
    bounds: Bounds,
    path: PathLike,
    *,
    fps: int = 5,
    titles: Sequence[str] | None = None,
    cmap: str | Colormap = "viridis",
    vmax: float | None = None,
    dpi: int = 80,
) -> Path:
    """Animated GIF of density grids ``frames``, each (H, W) (e.g. from :func:`density_grid`).

    Row 0 of a grid is the bottom edge ``ymin`` (as :func:`density_grid` returns it).
    All frames share one colour scale, [0, ``vmax``] (default: the largest value). The
    last frame is held about 2 s (at most ``MAX_HOLD_FRAMES`` more frames).
    """
    stack: object = frames
    if hasattr(stack, "detach"):  # a torch tensor of frames
        stack = _to_numpy(stack)
    if isinstance(stack, np.ndarray) and stack.ndim == 3:
        stack = list(stack)
    if isinstance(stack, str) or not isinstance(stack, Sequence) or len(stack) == 0:
        raise ValueError("frames must be a non-empty sequence of (H, W) density grids")
    grids = [_numbers(f, f"frames[{i}]") for i, f in enumerate(stack)]
    shape = grids[0].shape
    for i, g in enumerate(grids):
        if g.ndim != 2 or g.shape != shape or 0 in g.shape:
            raise ValueError(
                f"frames[{i}] has shape {g.shape}; every frame must be 2-D of shape {shape}"
            )
        if not np.isfinite(g).all() or (g < 0).any():
            raise ValueError(f"frames[{i}] must hold finite, non-negative densities")
    bounds = _check_bounds(bounds)
    out = figure_file(path, (".gif",))
    fps = check_positive_int(fps, "fps")
    dpi = check_dpi(dpi)
    cmap = check_cmap(cmap)
    names = _check_titles(titles, len(grids), "frames")
    top = _colour_top(grids) if vmax is None else check_positive_float(vmax, "vmax")
    fig = new_figure(5.0, 4.2)
    ax = fig.add_subplot()
    image = _density_image(ax, grids[0], bounds, cmap, top)
    _plane_axes(ax, None)
    fig.colorbar(image, ax=ax, label="density")
    heading = ax.set_title(names[0] if names else "frame 1")

    def update(i: int) -> tuple[Artist, ...]:
        image.set_data(grids[i])
        heading.set_text(names[i] if names else f"frame {i + 1}")
        return (image, heading)

    return _write_gif(fig, update, len(grids), out, fps, dpi)


def animate_assignments(
    X: object,
    label_frames: Sequence[object],
    path: PathLike,
    *,
    fps: int = 5,
    titles: Sequence[str] | None = None,
    n_classes: int | None = None,
    bounds: Bounds | None = None,
    marker_size: float = 4.0,
    dpi: int = 80,
) -> Path:
    """Animated GIF of fixed points ``X`` (N, 2) recoloured by each (N,) label array in turn.

    Use it to watch component assignments evolve during training (-1 = grey).
    """
    pts = _check_points_2d(X)
    stack: object = label_frames
    if hasattr(stack, "detach"):  # a torch tensor of label arrays
        stack = _to_numpy(stack)
    if isinstance(stack, np.ndarray) and stack.ndim == 2:
        stack = list(stack)
    if not isinstance(stack, Sequence) or len(stack) == 0:
        raise ValueError("label_frames must be a non-empty sequence of (N,) label arrays")
    labs = [
        check_integer_labels(f, f"label_frames[{i}]", pts.shape[0]) for i, f in enumerate(stack)
    ]
    out = figure_file(path, (".gif",))
    fps = check_positive_int(fps, "fps")
    dpi = check_dpi(dpi)
    marker_size = check_positive_float(marker_size, "marker_size")
    names = _check_titles(titles, len(labs), "frames")
    n_classes = _resolve_n_classes(n_classes, *labs)
    fig = new_figure(5.0, 4.6)
    ax = fig.add_subplot()
    scatter = ax.scatter(
        pts[:, 0], pts[:, 1], s=marker_size, c=_label_colours(labs[0], n_classes), linewidths=0
    )
    _plane_axes(ax, bounds)
    heading = ax.set_title(names[0] if names else "frame 1")

    def update(i: int) -> tuple[Artist, ...]:
        # An alias of set_facecolor that matplotlib's stubs leave out (as they leave out
        # an (N, 4) array of colours for set_facecolor itself).
        scatter.set_facecolors(_label_colours(labs[i], n_classes))  # type: ignore[attr-defined]
        heading.set_text(names[i] if names else f"frame {i + 1}")
        return (scatter, heading)

    return _write_gif(fig, update, len(labs), out, fps, dpi)
