"""Reproduce the toy experiments of the VMoNF paper/talk (Pires & Figueiredo, 2020).

    python demos/vmonf_paper.py [--out demos/out] [--quick]

* pinwheel, 5 wings, unsupervised (2560 points);
* two circles, unsupervised: the reported failure mode (a split into half-planes);
* two circles, semi-supervised: 32 labelled + 1024 unlabelled points.

Each experiment writes density, samples, q(c|x) regions and training curves (PNG)
under ``--out/<name>/`` and prints held-out scores against the true density.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vmonf import VMoNF, datasets
from vmonf.reporting import evaluate_on_toy, partial_labels, plot_bounds, write_figures

EXPERIMENTS = {
    "pinwheel": dict(toy="pinwheel", n_train=2560, labels=0, params=dict(max_epochs=200)),
    "two_circles_unsupervised": dict(
        toy="two_circles", n_train=1024, labels=0, params=dict(max_epochs=200, batch_size=128)
    ),
    "two_circles_32_labels": dict(
        toy="two_circles", n_train=1056, labels=32, params=dict(max_epochs=200, batch_size=128)
    ),
}


def run(name: str, spec: dict, out: Path, quick: bool, seed: int = 0) -> None:
    toy = datasets.toy(spec["toy"])
    X, y = toy.sample(spec["n_train"], seed=seed)
    X_test, y_test = toy.sample(4096, seed=seed + 1)
    labelled = spec["labels"] > 0
    y_fit = partial_labels(y, spec["labels"], toy.n_classes, seed) if labelled else None
    params = {**spec["params"], **({"max_epochs": 20} if quick else {})}
    model = VMoNF(toy.n_classes, random_state=seed, **params).fit(X, y_fit)
    scores = evaluate_on_toy(model, toy, X_test, y_test, labelled=labelled)
    write_figures(
        model, toy, X_test, y_test, out / name, plot_bounds(X), labelled=labelled,
        history=model.history_,
    )  # fmt: skip
    line = ", ".join(
        f"{k} {scores[k]:.3f}"
        for k in ("kl_to_truth", "ari", "accuracy", "amortization_gap")
        if scores[k] == scores[k]  # skip NaN
    )
    print(f"{name}: {line}  -> {out / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demos/out"))
    parser.add_argument("--quick", action="store_true", help="20 epochs each (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, spec in EXPERIMENTS.items():
        run(name, spec, args.out, args.quick)


if __name__ == "__main__":
    main()
