"""Image benchmarks (issue 8): clustering digits and MNIST, competitive sample quality on MNIST.

    python benchmarks/images.py digits [--seeds 5] [--jobs 2]
    python benchmarks/images.py cluster [--dataset mnist] [--seeds 3] [--jobs 2]
    python benchmarks/images.py compete [--seeds 1] [--jobs 2] [--cases kflows,bag-flows]

* ``digits``: VMoNF (K = 10) on all 1797 of scikit-learn's 8x8 digits, next to
  KMeans and GaussianMixture on the same PCA features (and KMeans on raw pixels);
* ``cluster``: VMoNF (K = 5) on the training images of digits 0-4 (``--classes``),
  scored on the test split; ``--dataset fashion_mnist --classes 0-9`` works too;
* ``compete``: competitive mixtures of flows and of VAEs (discriminator assignment,
  as the paper) vs bagging vs one larger model on MNIST, all behind the same
  PCA front-end: Fréchet LeNet distance (FLD) of 10,000 samples to the 10,000 test
  images, the LeNet's label histogram of the samples, and test bits/dim (exact for
  flows, an ELBO bound for VAEs), with real-vs-real and PCA-reconstruction rows.

Each fit runs in its own process with one torch thread (``--jobs`` at once); the
CPU time of every fit (``time.process_time`` in its process) is summed and printed.
Prints markdown tables and writes results/images_<suite>.json and .md;
``--figures DIR`` also writes, for seed 0, samples per component and real images
per component (PNG).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import run_parallel, summary, write_results
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from competitive import CompetitiveMixture, bagging, single_model
from vmonf import VMoNF, datasets, metrics
from vmonf import image_metrics as im
from vmonf.image_transforms import ImageTransform, dequantize, quantize
from vmonf.images import ImageMixture
from vmonf.plots import plot_component_images
from vmonf.reporting import markdown_table, mean_sd

# ----------------------------------------------------------------------- clustering settings
# Front-end and VMoNF settings per data set (chosen on digits seeds 0-2; see README).
CLUSTER = {
    "digits": dict(
        wrap=dict(pca_components=16, logit_alpha=None),
        vmonf=dict(max_epochs=60, linear=True, n_layers=2, objective="marginal"),
    ),
    "mnist": dict(
        wrap=dict(pca_components=16, logit_alpha=None),
        vmonf=dict(max_epochs=30, linear=True, n_layers=2, objective="marginal"),
    ),
}
CLUSTER["fashion_mnist"] = CLUSTER["mnist"]

# ----------------------------------------------------------------------- competitive settings
N_GENERATED = 10_000
COMPETE_WRAP = dict(pca_components=64, logit_alpha=0.05)
K_COMPETE = 10
FLOW = dict(
    generator="flow", n_layers=4, hidden_features=64, activation="tanh", linear=True,
    batch_size=256, learning_rate=2e-3, lr_schedule="cosine",
)  # fmt: skip
VAE = dict(
    generator="vae", hidden_features=128, latent_features=8, batch_size=128,
    learning_rate=2e-3, lr_schedule="cosine",
)  # fmt: skip
ROUNDS = dict(init="kmeans", pretrain_epochs=6, max_epochs=3, max_rounds=4, tol=1e-3)
DISCRIMINATORS = dict(
    assignment="discriminator", discriminator_hidden=64, discriminator_batch_size=256,
    discriminator_learning_rate=2e-3, discriminator_epochs=1,
)  # fmt: skip
EPOCHS = ROUNDS["pretrain_epochs"] + ROUNDS["max_epochs"] * ROUNDS["max_rounds"]
COMPETE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (method, estimator settings); baselines get the competitive run's total epochs
    "kflows": ("competitive", {**FLOW, **ROUNDS}),
    "bag-flows": ("bag", {**FLOW, "epochs": EPOCHS}),
    "flow-large": ("single", {**FLOW, "hidden_features": 256, "epochs": EPOCHS}),
    "kVAEs": ("competitive", {**VAE, **ROUNDS, **DISCRIMINATORS}),
    "bag-VAEs": ("bag", {**VAE, "epochs": EPOCHS}),
    "VAE-large": ("single", {**VAE, "hidden_features": 512, "epochs": EPOCHS}),
}


def _cpu() -> float:
    return time.process_time()


def clustering_scores(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict[str, Any]:
    """Accuracy (Hungarian), NMI, ARI and per-cluster purity of a clustering."""
    purity = metrics.cluster_purity(y_true, y_pred, n_clusters=k)
    return {
        "accuracy": metrics.clustering_accuracy(y_true, y_pred),
        "nmi": metrics.normalized_mutual_info(y_true, y_pred),
        "ari": metrics.adjusted_rand_index(y_true, y_pred),
        "purity": purity.tolist(),
        "mean_purity": float(np.nanmean(purity)),
    }


def _relabel(y: np.ndarray) -> np.ndarray:
    """Class labels -> 0..C-1 (e.g. a class subset 5..9 -> 0..4)."""
    return np.searchsorted(np.unique(y), y)


def write_component_figures(
    model: ImageMixture, X_real: np.ndarray, k: int, out: Path, name: str, seed: int
) -> list[str]:
    """Samples per component and real images per (predicted) component, as PNGs.

    Samples are drawn with the PCA front-end's discarded axes at their mean (as VAE
    figures show decoder means); the FLD table reports both kinds.
    """
    samples, components = model.sample(20 * k, random_state=seed, residual_noise=False)
    paths = [
        plot_component_images(
            samples, components, out / f"{name}_samples.png", n_components=k,
            title=f"{name}: samples per component (PCA mean)",
        ),
        plot_component_images(
            X_real, model.predict(X_real), out / f"{name}_clusters.png", n_components=k,
            title=f"{name}: real images per component",
        ),
    ]  # fmt: skip
    return [str(p) for p in paths]


# ----------------------------------------------------------------------- clustering


def run_cluster(
    dataset: str, classes: list[int] | None, seed: int, figures: Path | None
) -> dict[str, Any]:
    """Fit VMoNF and the baselines once; clustering scores on the evaluation split."""
    cpu, wall = _cpu(), time.perf_counter()
    fit_split, eval_split = ("all", "all") if dataset == "digits" else ("train", "test")
    X, y = datasets.images(dataset, fit_split, classes)
    X_eval, y_eval = datasets.images(dataset, eval_split, classes)
    k = int(np.unique(y).size)
    settings = CLUSTER[dataset]
    model = ImageMixture(
        VMoNF(k, random_state=seed, **settings["vmonf"]),
        n_levels=datasets.n_levels(dataset),
        random_state=seed,
        **settings["wrap"],
    ).fit(X)
    fit_cpu, fit_wall = _cpu() - cpu, time.perf_counter() - wall
    y_true = _relabel(y_eval)
    result: dict[str, Any] = {
        "dataset": dataset, "seed": seed, "k": k, "n_fit": int(X.shape[0]),
        "n_eval": int(X_eval.shape[0]), "fit_cpu": fit_cpu, "fit_wall": fit_wall,
        "vmonf": clustering_scores(y_true, model.predict(X_eval), k),
        "vmonf_exact": clustering_scores(y_true, model.predict(X_eval, posterior="exact"), k),
        "bits_per_dim": model.bits_per_dim(X_eval),
    }  # fmt: skip
    result["contingency"] = metrics.contingency_table(
        y_true, model.predict(X_eval), n_clusters=k
    ).tolist()
    features, features_eval = model.transform(X), model.transform(X_eval)
    km = KMeans(k, n_init=10, random_state=seed).fit(features)
    result["kmeans"] = clustering_scores(y_true, km.predict(features_eval), k)
    gmm = GaussianMixture(k, covariance_type="full", n_init=3, random_state=seed).fit(features)
    result["gmm"] = clustering_scores(y_true, gmm.predict(features_eval), k)
    raw = X.reshape(X.shape[0], -1) / (datasets.n_levels(dataset) - 1)
    km_raw = KMeans(k, n_init=10, random_state=seed).fit(raw)
    raw_eval = X_eval.reshape(X_eval.shape[0], -1) / (datasets.n_levels(dataset) - 1)
    result["kmeans_pixels"] = clustering_scores(y_true, km_raw.predict(raw_eval), k)
    if figures is not None and seed == 0:
        name = f"vmonf_{dataset}_k{k}"
        result["figures"] = write_component_figures(model, X_eval, k, figures, name, seed)
    result["cpu"] = _cpu() - cpu
    return result


CLUSTER_METHODS = (
    ("VMoNF", "vmonf"), ("VMoNF (exact posterior)", "vmonf_exact"), ("KMeans", "kmeans"),
    ("GaussianMixture (full)", "gmm"), ("KMeans on pixels", "kmeans_pixels"),
)  # fmt: skip


def cluster_table(results: list[dict], target: float | None) -> str:
    header = ["method", "accuracy", "NMI", "ARI", "mean purity", "seeds"]
    rows = []
    for label, key in CLUSTER_METHODS:
        col = lambda m, key=key: mean_sd([r[key][m] for r in results])  # noqa: E731
        rows.append([label, col("accuracy"), col("nmi"), col("ari"), col("mean_purity"),
                     len(results)])  # fmt: skip
    lines = [markdown_table(header, rows)]
    bpd = mean_sd([r["bits_per_dim"] for r in results])
    fit = mean_sd([r["fit_cpu"] for r in results])
    lines.append(f"\nVMoNF evaluation bits/dim {bpd}; VMoNF fit CPU time {fit} s per seed.")
    if target is not None:
        met = sum(r["vmonf"]["accuracy"] >= target for r in results)
        lines.append(f"Target accuracy >= {target:.0%}: {met}/{len(results)} seeds.")
    else:
        wins = sum(
            r["vmonf"]["accuracy"] > max(r["kmeans"]["accuracy"], r["gmm"]["accuracy"])
            for r in results
        )
        lines.append(f"VMoNF beats KMeans and GaussianMixture in {wins}/{len(results)} seeds.")
    return "\n".join(lines)


# ----------------------------------------------------------------------- competitive


def build_compete(case: str, seed: int) -> CompetitiveMixture:
    method, params = COMPETE_CASES[case]
    if method == "bag":
        return bagging(K_COMPETE, random_state=seed, **params)
    if method == "single":
        return single_model(random_state=seed, **params)
    return CompetitiveMixture(K_COMPETE, random_state=seed, **params)


def run_compete(case: str, seed: int, n_train: int, figures: Path | None) -> dict[str, Any]:
    """Fit one model on MNIST train; FLD of its samples to the test set, bits/dim."""
    cpu, wall = _cpu(), time.perf_counter()
    X, _ = datasets.images("mnist", "train")
    X = X[np.random.default_rng(seed).permutation(X.shape[0])[:n_train]]
    X_test, _ = datasets.images("mnist", "test")
    model = ImageMixture(build_compete(case, seed), random_state=seed, **COMPETE_WRAP).fit(X)
    fit_cpu, fit_wall = _cpu() - cpu, time.perf_counter() - wall
    net = im.lenet("mnist")
    samples, _ = model.sample(N_GENERATED, random_state=seed)
    smooth, _ = model.sample(N_GENERATED, random_state=seed, residual_noise=False)
    exact = model.estimator_.generator != "vae"
    result: dict[str, Any] = {
        "case": case, "seed": seed, "n_train": int(X.shape[0]), "fit_cpu": fit_cpu,
        "fit_wall": fit_wall, "rounds": model.estimator_.n_iter_,
        "weights": model.estimator_.weights_.tolist(),
        "fld": im.frechet_lenet_distance(samples, X_test, net).as_dict(),
        "fld_pca_mean": im.frechet_lenet_distance(smooth, X_test, net).distance,
        "label_histogram": im.label_histogram(samples, net).tolist(),
        "bits_per_dim": model.bits_per_dim(X_test, bound=not exact),
        "bits_per_dim_exact": exact,
    }  # fmt: skip
    if figures is not None and seed == 0:
        k = model.estimator_.n_components
        result["figures"] = write_component_figures(model, X_test, k, figures, case, seed)
    result["cpu"] = _cpu() - cpu
    return result


def compete_baselines(seed: int) -> dict[str, Any]:
    """Real-vs-real FLD (random halves of the test set) and the PCA front-end's floor."""
    cpu = _cpu()
    net = im.lenet("mnist")
    X_test, _ = datasets.images("mnist", "test")
    X_train, _ = datasets.images("mnist", "train")
    order = np.random.default_rng(seed).permutation(X_test.shape[0])
    half = X_test.shape[0] // 2
    real = im.frechet_lenet_distance(X_test[order[:half]], X_test[order[half:]], net)
    train = im.frechet_lenet_distance(X_train[:N_GENERATED], X_test, net)
    # The front-end alone: test images through PCA and back (discarded axes at their mean).
    flat_train = X_train.reshape(X_train.shape[0], -1)
    transform = ImageTransform(256, **COMPETE_WRAP, image_shape=(28, 28))
    transform.fit(dequantize(flat_train, 256, np.random.default_rng(seed)))
    flat = X_test.reshape(X_test.shape[0], -1)
    recon = quantize(transform.inverse(transform.forward(dequantize(flat, 256))[0]), 256)
    pca = im.frechet_lenet_distance(recon.reshape(X_test.shape), X_test, net)
    return {
        "real_vs_real": real.as_dict(),
        "train_vs_test": train.as_dict(),
        "pca_reconstruction": pca.as_dict(),
        "lenet_test_accuracy": net.test_accuracy,
        "cpu": _cpu() - cpu,
    }


def compete_table(results: list[dict], baselines: dict[str, Any]) -> str:
    header = [
        "model", "FLD (samples)", "FLD (PCA mean of samples)", "bits/dim (test)",
        "classes seen (LeNet, min-max share %)", "fit CPU (s)",
    ]  # fmt: skip
    rows = []
    for case in COMPETE_CASES:
        rs = [r for r in results if r["case"] == case]
        if not rs:
            continue
        hist = np.asarray(rs[0]["label_histogram"], dtype=float)
        share = 100 * hist / hist.sum()
        bound = "" if rs[0]["bits_per_dim_exact"] else " (ELBO bound)"
        rows.append([
            case, mean_sd([r["fld"]["distance"] for r in rs]),
            mean_sd([r["fld_pca_mean"] for r in rs]),
            mean_sd([r["bits_per_dim"] for r in rs]) + bound,
            f"{int((hist > 0).sum())} ({share.min():.1f}-{share.max():.1f})",
            mean_sd([r["fit_cpu"] for r in rs]),
        ])  # fmt: skip
    for label, key in (
        ("real test half vs other half", "real_vs_real"),
        ("10,000 train images vs test", "train_vs_test"),
        ("test images through the PCA front-end", "pca_reconstruction"),
    ):
        rows.append([label, f"{baselines[key]['distance']:.3f}", "", "", "", ""])
    return markdown_table(header, rows)


# ----------------------------------------------------------------------- main


def _classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("suite", choices=["digits", "cluster", "compete"])
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--classes", default="0-4", help="e.g. 0-4 or 0,1,7 (cluster suite)")
    parser.add_argument("--cases", help="comma-separated compete cases (default: all)")
    parser.add_argument("--n-train", type=int, default=60_000, help="compete: training images")
    parser.add_argument("--figures", type=Path, help="write seed-0 component figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.suite in ("digits", "cluster"):
        dataset = "digits" if args.suite == "digits" else args.dataset
        classes = None if args.suite == "digits" else _classes(args.classes)
        seeds = args.seeds or (5 if args.suite == "digits" else 3)
        jobs = [(dataset, classes, seed, args.figures) for seed in range(seeds)]
        results = run_parallel(run_cluster, jobs, args.jobs)
        for r in results:
            print(
                f"{dataset} seed {r['seed']}: VMoNF {r['vmonf']['accuracy']:.3f}  "
                f"KMeans {r['kmeans']['accuracy']:.3f}  GMM {r['gmm']['accuracy']:.3f}  "
                f"bits/dim {r['bits_per_dim']:.3f}  cpu {r['cpu']:.0f}s",
                flush=True,
            )
        target = 0.85 if dataset == "mnist" and classes == list(range(5)) else None
        md = cluster_table(results, target)
        name = "digits" if dataset == "digits" else f"{dataset}_{args.classes.replace(',', '')}"
        payload: dict[str, Any] = {"results": results, "settings": CLUSTER[dataset]}
    else:
        cases = args.cases.split(",") if args.cases else list(COMPETE_CASES)
        unknown = set(cases) - set(COMPETE_CASES)
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; choose from {list(COMPETE_CASES)}")
        im.lenet("mnist")  # train and cache the LeNet once, before the workers need it
        seeds = args.seeds or 1
        jobs = [(c, s, args.n_train, args.figures) for c in cases for s in range(seeds)]
        results = run_parallel(run_compete, jobs, args.jobs)
        for r in results:
            print(
                f"{r['case']:>12} seed {r['seed']}: FLD {r['fld']['distance']:.2f}  "
                f"bits/dim {r['bits_per_dim']:.3f}  cpu {r['cpu']:.0f}s",
                flush=True,
            )
        baselines = compete_baselines(0)
        md = compete_table(results, baselines)
        name = "compete"
        payload = {
            "results": results,
            "baselines": baselines,
            "settings": {"wrap": COMPETE_WRAP, "k": K_COMPETE, "cases": COMPETE_CASES},
        }
        results = [*results, baselines]
    cpu = float(sum(r["cpu"] for r in results))
    wall = time.perf_counter() - started
    md += (
        f"\n\nCPU time used: {cpu:.0f} s (sum over fits, one torch thread each); wall {wall:.0f} s."
    )
    path = write_results(f"images_{name}", {**payload, "cpu_time": cpu, "wall_time": wall}, md)
    print(f"\n## images {name}\n\n{md}\n\nwrote {path}", flush=True)


if __name__ == "__main__":
    main()
