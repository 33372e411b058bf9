"""Figures of a competitive run (owners per round, shares over rounds) and of the
comparison of discriminator estimates with exact likelihoods (estimate vs exact per
component, argmax agreement over rounds, where the two assignments disagree).

Same conventions as :mod:`vmonf.plots`: each function draws on its own Agg
figure, writes a PNG, PDF or SVG at ``path`` (by its suffix) and returns the ``Path``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, SymmetricalLogLocator

from vmonf._validation import (
    check_array,
    check_integer_labels,
    check_positive_int,
)
from vmonf.plots import check_dpi, class_colours, figure_file, new_figure, save_figure

__all__ = [
    "plot_agreement_rounds",
    "plot_assignment_rounds",
    "plot_disagreement",
    "plot_estimate_vs_exact",
    "plot_shares",
]

Bounds = tuple[float, float, float, float]


def _plane(ax: Axes, bounds: Bounds | None) -> None:
    """A bare 2-D scatter panel: no ticks, window fixed to ``bounds`` when given."""
    if bounds is not None:
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
    ax.set_xticks([])
    ax.set_yticks([])


def _check_owners(owners: object, n_points: int, n_components: int, name: str) -> np.ndarray:
    """Owners (N,) as int64 in [0, n_components), one per point."""
    labels = check_integer_labels(owners, name, n_samples=n_points)
    if labels.size and (labels.min() < 0 or labels.max() >= n_components):
        raise ValueError(f"{name}: owners must lie in [0, {n_components})")
    return labels


def plot_assignment_rounds(
    X: object,
    owners: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path,
    *,
    n_components: int,
    bounds: Bounds | None = None,
    max_panels: int = 12,
    title: str | None = None,
    dpi: int = 90,
) -> Path:
    """Grid of scatter plots of ``X`` (N, 2), one per round, coloured by owner (N,) each,
    with a legend of the components (up to 12) and ``title`` above.

    At most ``max_panels`` rounds are shown, spread evenly, the first and last included.
    """
    pts = check_array(X, "X", n_features=2)
    n_components = check_positive_int(n_components, "n_components")
    max_panels = check_positive_int(max_panels, "max_panels")
    if len(owners) == 0 or len(owners) != len(titles):
        raise ValueError("owners and titles must be non-empty and of equal length")
    owners = [
        _check_owners(o, pts.shape[0], n_components, f"owners[{i}]") for i, o in enumerate(owners)
    ]
    shown = np.unique(np.linspace(0, len(owners) - 1, min(max_panels, len(owners))).round())
    rows = math.ceil(shown.size / 4)
    cols = math.ceil(shown.size / rows)  # at most 4 wide, as few empty cells as that allows
    out, dpi = figure_file(path), check_dpi(dpi)
    fig = new_figure(max(3.0 * cols, 7.5), 2.8 * rows)  # room for the title and legend
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    palette = class_colours(n_components)
    for ax, i in zip(axes, shown.astype(int), strict=False):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=palette[owners[i]], linewidths=0)
        ax.set_title(titles[i], fontsize="small")
        _plane(ax, bounds)
    for ax in axes[shown.size :]:
        ax.set_axis_off()
    if n_components <= 12:
        handles = [
            Line2D([], [], marker="o", linestyle="", color=palette[j], label=str(j))
            for j in range(n_components)
        ]
        fig.legend(handles=handles, title="component", loc="outside right upper",
                   fontsize="small")  # fmt: skip
    if title is not None:
        fig.suptitle(title, fontsize="medium")
    return save_figure(fig, out, dpi)


def plot_shares(shares: Sequence[Sequence[float]], path: Path, *, dpi: int = 100) -> Path:
    """Share of points each component owns after each round, (rounds, K), as lines."""
    arr = np.asarray(shares, dtype=np.float64)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(
            f"shares must be (rounds, K) with at least one round and component, got {arr.shape}"
        )
    out, dpi = figure_file(path), check_dpi(dpi)
    fig = new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    palette = class_colours(arr.shape[1])
    rounds = np.arange(1, arr.shape[0] + 1)
    for k in range(arr.shape[1]):
        ax.plot(rounds, arr[:, k], marker="o", markersize=3, color=palette[k], label=str(k))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(1.0 / arr.shape[1], color="0.5", linestyle=":", linewidth=0.8)
    ax.text(1.0, 1.0 / arr.shape[1], " 1/K", transform=ax.get_yaxis_transform(),
            va="center", ha="left", fontsize="small", color="0.4")  # fmt: skip
    ax.set_ylabel("share of training points")
    ax.set_ylim(0, max(1e-3, float(arr.max())) * 1.05)
    ax.grid(alpha=0.3)
    if arr.shape[1] <= 12:
        ax.legend(title="component", fontsize="small", ncols=2)
    return save_figure(fig, out, dpi)


def _check_pair(a: object, b: object, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape or x.shape[0] == 0:
        raise ValueError(
            f"{names[0]} and {names[1]} must be (N, K) of one shape, got {x.shape} and {y.shape}"
        )
    return x, y


def plot_estimate_vs_exact(
    estimate: object,
    exact: object,
    path: Path,
    *,
    titles: Sequence[str] | None = None,
    xlabel: str = "exact log p_k - log p_data (nats)",
    ylabel: str = "discriminator estimate (nats)",
    max_points: int = 2000,
    dpi: int = 90,
) -> Path:
    """One scatter per component k: ``exact[:, k]`` (x) against ``estimate[:, k]`` (y),
    (N, K) each, with the identity line, both axes symmetric-log (linear within 1 nat
    of 0), so that the points near 0 and those tens of nats below are both visible.
    At most ``max_points`` evenly spaced rows are drawn."""
    est, ref = _check_pair(estimate, exact, ("estimate", "exact"))
    k = est.shape[1]
    if titles is not None and len(titles) != k:
        raise ValueError(f"titles must name the {k} components, got {len(titles)}")
    rows = np.unique(np.linspace(0, est.shape[0] - 1, min(max_points, est.shape[0])).astype(int))
    est, ref = est[rows], ref[rows]
    values = np.concatenate([est.ravel(), ref.ravel()])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (-1.0, 1.0)
    diagonal = -np.geomspace(max(-lo, 1.0) + 1.0, 1.0, 200) + 1.0  # dense near 0
    decades = math.log10(max(-lo, 1.0)) + math.log10(max(hi, 1.0))  # the symlog span
    diagonal = np.concatenate([diagonal, np.linspace(0.0, max(hi, 0.0), 20)])
    cols = min(k, 5)
    n_rows = math.ceil(k / cols)
    out, dpi = figure_file(path), check_dpi(dpi)
    fig = new_figure(2.8 * cols, 2.7 * n_rows)
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    palette = class_colours(k)
    for j, ax in enumerate(axes[:k]):
        ax.scatter(ref[:, j], est[:, j], s=3, color=palette[j], alpha=0.5, linewidths=0)
        ax.plot(diagonal, diagonal, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("symlog", linthresh=1.0)
        if decades > 4:  # every other decade, or the labels of 2.8-inch panels overlap
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(SymmetricalLogLocator(linthresh=1.0, base=100.0))
        ax.set_title(titles[j] if titles is not None else f"component {j}", fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[k:]:
        ax.set_axis_off()
    fig.supxlabel(xlabel + ", symlog", fontsize="small")
    fig.supylabel(ylabel + ", symlog", fontsize="small")
    return save_figure(fig, out, dpi)


def plot_agreement_rounds(
    curves: Mapping[str, Sequence[float]],
    path: Path,
    *,
    ylabel: str = "argmax agreement",
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """One line per run: a value per round (index 0 = right after pre-training)."""
    if not curves or any(len(v) == 0 for v in curves.values()):
        raise ValueError("curves must map each label to at least one value")
    out, dpi = figure_file(path), check_dpi(dpi)
    fig = new_figure(5.6, 3.6)
    ax = fig.add_subplot()
    palette = class_colours(len(curves))
    for colour, (label, values) in zip(palette, curves.items(), strict=True):
        arr = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(arr.size), arr, marker="o", markersize=3, color=colour, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = after pre-training)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2 if len(curves) > 4 else 1)
    if title is not None:
        ax.set_title(title, fontsize="small")
    return save_figure(fig, out, dpi)


def plot_disagreement(
    X: object,
    exact: object,
    estimated: object,
    path: Path,
    *,
    n_components: int,
    bounds: Bounds | None = None,
    title: str | None = None,
    dpi: int = 90,
) -> Path:
    """Three panels over points ``X`` (N, 2): the exact owners (N,), the estimated
    owners (N,), and the points where the two disagree (black) among the rest (light
    grey): neither is a component's colour."""
    pts = check_array(X, "X", n_features=2)
    n_components = check_positive_int(n_components, "n_components")
    a = _check_owners(exact, pts.shape[0], n_components, "exact")
    b = _check_owners(estimated, pts.shape[0], n_components, "estimated")
    differ = a != b
    out, dpi = figure_file(path), check_dpi(dpi)
    fig = new_figure(9.0, 3.2)
    axes = fig.subplots(1, 3)
    palette = class_colours(n_components)
    for ax, owners, name in zip(
        axes, (a, b), ("exact argmax", "discriminator argmax"), strict=False
    ):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=palette[owners], linewidths=0)
        ax.set_title(name, fontsize="small")
    axes[2].scatter(pts[~differ, 0], pts[~differ, 1], s=2, color="0.88", linewidths=0)
    axes[2].scatter(pts[differ, 0], pts[differ, 1], s=4, color="black", linewidths=0)
    axes[2].set_title(f"disagree: {differ.mean():.1%} of points", fontsize="small")
    for ax in axes:
        _plane(ax, bounds)
    if title is not None:
        fig.suptitle(title, fontsize="small")
    return save_figure(fig, out, dpi)
