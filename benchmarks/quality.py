"""Quality benchmarks: held-out KL to the true density, ARI, semi-supervised accuracy.

    python benchmarks/quality.py single-flow          # issue 2: one flow, skewed_gmm 3 modes
    python benchmarks/quality.py vmonf [--seeds 5]    # issue 3: VMoNF on the toy suite

Each fit runs in its own process with one torch thread (``--jobs`` processes at
once). Prints a markdown table and writes results/<name>.json and .md. Every
VMoNF case is set beside scikit-learn's GaussianMixture with the same K.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _common import run_parallel, summary, write_results
from sklearn.mixture import GaussianMixture

from vmonf import VMoNF, datasets
from vmonf.reporting import evaluate_on_toy, markdown_table, mean_sd, partial_labels


@dataclass(frozen=True)
class Case:
    """One benchmark setting: a toy, data sizes, labels, estimator settings and targets."""

    name: str
    toy: str
    toy_params: dict[str, Any] = field(default_factory=dict)
    n_train: int = 2560
    n_test: int = 4096
    n_labelled: int = 0
    n_components: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)


# Paper-scale toys: the estimator's defaults (tanh, 32 wide, wd 1e-4).
SMALL_DATA = dict(max_epochs=200)
SKEWED = dict(batch_size=512, max_epochs=150)

# Pinwheel's far wing tips curl beyond the training data; a Gaussian base gives them
# vanishing density (most of the KL), a Student-t base (20 degrees of freedom) does not.
PINWHEEL = {**SMALL_DATA, "base_df": 20.0}

VMONF_CASES = [
    Case("pinwheel", "pinwheel", params=PINWHEEL, targets={"kl_max": 0.05, "ari_min": 0.95}),
    Case(
        "pinwheel_gaussian_base",
        "pinwheel",
        params=SMALL_DATA,
        targets={"kl_max": 0.05, "ari_min": 0.95},
    ),
    *[
        Case(
            f"skewed_gmm_{m}",
            "skewed_gmm",
            {"n_modes": m},
            n_train=12800,
            n_test=6400,
            params=SKEWED,
            targets={"kl_max": 0.03, "ari_min": 0.99},
        )
        for m in (3, 6, 9)
    ],
    Case(
        "two_circles_32_labels",
        "two_circles",
        n_train=1056,
        n_labelled=32,
        params={**SMALL_DATA, "batch_size": 128},
        targets={"accuracy_min": 0.995},
    ),
    Case(
        "pinwheel_2_labels_per_wing",
        "pinwheel",
        n_labelled=10,
        params=SMALL_DATA,
        targets={"accuracy_min": 0.98},
    ),
]

SINGLE_FLOW = Case(
    "single_flow_skewed_gmm_3",
    "skewed_gmm",
    {"n_modes": 3},
    n_train=64000,
    n_test=6400,
    n_components=1,
    params=dict(
        objective="marginal",
        activation="relu",
        weight_decay=0.0,
        n_layers=8,
        hidden_features=64,
        batch_size=512,
        learning_rate=2e-3,
        max_epochs=80,
    ),
    targets={"kl_max": 0.03},
)


def run_case(case: Case, seed: int, with_gmm: bool) -> dict[str, Any]:
    """Fit VMoNF (and GaussianMixture) on one seed of ``case``; held-out metrics."""
    toy = datasets.toy(case.toy, **case.toy_params)
    X, y = toy.sample(case.n_train, seed=seed)
    X_test, y_test = toy.sample(case.n_test, seed=seed + 10_000)
    k = case.n_components or toy.n_classes
    labelled = case.n_labelled > 0
    y_fit = partial_labels(y, case.n_labelled, k, seed) if labelled else None
    started = time.perf_counter()
    model = VMoNF(k, random_state=seed, **case.params).fit(X, y_fit)
    result = {
        "case": case.name,
        "seed": seed,
        "fit_time": time.perf_counter() - started,
        "epochs": model.n_iter_,
        **evaluate_on_toy(model, toy, X_test, y_test, labelled=labelled),
    }
    if with_gmm:
        started = time.perf_counter()
        gmm = GaussianMixture(k, n_init=3, random_state=seed).fit(X)
        gmm_metrics = evaluate_on_toy(gmm, toy, X_test, y_test)
        result["gmm_fit_time"] = time.perf_counter() - started
        result["gmm_kl_to_truth"] = gmm_metrics["kl_to_truth"]
        result["gmm_ari"] = gmm_metrics["ari"]
    return result


def passes(case: Case, r: dict[str, Any]) -> bool:
    """Whether one seed's result meets every target of its case."""
    t = case.targets
    return bool(
        r["kl_to_truth"] <= t.get("kl_max", np.inf)
        and r["ari"] >= t.get("ari_min", -np.inf)
        and (r["accuracy"] >= t["accuracy_min"] if "accuracy_min" in t else True)
    )


def table(cases: list[Case], results: list[dict[str, Any]]) -> str:
    header = [
        "case", "KL to truth (nats)", "ARI", "accuracy", "amortisation gap", "fit time (s)",
        "seeds meeting target", "GMM KL", "GMM ARI", "GMM time (s)",
    ]  # fmt: skip
    rows = []
    for case in cases:
        rs = [r for r in results if r["case"] == case.name]
        if not rs:
            continue

        def col(key: str, rs: list[dict[str, Any]] = rs) -> str:
            return mean_sd([r.get(key, np.nan) for r in rs])

        met = sum(passes(case, r) for r in rs)
        rows.append([
            case.name, col("kl_to_truth"), col("ari"), col("accuracy"), col("amortization_gap"),
            col("fit_time"), f"{met}/{len(rs)}", col("gmm_kl_to_truth"), col("gmm_ari"),
            col("gmm_fit_time"),
        ])  # fmt: skip
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("suite", choices=["single-flow", "vmonf"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    if args.suite == "single-flow":
        cases, seeds, with_gmm = [SINGLE_FLOW], range(1), False
    else:
        cases, seeds, with_gmm = VMONF_CASES, range(args.seeds), True
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    jobs = [(case, seed, with_gmm) for case in cases for seed in seeds]
    started = time.perf_counter()
    results = run_parallel(run_case, jobs, args.jobs)
    for r in results:
        print(
            f"{r['case']:>28} seed {r['seed']}: KL {r['kl_to_truth']:.4f}  ARI {r['ari']:.4f}  "
            f"acc {r['accuracy']:.4f}  gap {r['amortization_gap']:.3f}  {r['fit_time']:.0f}s",
            flush=True,
        )
    md = table(cases, results)
    targets = {c.name: c.targets for c in cases}
    path = write_results(
        args.suite.replace("-", "_") + ("" if not args.cases else "_" + "_".join(sorted(wanted))),
        {"results": results, "targets": targets, "wall_time": time.perf_counter() - started},
        md,
    )
    print(md)
    print(f"\nwall time {time.perf_counter() - started:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
