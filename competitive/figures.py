"""Figures of a competitive run: owners per round and shares over rounds.

Same conventions as :mod:`vmonf.plots`: each function draws on its own Agg
figure, writes a PNG at ``path`` and returns the ``Path``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vmonf._validation import check_array

__all__ = ["plot_assignment_rounds", "plot_shares"]

Bounds = tuple[float, float, float, float]


def _palette(n: int) -> np.ndarray:
    return colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "hsv"](np.arange(n) % 20)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_assignment_rounds(
    X: object,
    owners: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path,
    *,
    n_components: int,
    bounds: Bounds | None = None,
    max_panels: int = 12,
    dpi: int = 90,
) -> Path:
    """Grid of scatter plots of ``X`` (N, 2), one per round, coloured by owner (N,) each.

    At most ``max_panels`` rounds are shown, spread evenly, the first and last included.
    """
    pts = check_array(X, "X", n_features=2)
    if len(owners) == 0 or len(owners) != len(titles):
        raise ValueError("owners and titles must be non-empty and of equal length")
    shown = np.unique(np.linspace(0, len(owners) - 1, min(max_panels, len(owners))).round())
    cols = min(4, shown.size)
    rows = math.ceil(shown.size / cols)
    fig = _figure(3.0 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    palette = _palette(n_components)
    for ax, i in zip(axes, shown.astype(int), strict=False):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=palette[np.asarray(owners[i])], linewidths=0)
        ax.set_title(titles[i], fontsize="small")
        if bounds is not None:
            ax.set_xlim(bounds[0], bounds[1])
            ax.set_ylim(bounds[2], bounds[3])
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[shown.size :]:
        ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_shares(shares: Sequence[Sequence[float]], path: Path, *, dpi: int = 100) -> Path:
    """Share of points each component owns after each round, (rounds, K), as lines."""
    arr = np.asarray(shares, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"shares must be (rounds, K) with at least one round, got {arr.shape}")
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    palette = _palette(arr.shape[1])
    rounds = np.arange(1, arr.shape[0] + 1)
    for k in range(arr.shape[1]):
        ax.plot(rounds, arr[:, k], marker="o", markersize=3, color=palette[k], label=str(k))
    ax.set_xlabel("round")
    ax.set_ylabel("share of training points")
    ax.set_ylim(0, max(1e-3, float(arr.max())) * 1.05)
    ax.grid(alpha=0.3)
    if arr.shape[1] <= 12:
        ax.legend(title="component", fontsize="small", ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
