"""Evaluate a fitted mixture on a toy with a known density, and write the run's report.

The pieces the ``vmonf`` command strings together, usable on their own:
:func:`partial_labels` (semi-supervised splits), :func:`evaluate_on_toy` (the
metrics dict), :class:`DensityRecorder` (animation frames during training),
:func:`write_figures`, :func:`format_table` and :func:`write_json`.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from matplotlib.axes import Axes

from vmonf import metrics, plots
from vmonf._validation import (
    SeedLike,
    check_array,
    check_integer_labels,
    check_output_file,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from vmonf.atomic import write_atomically

__all__ = [
    "DensityRecorder",
    "FittedMixture",
    "Toy",
    "as_float",
    "evaluate_on_toy",
    "format_number",
    "format_table",
    "markdown_table",
    "mean_sd",
    "partial_labels",
    "plot_bounds",
    "versions",
    "write_figures",
    "write_json",
]

Bounds = tuple[float, float, float, float]
# y-axis labels of training.png: the losses are per point (nats).
_HISTORY_UNITS = {"loss": "nats per point", "val_loss": "nats per point"}
_HISTORY_NAMES = {"lr": "learning rate"}


def _curves_worth_drawing(history: Mapping[str, list[float]]) -> dict[str, list[float]]:
    """The training history a figure shows: the losses, and the other series that
    change (a constant temperature is no curve), without the clock (the run prints its
    fit time); "lr" spelled out."""
    return {
        _HISTORY_NAMES.get(key, key): values
        for key, values in history.items()
        if key in ("loss", "val_loss") or (key != "time" and _varies(values))
    }


def _varies(values: object) -> bool:
    """Whether the finite entries of ``values`` differ."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    return bool(finite.size) and bool(finite.max() > finite.min())


class Toy(Protocol):
    """What is used of a ground-truth toy (see :mod:`vmonf.datasets`)."""

    @property
    def name(self) -> str: ...
    @property
    def n_classes(self) -> int: ...

    def log_prob(self, X: object) -> np.ndarray: ...
    def predict(self, X: object) -> np.ndarray: ...


class FittedMixture(Protocol):
    """What is used of a fitted estimator (``VMoNF``; ``elbo`` is optional)."""

    n_components: int

    def _fitted_setting(self, name: str) -> Any: ...  # a setting as fitted, of its own type
    def score_samples(self, X: object) -> np.ndarray: ...
    def predict(self, X: object) -> np.ndarray: ...
    def predict_proba(self, X: object) -> np.ndarray: ...
    def sample(
        self, n_samples: int = 1, random_state: SeedLike = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


# --------------------------------------------------------------------------- data


def _check_test_points(
    X_test: object, y_test: object, names: tuple[str, str] = ("X_test", "y_test")
) -> tuple[np.ndarray, np.ndarray]:
    """2-D points (N, 2) and their true classes (N,), each >= 0 (held-out by default)."""
    X = check_array(X_test, names[0], n_features=2)
    y = check_integer_labels(y_test, names[1], X.shape[0], rows_of=names[0])
    if (y < 0).any():
        raise ValueError(f"{names[1]} must hold the true classes (>= 0), not -1 for unlabelled")
    return X, y


def partial_labels(y: object, n_labelled: int, n_classes: int, seed: int) -> np.ndarray:
    """Keep ``n_labelled`` labels of ``y`` spread evenly over the classes; the rest become -1.

    Each class gets ``n_labelled // n_classes`` labels and a random ``n_labelled %
    n_classes`` of them one more; which points keep their label is drawn with ``seed``.
    Raises ``ValueError`` when a class has too few points.
    """
    labels = check_integer_labels(y, "y")
    n_labelled = check_positive_int(n_labelled, "n_labelled", minimum=0)
    n_classes = check_positive_int(n_classes, "n_classes", maximum=labels.shape[0])
    label_seed = check_seed(seed, "seed")
    if label_seed is None:
        raise TypeError("seed must be an int (which points keep their label)")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"y must hold class labels in [0, {n_classes})")
    if n_labelled > labels.shape[0]:
        raise ValueError(
            f"cannot label {n_labelled} points: the training set has {labels.shape[0]}"
        )
    rng = np.random.default_rng([label_seed, 2])  # a stream apart from the data's
    per_class = np.full(n_classes, n_labelled // n_classes)
    per_class[rng.permutation(n_classes)[: n_labelled % n_classes]] += 1
    out = np.full(labels.shape[0], -1, dtype=np.int64)
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if per_class[c] > members.size:
            raise ValueError(
                f"cannot label {per_class[c]} points of class {c}: the training set has "
                f"{members.size}"
            )
        chosen = rng.choice(members, size=per_class[c], replace=False)
        out[chosen] = c
    return out


def plot_bounds(X: object, margin: float = 0.1) -> Bounds:
    """Square-ish plotting window around 2-D points: their range plus ``margin`` on each side."""
    pts = check_array(X, "X", n_features=2)
    margin = check_positive_float(margin, "margin", allow_zero=True)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # A floor relative to the data's magnitude: constant points far from 0 still get a
    # window wider than float64's spacing there.
    floor = 1e-6 * np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
    with np.errstate(over="ignore"):
        pad = margin * np.maximum(hi - lo, floor)
        lo, hi = lo - pad, hi + pad
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("X spans more than float64 can hold with this margin: rescale X")
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


# --------------------------------------------------------------------------- metrics


def evaluate_on_toy(
    estimator: FittedMixture,
    toy: Toy,
    X_test: object,
    y_test: object,
    *,
    labelled: bool = False,
) -> dict[str, float]:
    """Held-out metrics of a fitted mixture against the toy's truth (nats per point).

    Keys: ``log_likelihood`` (+ ``_stderr``), ``true_log_likelihood``,
    ``kl_to_truth`` (+ ``_stderr``), ``elbo`` (over all K components, also after a
    fit with ``elbo_top_k``) and ``amortization_gap`` (mean log p - mean ELBO; NaN
    without ``elbo``), ``ari`` and ``clustering_accuracy``
    (Hungarian) of ``predict``, ``accuracy`` (``predict`` == class; NaN unless
    ``labelled``, i.e. labels fixed the component names), ``bayes_accuracy`` (the
    toy's optimal classifier), ``exact_agreement`` (share of points where ``predict`` equals the
    argmax of the exact posterior ``pi_k p_k(x) / p(x)``; NaN when unavailable).
    """
    X, y = _check_test_points(X_test, y_test)
    model_lp = estimator.score_samples(X)
    true_lp = toy.log_prob(X)
    kl = metrics.kl_to_truth_estimate(true_lp, model_lp)
    pred = estimator.predict(X)
    elbo = getattr(estimator, "elbo", None)
    mean_elbo = math.nan
    if callable(elbo):
        # Over all K components (VMoNF's choice): a top-k bound hides part of q's gap.
        all_k = {"top_k": None} if "top_k" in inspect.signature(elbo).parameters else {}
        mean_elbo = float(np.mean(elbo(X, **all_k)))
    mean_lp = metrics.mean_log_likelihood(model_lp)
    try:
        exact = np.argmax(estimator.predict_proba(X, posterior="exact"), axis=1)  # type: ignore[call-arg]
        agreement = float(np.mean(exact == pred))
    except TypeError:
        agreement = math.nan
    return {
        "log_likelihood": mean_lp,
        "log_likelihood_stderr": metrics.mean_estimate(model_lp).stderr,
        "true_log_likelihood": metrics.mean_log_likelihood(true_lp),
        "kl_to_truth": kl.value,
        "kl_to_truth_stderr": kl.stderr,
        "elbo": mean_elbo,
        "amortization_gap": mean_lp - mean_elbo,
        "ari": metrics.adjusted_rand_index(y, pred),
        "clustering_accuracy": metrics.clustering_accuracy(y, pred),
        "accuracy": float(np.mean(pred == y)) if labelled else math.nan,
        "bayes_accuracy": float(np.mean(toy.predict(X) == y)),
        "exact_agreement": agreement,
    }


def _epochs(n: object) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def format_table(results: Mapping[str, Any], *, labelled: bool) -> str:
    """The short human-readable summary of :func:`evaluate_on_toy` results (+ ``fit_time``)."""

    def num(key: str, digits: int = 3) -> str:
        return format_number(results.get(key), digits)

    rows = [
        (
            "held-out log-likelihood",
            f"model {num('log_likelihood')} ± {num('log_likelihood_stderr')}   "
            f"truth {num('true_log_likelihood')}  nats",
        ),
        ("KL(truth || model)", f"{num('kl_to_truth')} ± {num('kl_to_truth_stderr')}  nats"),
        (
            "mean ELBO",
            f"{num('elbo')} nats   amortisation gap {num('amortization_gap')} nats",
        ),
        ("ARI", num("ari")),
        ("clustering accuracy", f"{num('clustering_accuracy')}  (Hungarian matching)"),
    ]
    if labelled:
        rows.append(("accuracy", f"{num('accuracy')}  (Bayes-optimal {num('bayes_accuracy')})"))
    if "fit_time" in results:
        rows.append(("fit time", f"{num('fit_time', 1)} s  ({_epochs(results.get('n_epochs'))})"))
    return format_rows(rows)


def format_rows(rows: Sequence[tuple[str, str]]) -> str:
    """(name, value) rows as indented lines, the values aligned in one column."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


# --------------------------------------------------------------------------- figures


class DensityRecorder:
    """Per-epoch callback ``recorder(estimator, epoch)`` keeping model-density frames.

    Records every ``every``-th epoch (epoch 0 included) on a ``resolution``² grid
    over ``bounds``; pass it as ``VMoNF(callback=recorder)``. ``seconds`` is the
    time spent recording (it is part of the fit's wall time).
    """

    def __init__(self, bounds: Bounds, *, every: int = 1, resolution: int = 64) -> None:
        self.bounds = plots._check_bounds(bounds)  # now, not at the first epoch's callback
        self.every = check_positive_int(every, "every")
        self.resolution = check_positive_int(
            resolution, "resolution", minimum=2, maximum=plots.MAX_RESOLUTION
        )
        self.frames: list[np.ndarray] = []
        self.titles: list[str] = []
        self.seconds = 0.0

    def add(self, log_prob: Callable[[np.ndarray], np.ndarray], title: str) -> None:
        """Evaluate ``log_prob`` on the grid and keep it as a frame titled ``title``."""
        started = time.perf_counter()

        def safe(points: np.ndarray) -> np.ndarray:
            values = np.asarray(log_prob(points), dtype=np.float64)
            # A frame of a diverging fit must not stop the fit: NaN and +inf show as 0,
            # and a density beyond float64 (log p > ~709) is drawn at exp(700).
            return np.minimum(np.nan_to_num(values, nan=-np.inf, posinf=-np.inf), 700.0)

        density = plots.density_grid(safe, self.bounds, self.resolution)[2]
        self.frames.append(density)
        self.titles.append(title)
        self.seconds += time.perf_counter() - started

    def __call__(self, estimator: FittedMixture, epoch: int) -> None:
        if epoch % self.every == 0:
            self.add(estimator.score_samples, f"epoch {epoch + 1}")


def write_figures(
    estimator: FittedMixture,
    toy: Toy | None,
    X_test: object,
    y_test: object,
    out: str | Path,
    bounds: Bounds,
    *,
    labelled: bool,
    history: Mapping[str, list[float]] | None = None,
    recorder: DensityRecorder | None = None,
    seed: int = 0,
    max_points: int = 1500,
    labelled_points: tuple[object, object] | None = None,
) -> list[Path]:
    """Write density.png, log_density.png (the tails), samples.png, posterior.png,
    training.png and training.gif.

    ``training.png`` needs ``history`` and ``training.gif`` a ``recorder`` with frames;
    in posterior.png the test points are coloured by their true class, renamed to
    the matched component (Hungarian) unless ``labelled`` fixed the names (classes
    left unmatched when K < classes get colours of their own), and the training points
    whose labels the fit used, ``labelled_points`` ((M, 2), (M,)), are stars.
    """
    X, y = _check_test_points(X_test, y_test)
    stars = (
        None
        if labelled_points is None
        else _check_test_points(*labelled_points, names=("labelled_points X", "labelled_points y"))
    )
    max_points = check_positive_int(max_points, "max_points")
    out = Path(out)
    k = int(estimator._fitted_setting("n_components"))
    written = [
        plots.plot_density_comparison(
            None if toy is None else toy.log_prob,
            estimator.score_samples,
            bounds,
            out / name,
            scale=scale,
        )
        for name, scale in (("density.png", "linear"), ("log_density.png", "log"))
    ]
    Xs, comp = estimator.sample(max(X.shape[0], 2000), random_state=seed)
    written.append(
        plots.plot_samples(
            Xs,
            comp,
            out / "samples.png",
            title="model samples by component",
            bounds=bounds,
            n_classes=k,
        )
    )
    shown = np.random.default_rng(seed).permutation(X.shape[0])[:max_points]
    colours = y[shown]
    if not labelled:  # each class named after its matched component
        colours = metrics.matched_labels(y, estimator.predict(X), n_clusters=k)[shown]
    n_colours = max(k, int(colours.max()) + 1)
    if stars is not None and stars[1].size:
        n_colours = max(n_colours, int(stars[1].max()) + 1)
    n_stars = 0 if stars is None else stars[0].shape[0]

    def draw(ax: Axes) -> None:
        plots.draw_decision_regions(
            ax, estimator.predict_proba, bounds, X=X[shown], y=colours, n_classes=n_colours
        )
        if stars is not None and n_stars:
            ax.scatter(
                stars[0][:, 0], stars[0][:, 1], marker="*", s=110,
                c=plots.class_colours(n_colours)[stars[1]], edgecolors="k", linewidths=0.8,
            )  # fmt: skip

    title = "q(c|x) regions, faded where q is unsure;\ntest points by true class"
    if n_stars:
        title += f";\n★ the {n_stars} labelled training points"
    written.append(plots.one_panel_figure(out / "posterior.png", draw, title, 100))
    curves = _curves_worth_drawing(history or {})
    if curves:
        units = {key: unit for key, unit in _HISTORY_UNITS.items() if key in curves}
        written.append(plots.plot_training_curves(curves, out / "training.png", units=units))
    if recorder is not None and recorder.frames:
        vmax = max(float(recorder.frames[-1].max()), 1e-12)
        if toy is not None:  # the frames' own window, which may differ from bounds
            truth = plots.density_grid(toy.log_prob, recorder.bounds, recorder.resolution)[2]
            vmax = max(vmax, float(truth.max()))
        written.append(
            plots.animate_density(
                recorder.frames,
                recorder.bounds,
                out / "training.gif",
                titles=recorder.titles,
                vmax=vmax,
            )
        )
    return written


# --------------------------------------------------------------------------- files


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import matplotlib
    import sklearn
    import torch

    import vmonf

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "vmonf": vmonf.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
    }


def format_number(value: object, digits: int = 3) -> str:
    """A number for people: fixed ``digits``; 'inf'/'-inf'; 'n/a' for None or NaN (a
    value that does not apply or could not be computed)."""
    if value is None:
        return "n/a"
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number):
        return "n/a"
    return f"{number:.{digits}f}" if math.isfinite(number) else ("inf" if number > 0 else "-inf")


def _plain(value: object) -> object:
    """JSON-ready copy: numpy -> Python, tuples -> lists, NaN -> None and +-inf ->
    "Infinity"/"-Infinity" (strict JSON has neither; :func:`as_float` reads both back)."""
    if isinstance(value, Mapping):
        plain = {str(k): _plain(v) for k, v in value.items()}
        if len(plain) < len(value):
            raise ValueError(f"keys {list(value)} collide as JSON strings")
        return plain
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _plain(value.item())
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as strict JSON (NaN becomes null, +-inf "Infinity"/"-Infinity"),
    indented, atomically (:func:`vmonf.atomic.write_atomically`)."""
    text = json.dumps(_plain(data), indent=2, allow_nan=False) + "\n"
    return write_atomically(check_output_file(path), lambda handle: handle.write(text.encode()))


def as_float(value: object) -> float:
    """A number from JSON as :func:`write_json` writes it: None (a NaN) is NaN,
    "Infinity"/"-Infinity" are +-inf."""
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


def mean_sd(values: Sequence[object], digits: int = 3) -> str:
    """'mean ± sd' over seeds (sample sd) of the finite values; when only some are
    finite, '(k of n finite)' follows ('n/a' if none is; one value alone)."""
    all_values = np.array([as_float(v) for v in values], dtype=np.float64)
    arr = all_values[np.isfinite(all_values)]
    if arr.size == 0:
        return "n/a"  # e.g. a metric that does not apply
    dropped = "" if arr.size == all_values.size else f" ({arr.size} of {all_values.size} finite)"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}{dropped}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}{dropped}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; a ``|`` inside a cell (as in "q(c|x)") is escaped, so that it
    does not start a new column."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
