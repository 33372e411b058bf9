"""The ``vmonf`` command: ``vmonf fit TOY`` trains VMoNF on a toy and reports against the truth;
``vmonf compete TOY`` does the same for competitive training (the ``competitive`` package,
imported only when that command runs: vmonf never depends on it).

Subcommands register themselves through :data:`COMMANDS`: each entry adds its
parser to the sub-parsers and sets ``handler=function(args) -> exit status``.
Errors in the arguments or the input end in one line ``vmonf: error: ...`` on
stderr and exit status 2; a failed training run exits with 1.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from contextvars import ContextVar, copy_context
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np
import torch

from vmonf import __version__, datasets, plots, reporting
from vmonf._validation import MAX_SEED
from vmonf.base import MixtureEstimator, device_name, torch_device
from vmonf.distributed import init_from_env, is_main_process
from vmonf.estimator import VMoNF
from vmonf.flows import MAX_BASE_DF, MIN_BASE_DF
from vmonf.resume import TrainingInterrupted
from vmonf.training import NonFiniteLossError

__all__ = ["COMMANDS", "build_parser", "main"]

PROG = "vmonf"
TRAIN_STATE = "train_state.pt"  # resumable training state inside the run folder


class UsageError(Exception):
    """Bad command-line arguments (exit status 2)."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it says so or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False  # by identity: 0 == False, and a 0 default is worth showing
            or default == []
            or default is argparse.SUPPRESS
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are exceptions, reported by :func:`main` in one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --------------------------------------------------------------------------- argument types


def _int_in_range(minimum: int, what: str, maximum: float = math.inf) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        return device_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected cpu, cuda, cuda:N or auto, got {text!r}"
        ) from None


def _tol(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return _fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in [0, 1) or auto, got {text!r}"
        ) from None


def _add_device_argument(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="where to train: cpu, cuda, cuda:N or auto (cuda when available)",
    )


def _degrees_of_freedom(text: str) -> float:
    value = _positive_float(text)
    if value < MIN_BASE_DF:
        raise argparse.ArgumentTypeError(
            f"expected at least {MIN_BASE_DF:.4g} (float32's smallest normal number), got {text!r}"
        )
    if value > MAX_BASE_DF:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_BASE_DF:g} (leave --base-df out for the normal base), "
            f"got {text!r}"
        )
    return value


def output_folder(text: str) -> Path:
    """An ``--out`` folder: a non-empty path (an empty one would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    return Path(text)


def _scalar(text: str) -> object:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    return text


def toy_param(text: str) -> tuple[str, object]:
    """Parse ``key=value``: numbers become int/float, ``a,b,c`` a tuple, else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    raw = raw.strip()
    if "," in raw:
        return key, tuple(_scalar(part.strip()) for part in raw.split(",") if part.strip())
    return key, _scalar(raw)


positive_int = _int_in_range(1, "a positive integer")
# A standard error needs two points.
held_out_count = _int_in_range(2, "at least 2 held-out points")
non_negative_int = _int_in_range(0, "a non-negative integer")
# The held-out points are drawn with seed + 1, compete's perfect-generator sample with + 2.
seed_int = _int_in_range(0, f"a seed in [0, {MAX_SEED - 2}]", MAX_SEED - 2)


# --------------------------------------------------------------------------- vmonf fit


def _toy_names() -> str:
    return ", ".join(datasets.available_toys())


def _add_toy_arguments(p: argparse.ArgumentParser, unit: str) -> argparse._ArgumentGroup:
    """TOY, --toy-param and --components (shared by fit and compete); returns the
    "model" argument group for further options."""
    p.add_argument("toy", metavar="TOY", help=f"toy distribution: one of {_toy_names()}")
    p.add_argument(
        "--toy-param",
        metavar="KEY=VALUE",
        type=toy_param,
        action="append",
        default=[],
        help="toy parameter, repeatable (e.g. n_modes=6, radii=0.5,1.0)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--components",
        "-k",
        metavar="K",
        type=positive_int,
        default=None,
        help=f"number of {unit} (default: the toy's number of classes)",
    )
    model.add_argument(
        "--base-df",
        metavar="DF",
        type=_degrees_of_freedom,
        default=None,
        help="Student-t base distribution with DF degrees of freedom, for heavier tails "
        "(flows only; default: Gaussian base)",
    )
    return model


_VMONF_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(VMoNF).parameters.items()
}


def _add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint-every, --resume and --nproc (shared by fit and compete)."""
    _add_parallel_argument(p)
    group = p.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpoint-every",
        metavar="STEPS",
        type=positive_int,
        default=_VMONF_DEFAULTS["checkpoint_every"],
        help=f"save the training state to OUT/{TRAIN_STATE} every STEPS optimiser steps, "
        f"every {_VMONF_DEFAULTS['checkpoint_seconds']:g} s and on Ctrl-C",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from OUT/{TRAIN_STATE} (same data and settings); the result "
        "equals an uninterrupted run's",
    )


def _add_parallel_argument(p: argparse.ArgumentParser) -> None:
    """--nproc (shared by fit and compete): data-parallel through torchrun."""
    p.add_argument(
        "--nproc",
        metavar="N",
        type=positive_int,
        default=1,
        help="train data-parallel in N processes on this machine (launches torchrun; "
        "for several machines run torchrun yourself, see the README)",
    )


def _relaunch_under_torchrun(argv: Sequence[str], nproc: int) -> int:
    """Run this same command in ``nproc`` processes via ``torch.distributed.run``."""
    rest, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            rest.append(token)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "vmonf", *rest,
    ]  # fmt: skip
    return subprocess.call(command)


def _checked_only(args: argparse.Namespace, estimator: MixtureEstimator) -> bool:
    """Check the run's settings before anything is written or launched (a bad one fails
    once, before torchrun starts its ranks); True when only that was asked
    (``args.check_only``, set before a relaunch)."""
    estimator._validate_settings()
    estimator._check_n_samples(args.n_train)
    torch_device(estimator.device)  # an unavailable one (cuda here) raises
    return bool(getattr(args, "check_only", False))


def _start_run(
    args: argparse.Namespace, toy: datasets.ToyDistribution, out: Path
) -> tuple[bool, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], reporting.Bounds]:
    """Join the process group, make the output folder, draw the training and held-out
    points of ``toy``; returns (is this the rank that writes, (X, y), (X_test, y_test),
    plot bounds of both)."""
    main_rank = _join_process_group(args)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    train = toy.sample(args.n_train, seed=args.seed)
    test = toy.sample(args.n_test, seed=args.seed + 1)
    return main_rank, train, test, reporting.plot_bounds(np.concatenate([train[0], test[0]]))


def _join_process_group(args: argparse.Namespace) -> bool:
    """Under torchrun, join the process group; returns whether this is the rank that
    prints and writes (the others only train)."""
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    init_from_env(torch.device("cuda" if cuda else "cpu"))  # NCCL, one GPU per rank
    main_rank = is_main_process()
    if not main_rank:
        args.quiet = True
    return main_rank


def _write_report(args: argparse.Namespace, out: Path, report: dict[str, Any]) -> None:
    """Write ``out/metrics.json`` and say what was written (with the training state the
    fit kept there), and which outputs of an earlier run in the same folder (listed in
    its metrics.json) were not replaced."""
    if (out / TRAIN_STATE).is_file() and TRAIN_STATE not in report["files"]:
        report["files"] = sorted([*report["files"], TRAIN_STATE])
    try:
        earlier = json.loads((out / "metrics.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        earlier = []
    if not isinstance(earlier, list):  # someone else's metrics.json
        earlier = []
    stale = sorted(
        name for name in set(map(str, earlier)) - set(report["files"])
        if "/" not in name and (out / name).is_file()
    )  # fmt: skip
    reporting.write_json(report, out / "metrics.json")
    _status(args, f"wrote {out}/: {', '.join(report['files'])}")
    if stale:
        _status(args, f"note: {out}/ also holds {', '.join(stale)} from an earlier run")


def _checkpoint_settings(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    if args.resume:
        state = out / TRAIN_STATE
        _status(args, f"resuming from {state}" if state.exists() else f"no {state}: starting")
    return {"checkpoint": str(out / TRAIN_STATE), "checkpoint_every": args.checkpoint_every}


def _estimator_overrides(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """Estimator keyword -> value for each option the user gave; options left at None
    fall back to the estimator's own defaults (one place for them)."""
    return {
        param: getattr(args, option)
        for param, option in names.items()
        if getattr(args, option) is not None
    }


def add_fit_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vmonf fit``."""
    p = subparsers.add_parser(
        "fit",
        help="fit VMoNF to a 2-D toy and compare it with the true density",
        description=(
            "Fit a variational mixture of normalizing flows (VMoNF) to samples of a "
            "toy distribution with a known density, then report held-out "
            "log-likelihood, KL to the truth, ELBO and amortisation gap, clustering "
            "scores and (with --labels) accuracy. Writes metrics.json, model.pt and "
            "figures to --out."
        ),
        formatter_class=_HelpFormatter,
    )
    model = _add_toy_arguments(p, "flows")
    model.add_argument(
        "--objective",
        choices=("elbo", "marginal"),
        default="elbo",
        help="elbo: amortised q(c|x) (the paper); marginal: exact log p(x) (soft EM)",
    )
    model.add_argument(
        "--temperature",
        choices=("constant", "anneal"),
        default="constant",
        help="temperature of q: 1, or annealed T = max(0.05, exp(-1e-3 step)) as in the paper",
    )
    model.add_argument(
        "--layers",
        metavar="L",
        type=positive_int,
        help="coupling layers per flow (default: VMoNF's)",
    )
    model.add_argument(
        "--hidden",
        metavar="H",
        type=positive_int,
        help="hidden units of each coupling (default: VMoNF's)",
    )
    model.add_argument(
        "--elbo-top-k",
        metavar="k",
        type=_int_in_range(2, "an integer >= 2"),
        help="train each unlabelled point on its k most probable components under q(c|x) "
        "only (k >= 2; faster for many components; default: all, the exact ELBO)",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--labels",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="label N training points, spread evenly over classes (semi-supervised; "
        "0, or at least the number of classes)",
    )
    data.add_argument(
        "--n-train",
        metavar="N",
        type=positive_int,
        default=2560,
        help="training points (drawn with --seed)",
    )
    data.add_argument(
        "--n-test",
        metavar="N",
        type=held_out_count,
        default=4096,
        help="held-out points (drawn with --seed + 1)",
    )
    data.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the data, the labelled subset and the model",
    )
    train = p.add_argument_group("training")
    train.add_argument(
        "--epochs",
        metavar="E",
        type=positive_int,
        help="maximum training epochs (default: VMoNF's)",
    )
    train.add_argument(
        "--max-time",
        metavar="S",
        type=_positive_float,
        default=None,
        help="training time budget in seconds (default: no limit)",
    )
    train.add_argument(
        "--batch-size", metavar="B", type=positive_int, help="points per step (default: VMoNF's)"
    )
    train.add_argument(
        "--lr",
        metavar="LR",
        type=_positive_float,
        help="Adam learning rate, cosine schedule (default: VMoNF's)",
    )
    train.add_argument(
        "--init-steps",
        metavar="S",
        type=non_negative_int,
        help=(
            "pre-training steps on k-means clusters, or with --labels on the labels spread to "
            "every point when each class has one; 0 = none (default: VMoNF's)"
        ),
    )
    _add_device_argument(train)
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        metavar="DIR",
        type=output_folder,
        default=None,
        help="output folder (default: runs/TOY-SEED)",
    )
    out.add_argument(
        "--no-animation",
        action="store_true",
        help="skip training.gif (no density frames recorded while training)",
    )
    out.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar or status lines; only the results table (and any warnings)",
    )
    _add_checkpoint_arguments(p)
    p.set_defaults(handler=run_fit)


def _status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def run_fit(args: argparse.Namespace) -> int:
    """``vmonf fit``: sample, fit, evaluate, print the table and write the run folder."""
    toy = datasets.toy(args.toy, **dict(args.toy_param))
    n_components = toy.n_classes if args.components is None else args.components
    if args.labels and n_components < toy.n_classes:
        raise ValueError(
            f"--labels needs --components >= the toy's {toy.n_classes} classes, got {n_components}"
        )
    if 0 < args.labels < toy.n_classes:  # a class without a label leaves its component unnamed
        raise ValueError(
            f"--labels must be 0 or at least the toy's {toy.n_classes} classes (one label names "
            f"each class's component; accuracy needs them all), got {args.labels}"
        )
    out: Path = args.out if args.out is not None else Path("runs") / f"{toy.name}-{args.seed}"
    estimator = VMoNF(
        n_components,
        objective=args.objective,
        temperature=args.temperature,
        random_state=args.seed,
        verbose=not args.quiet,
        device=args.device,
        **_estimator_overrides(
            args,
            max_epochs="epochs",
            max_time="max_time",
            batch_size="batch_size",
            learning_rate="lr",
            n_layers="layers",
            hidden_features="hidden",
            init_steps="init_steps",
            base_df="base_df",
            elbo_top_k="elbo_top_k",
        ),
        **_checkpoint_settings(args, out),
    )
    if _checked_only(args, estimator):
        return 0
    main_rank, (X, y), (X_test, y_test), bounds = _start_run(args, toy, out)
    labelled = args.labels > 0
    y_fit = reporting.partial_labels(y, args.labels, toy.n_classes, args.seed) if labelled else None
    recorder = None
    if not args.no_animation and main_rank:
        every = max(1, math.ceil(estimator.max_epochs / 40))  # at most ~40 frames
        recorder = reporting.DensityRecorder(bounds, every=every)
        estimator.set_params(callback=recorder)

    _status(
        args,
        f"fitting VMoNF (K={n_components}, {args.objective}, {args.temperature} temperature) "
        f"to {args.n_train} points of {toy!r}"
        + (f", {args.labels} labelled" if labelled else "")
        + f"; writing to {out}",
    )
    estimator.fit(X, y_fit, resume=args.resume)
    if not main_rank:
        return 0  # rank 0 evaluates and writes the run folder
    recording = 0.0 if recorder is None else recorder.seconds  # frames drawn during the fit
    if recorder is not None:
        estimator.set_params(callback=None)  # a callable cannot go into model.pt
        recorder.add(estimator.score_samples, "final model")

    results = reporting.evaluate_on_toy(estimator, toy, X_test, y_test, labelled=labelled)
    results["fit_time"] = estimator.fit_time_ - recording
    results["n_epochs"] = estimator.n_iter_
    header = (
        f"{toy.name}: VMoNF K={n_components}, {args.n_train} training points"
        + (f" ({args.labels} labelled)" if labelled else "")
        + f", {args.n_test} held-out, seed {args.seed}"
    )
    estimator.save(out / "model.pt")  # first: the fit survives a closed stdout
    print(header)
    print(reporting.format_table(results, labelled=labelled), flush=True)

    with plots.figure_note(f"vmonf {__version__} · {header}"):
        files = reporting.write_figures(
            estimator,
            toy,
            X_test,
            y_test,
            out,
            bounds,
            labelled=labelled,
            history=estimator.history_,
            recorder=recorder,
            seed=args.seed,
            labelled_points=(X[y_fit >= 0], y_fit[y_fit >= 0]) if y_fit is not None else None,
        )
    params = {k: v for k, v in estimator.get_params().items() if k != "callback"}
    report: dict[str, Any] = {
        "command": "fit",
        "metrics": {**results, "recording_time": recording},
        "settings": {
            "toy": toy.name,
            "toy_params": toy.params,
            "n_classes": toy.n_classes,
            "n_components": n_components,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "n_labelled": args.labels,
            "seed": args.seed,
            "train_seed": args.seed,
            "test_seed": args.seed + 1,
            "estimator": "VMoNF",
            "estimator_params": params,
            # what fitting and scoring ran on (the estimator's n_threads; None: torch's)
            "torch_threads": estimator.n_threads or torch.get_num_threads(),
        },
        "fitted": {
            "weights": estimator.weights_,
            "n_epochs": estimator.n_iter_,
            # the fitted attribute (on the training points, or the validation split; with
            # --elbo-top-k the top-k bound trained); metrics' "elbo" is on the held-out
            # points, over all K components
            "train_elbo": estimator.elbo_,
            "converged": estimator.converged_,
        },
        "history": estimator.history_,
        "files": sorted(p.name for p in [*files, out / "model.pt", out / "metrics.json"]),
        "versions": reporting.versions(),
    }
    _write_report(args, out, report)
    return 0


# --------------------------------------------------------------------------- vmonf compete


def add_compete_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vmonf compete`` (competitive training; the ``competitive`` package)."""
    p = subparsers.add_parser(
        "compete",
        help="train a mixture competitively (Locatello et al.) on a 2-D toy",
        description=(
            "Competitive (hard-assignment) training of K flows or VAEs on samples of a "
            "toy distribution: rounds of training each generator on the points it owns "
            "and re-assigning every point by exact likelihood or by discriminators. "
            "Reports held-out KL to the truth (flows) or the KDE protocol score (VAEs) "
            "and clustering scores; writes metrics.json, model.pt and figures to --out."
        ),
        formatter_class=_HelpFormatter,
    )
    model = _add_toy_arguments(p, "generators")
    model.add_argument(
        "--generator", choices=("flow", "vae", "kmeans"), default="flow", help="generator kind"
    )
    model.add_argument(
        "--assignment",
        choices=("exact", "discriminator", "auto"),
        default="auto",
        help="re-assign by exact likelihood or by discriminators (density-ratio trick); "
        "auto (default): exact, or discriminator for --generator vae (VAEs have no exact "
        "likelihood)",
    )
    model.add_argument(
        "--init",
        choices=("uniform", "random_split", "kmeans"),
        default="uniform",
        help="pre-train every generator on all points (the paper), each on a random 1/K, "
        "or each on a k-means cluster",
    )
    model.add_argument(
        "--layers",
        metavar="L",
        type=positive_int,
        help="coupling layers per flow (default: CompetitiveMixture's)",
    )
    model.add_argument(
        "--hidden",
        metavar="H",
        type=positive_int,
        default=None,
        help="hidden units (default: 64 for flows, 50 for VAEs)",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--n-train", metavar="N", type=positive_int, default=20000, help="training points"
    )
    data.add_argument(
        "--n-test", metavar="N", type=held_out_count, default=6400, help="held-out points"
    )
    data.add_argument("--seed", type=seed_int, default=0, help="seed of data and model")
    train = p.add_argument_group("training")
    train.add_argument(
        "--rounds", metavar="R", type=non_negative_int, default=20, help="maximum rounds"
    )
    train.add_argument(
        "--tol",
        metavar="F",
        type=_tol,
        default="auto",
        help="stop once at most this fraction of the points change owner in a round "
        "(default auto: 0.02 for flows and VAEs, whose boundary points keep moving, 0 for "
        "k-means)",
    )
    train.add_argument(
        "--epochs", metavar="E", type=positive_int, default=10, help="generator epochs per round"
    )
    train.add_argument(
        "--pretrain-epochs",
        metavar="E",
        type=positive_int,
        default=10,
        help="epochs of pre-training",
    )
    train.add_argument(
        "--max-time",
        metavar="S",
        type=_positive_float,
        default=None,
        help="time budget of the fit in seconds (default: no limit)",
    )
    train.add_argument(
        "--batch-size",
        metavar="B",
        type=positive_int,
        help="points per step (default: CompetitiveMixture's)",
    )
    train.add_argument(
        "--lr",
        metavar="LR",
        type=_positive_float,
        help="Adam learning rate (default: CompetitiveMixture's)",
    )
    _add_device_argument(train)
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        metavar="DIR",
        type=output_folder,
        default=None,
        help="output folder (default: runs/compete-TOY-SEED)",
    )
    out.add_argument(
        "--quiet", "-q", action="store_true", help="only the results table (and any warnings)"
    )
    _add_checkpoint_arguments(p)
    p.set_defaults(handler=run_compete)


def run_compete(args: argparse.Namespace) -> int:
    """``vmonf compete``: sample, fit competitively, evaluate, print, write the run folder."""
    from competitive import CompetitiveMixture  # vmonf never imports competitive at import
    from competitive.estimator import resolve_assignment
    from competitive.figures import plot_assignment_rounds, plot_shares
    from vmonf import metrics

    args.assignment = resolve_assignment(args.assignment, args.generator)
    if args.generator == "vae" and args.assignment == "exact":
        raise UsageError(
            "--generator vae needs --assignment discriminator: VAEs have no exact likelihood"
        )
    if args.rounds == 0 and args.assignment == "discriminator":
        other = "" if args.generator == "vae" else " or --assignment exact"  # VAEs: none
        raise UsageError(
            "--rounds 0 trains no discriminator, so nothing could assign the points: use "
            f"--rounds >= 1{other}"
        )
    toy = datasets.toy(args.toy, **dict(args.toy_param))
    k = toy.n_classes if args.components is None else args.components
    out: Path = (
        args.out if args.out is not None else Path("runs") / f"compete-{toy.name}-{args.seed}"
    )
    frames: list[np.ndarray] = []
    titles: list[str] = []
    recording = 0.0  # seconds spent in record() during the fit, left out of fit_time

    def record(estimator: CompetitiveMixture, round_: int) -> None:
        nonlocal recording
        started = time.perf_counter()
        frames.append(estimator.predict(shown))
        titles.append("after pre-training" if round_ == 0 else f"round {round_}")
        recording += time.perf_counter() - started

    estimator = CompetitiveMixture(
        k,
        generator=args.generator,
        assignment=args.assignment,
        init=args.init,
        pretrain_epochs=args.pretrain_epochs,
        max_rounds=args.rounds,
        tol=args.tol,
        max_epochs=args.epochs,
        max_time=args.max_time,
        hidden_features=args.hidden,
        random_state=args.seed,
        verbose=not args.quiet,
        device=args.device,
        callback=record if args.rounds > 0 else None,
        **_estimator_overrides(
            args,
            n_layers="layers",
            batch_size="batch_size",
            learning_rate="lr",
            base_df="base_df",
        ),
        **_checkpoint_settings(args, out),
    )
    if _checked_only(args, estimator):
        return 0
    main_rank, (X, _), (X_test, y_test), bounds = _start_run(args, toy, out)
    shown = X_test[: min(2000, X_test.shape[0])]
    _status(
        args,
        f"competitive training ({k} {args.generator} generators, {args.assignment} "
        f"assignment) on {args.n_train} points of {toy!r}; writing to {out}",
    )
    estimator.fit(X, resume=args.resume)
    if not main_rank:
        return 0  # rank 0 evaluates and writes the run folder
    estimator.set_params(callback=None)  # a callable cannot go into model.pt
    estimator.save(out / "model.pt")  # first: the fit survives a failure below
    pred = estimator.predict(X_test)
    results: dict[str, Any] = {
        "ari": metrics.adjusted_rand_index(y_test, pred),
        "clustering_accuracy": metrics.clustering_accuracy(y_test, pred),
        "true_log_likelihood": metrics.mean_log_likelihood(toy.log_prob(X_test)),
        "fit_time": estimator.fit_time_ - recording,
        "recording_time": recording,
        "pretrain_time": estimator.pretrain_time_,
        "n_rounds": estimator.n_iter_,
        "time_per_round": float(np.mean(estimator.history_["round_time"]))
        if estimator.n_iter_
        else math.nan,
    }
    if args.generator != "vae":
        model_lp = estimator.score_samples(X_test)
        kl = metrics.kl_to_truth_estimate(toy.log_prob(X_test), model_lp)
        results |= {
            "log_likelihood": metrics.mean_log_likelihood(model_lp),
            "kl_to_truth": kl.value,
            "kl_to_truth_stderr": kl.stderr,
        }
    n_kde = min(10000, max(1000, args.n_test))
    generated, generated_by = estimator.sample(n_kde, random_state=args.seed)
    perfect, _ = toy.sample(n_kde, seed=args.seed + 2)
    n_kde_test = min(500, X_test.shape[0])
    results["kde_score"] = metrics.kde_log_likelihood(
        generated, X_test, n_select=min(500, n_kde // 2), n_test=n_kde_test, seed=args.seed
    ).score
    results["kde_perfect_generator"] = metrics.kde_log_likelihood(
        perfect, X_test, n_select=min(500, n_kde // 2), n_test=n_kde_test, seed=args.seed
    ).score

    def num(key: str, digits: int = 3) -> str:
        return reporting.format_number(results.get(key), digits)

    header = (
        f"{toy.name}: competitive K={k} {args.generator} generators, {args.assignment} "
        f"assignment, {args.n_train} training points, {args.n_test} held-out, seed {args.seed}"
    )
    print(header)
    rows = [
        (
            "KL(truth || model)",
            f"{num('kl_to_truth')} ± {num('kl_to_truth_stderr')}  nats"
            if results.get("kl_to_truth") is not None
            else "n/a  (no exact density: see the KDE protocol score)",
        ),
        (
            "KDE protocol score",
            f"{num('kde_score')}  nats  (perfect generator {num('kde_perfect_generator')})",
        ),
        ("ARI", num("ari")),
        ("clustering accuracy", f"{num('clustering_accuracy')}  (Hungarian matching)"),
        ("rounds", f"{estimator.n_iter_}  (converged: {estimator.converged_})"),
        (
            "fit time",
            f"{num('fit_time', 1)} s"
            + (f"  ({num('time_per_round', 2)} s per round)" if estimator.n_iter_ else ""),
        ),
    ]
    print(reporting.format_rows(rows), flush=True)

    files = [out / "model.pt", out / "metrics.json"]
    with plots.figure_note(f"vmonf {__version__} · {header}"):
        files.append(
            plots.plot_samples(
                generated[:2000],
                generated_by[:2000],
                out / "samples.png",
                title="model samples by component",
                bounds=bounds,
                n_classes=k,
            )
        )
        if frames:
            files.append(
                plot_assignment_rounds(
                    shown,
                    frames,
                    titles,
                    out / "assignments.png",
                    n_components=k,
                    bounds=bounds,
                    title=f"owner of {shown.shape[0]} held-out points after each round "
                    f"({args.assignment} assignment)",
                )
            )
            if estimator.history_["share"]:  # none when max_time ended the fit before round 1
                files.append(plot_shares(estimator.history_["share"], out / "shares.png"))
    params = {key: v for key, v in estimator.get_params().items() if key != "callback"}
    report: dict[str, Any] = {
        "command": "compete",
        "metrics": results,
        "settings": {
            "toy": toy.name,
            "toy_params": toy.params,
            "n_components": k,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "seed": args.seed,
            "test_seed": args.seed + 1,
            "estimator": "CompetitiveMixture",
            "estimator_params": params,
        },
        "fitted": {
            "weights": estimator.weights_,
            "n_rounds": estimator.n_iter_,
            "converged": estimator.converged_,
        },
        "history": estimator.history_,
        "files": sorted(f.name for f in files),
        "versions": reporting.versions(),
    }
    _write_report(args, out, report)
    return 0


# --------------------------------------------------------------------------- vmonf report


def add_report_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vmonf report``. Its options and work live in :mod:`competitive.report`
    and are read only when it runs (:func:`_run_report`), so that no other command, nor
    building this parser, imports ``competitive``."""
    p = subparsers.add_parser(
        "report",
        help="soft vs hard assignment and discriminator vs exact likelihoods on the toy suite",
        add_help=False,  # --help too is the report parser's
    )
    p.set_defaults(handler=_run_report, takes_own_options=True)


def _run_report(args: argparse.Namespace) -> int:
    from competitive import report

    parser = _Parser(
        prog=f"{PROG} report", description=report.DESCRIPTION, formatter_class=_HelpFormatter
    )
    report.add_arguments(parser)
    return report.run(parser.parse_args(args.own_options))


# --------------------------------------------------------------------------- entry point

#: Subcommand registrars, in help order: ``register(subparsers)`` adds one command.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_fit_command,
    add_compete_command,
    add_report_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmonf`` parser with every subcommand in :data:`COMMANDS`."""
    parser = _Parser(
        prog=PROG,
        description=(
            "Mixtures of normalizing flows: fit VMoNF (variational mixture of flows) "
            "or train one competitively, and compare it with a known truth."
        ),
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for register in COMMANDS:
        register(subparsers)
    return parser


# Estimator parameters as the commands' options, for the estimators' own messages
# ("raise max_time" -> "raise --max-time"). Names that are ordinary words too (init,
# device, ...) are translated only as name=value.
PARAMETER_FLAGS = {
    "n_components": "--components", "max_epochs": "--epochs", "max_time": "--max-time",
    "batch_size": "--batch-size", "learning_rate": "--lr", "random_state": "--seed",
    "n_layers": "--layers", "hidden_features": "--hidden", "init_steps": "--init-steps",
    "elbo_top_k": "--elbo-top-k", "base_df": "--base-df", "max_rounds": "--rounds",
    "pretrain_epochs": "--pretrain-epochs", "tol": "--tol", "init": "--init",
    "objective": "--objective", "temperature": "--temperature", "device": "--device",
    "assignment": "--assignment", "generator": "--generator",
}  # fmt: skip


# The options of the command that runs (None: every option), for in_cli_terms.
_COMMAND_OPTIONS: ContextVar[frozenset[str] | None] = ContextVar("options", default=None)
_ASSIGNMENT = re.compile(r'(\(?)(\w+)=("[^"]*"|[-+.\w]+)([),.;:]*)')  # tol=0.02: init="x")
_WORD = re.compile(r"(\(?)(\w+)([),.;:]*)")  # max_time, max_rounds)


def in_cli_terms(message: str, options: Collection[str] | None = None) -> str:
    """An estimator's message with its parameter names as the command's ``options``
    (default: the running command's): ``raise max_rounds or tol (e.g. tol=0.02: ...)``
    -> ``raise --rounds or --tol (e.g. --tol 0.02: ...)``. Only whole words outside
    paths and quotes, and only names the command has an option for."""
    options = _COMMAND_OPTIONS.get() if options is None else options

    def flag_of(name: str) -> str | None:
        flag = PARAMETER_FLAGS.get(name)
        return flag if flag is not None and (options is None or flag in options) else None

    def translated(word: str) -> str:
        if "/" in word or "\\" in word:  # a path: its folders may be named anything
            return word
        if (match := _ASSIGNMENT.fullmatch(word)) and (flag := flag_of(match[2])):
            return f"{match[1]}{flag} {match[3].strip(chr(34))}{match[4]}"
        bare = _WORD.fullmatch(word)
        if bare and ("_" in bare[2] or bare[2] == "tol") and (flag := flag_of(bare[2])):
            return f"{bare[1]}{flag}{bare[3]}"  # plain words (init, device) only as name=
        return word

    return "".join(translated(part) for part in re.split(r"(\s+)", message))


def _command_options(parser: argparse.ArgumentParser, command: str) -> frozenset[str]:
    """The option strings of ``parser``'s subcommand ``command``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            sub = action.choices[command]
            return frozenset(s for a in sub._actions for s in a.option_strings)
    return frozenset()


def _fail(message: object, status: int, translate: bool = True) -> int:
    """Print the one-line error; the estimators' messages in the command's terms (not an
    OSError's: its paths are the user's)."""
    text = " ".join(str(message).split()) or "failed"
    print(f"{PROG}: error: {in_cli_terms(text) if translate else text}", file=sys.stderr)
    return status


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings as ``vmonf: warning: ...`` lines, without Python's source location."""
    text = in_cli_terms(str(message))
    print(f"{PROG}: warning: {text}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vmonf`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return copy_context().run(_main, argv)  # the command's options stay in this run


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args, rest = parser.parse_known_args(argv)
        _COMMAND_OPTIONS.set(_command_options(parser, args.command))
        if rest and not getattr(args, "takes_own_options", False):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.own_options = rest
        if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
            args.check_only = True  # errors once, here, not once per rank
            args.handler(args)
            return _relaunch_under_torchrun(argv, args.nproc)
        return int(args.handler(args))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        return _fail(exc, 2)
    except (ValueError, TypeError) as exc:
        return _fail(exc, 2)
    except NonFiniteLossError as exc:
        return _fail(f"training failed: {exc}", 1)
    except OSError as exc:
        return _fail(exc, 1, translate=False)
    except TrainingInterrupted as exc:
        print(f"{PROG}: {exc}; run the same command with --resume to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
