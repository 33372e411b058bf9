"""Speed on a CUDA GPU: the training step against K, scoring by chunk size, and fits.

    python benchmarks/gpu.py                 # every section (a few minutes on an H100)
    python benchmarks/gpu.py --quick         # smaller sizes, for development
    python benchmarks/gpu.py --sections step,score

Sections: ``step`` (the VMoNF training step for K = 1 ... 20 against one flow, and
K = 5 against a Python loop over 5 nflows ``Flow``s, for three architectures),
``score`` (``score_samples`` and ``sample`` throughput for N = 1e4 ... 1e7 at several
chunk sizes, with the GPU memory each call adds at its peak), ``fit`` (fit time
against N and time to quality on pinwheel, as ``speed.py``'s sections of those names,
on the GPU).

The contenders and the timing (interleaved rounds, median round) are
``speed.py``'s; every timed call ends with ``torch.cuda.synchronize()``. Writes
results/gpu.json and .md (results/gpu_<sections>.* for a subset).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from _common import summary, write_results
from speed import (
    DEFAULT,
    LARGE,
    WIDE,
    Arch,
    Section,
    _kl_trace,
    _titled,
    cpu_model,
    fit_times,
    interleaved,
    loop_step,
    ms,
    run_sections,
    vmonf_step,
)

import vmonf.flows
import vmonf.training
from vmonf import VMoNF, datasets
from vmonf.reporting import markdown_table

CUDA = "cuda"
KS = (1, 2, 5, 10, 20)


def synced(run: Callable[[], int]) -> Callable[[], int]:
    """``run`` followed by waiting for the GPU, so that wall time covers its kernels."""

    def call() -> int:
        n = run()
        torch.cuda.synchronize()
        return n

    return call


def section_step(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Training step on the GPU: K = 1 ... 20 against K = 1, and K = 5 against the loop."""
    rows, results = [], []
    arches: list[Arch] = [DEFAULT, WIDE, LARGE]
    for arch in arches:
        contenders = {str(k): synced(vmonf_step(k, arch, args.steps, device=CUDA)) for k in KS}
        contenders["loop"] = synced(loop_step(5, arch, args.steps, device=CUDA))
        t = interleaved(contenders, args.rounds)
        wall = {name: v["wall"] for name, v in t.items()}
        ratios = {k: wall[str(k)] / wall["1"] for k in KS}
        loop_ratio = wall["5"] / wall["loop"]
        results.append({"arch": asdict(arch), "times": t, "ratios": ratios,
                        "loop_ratio": loop_ratio})  # fmt: skip
        rows.append([
            arch.name, *(f"{ms(wall[str(k)])} ({ratios[k]:.2f}x)" for k in KS),
            ms(wall["loop"]), f"{loop_ratio:.2f}",
        ])  # fmt: skip
    header = [
        "architecture", *(f"K = {k}" for k in KS), "nflows loop, K = 5 (ms)",
        "K = 5 / loop",
    ]  # fmt: skip
    title = (
        "Training step on the GPU (ms; ratio to K = 1), VMoNF exact ELBO, and K = 5 against "
        f"a Python loop over 5 nflows Flows (median of {args.rounds} interleaved rounds)"
    )
    return {"cases": results}, _titled(title, markdown_table(header, rows))


def _timed(call: Callable[[], object], repeats: int) -> float:
    """Mean seconds of ``call`` (after one untimed run), the GPU synchronised."""
    call()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def section_score(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """score_samples and sample on the GPU by chunk size: points per second and the GPU
    memory the call adds at its peak."""
    X_fit, _ = datasets.toy("pinwheel", n_classes=5).sample(2560, seed=0)
    model = VMoNF(5, max_epochs=2, random_state=0, device=CUDA).fit(X_fit)
    sizes = [10**e for e in range(4, 6 if args.quick else 8)]
    chunks = {"score": (4096, 65536, 262144, 1048576), "sample": (65536, 262144, 1048576)}
    defaults = {"score": vmonf.training.GPU_EVAL_CHUNK, "sample": vmonf.flows.SAMPLE_CHUNK}
    results, rows = [], []
    try:
        for what, chunk_sizes in chunks.items():
            for chunk in chunk_sizes:
                vmonf.training.GPU_EVAL_CHUNK = chunk if what == "score" else defaults["score"]
                vmonf.flows.SAMPLE_CHUNK = chunk if what == "sample" else defaults["sample"]
                for n in sizes:
                    X = np.random.default_rng(0).normal(size=(n, 2))

                    def call(X: np.ndarray = X, n: int = n, what: str = what) -> object:
                        if what == "score":
                            return model.score_samples(X)
                        return model.sample(n, random_state=0)

                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    seconds = _timed(call, max(1, 1_000_000 // n))
                    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                    results.append({"what": what, "chunk": chunk, "n": n, "seconds": seconds,
                                    "points_per_s": n / seconds, "gpu_peak_mib": peak})  # fmt: skip
                    rows.append([what, chunk, f"{n:.0e}", f"{n / seconds:,.0f}", f"{seconds:.3f}",
                                 f"{peak:.0f}"])  # fmt: skip
    finally:
        vmonf.training.GPU_EVAL_CHUNK = defaults["score"]
        vmonf.flows.SAMPLE_CHUNK = defaults["sample"]
    header = ["call", "chunk (points)", "N", "points / s", "seconds", "GPU memory added (MiB)"]
    title = (
        "score_samples / sample on the GPU, VMoNF K = 5 (defaults), by chunk size "
        f"(defaults: score {defaults['score']}, sample {defaults['sample']})"
    )
    return {"results": results, "defaults": defaults}, _titled(title, markdown_table(header, rows))


def section_fit(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Fit time vs N, and time to quality on pinwheel, on the GPU."""
    sizes = [10**e for e in range(3, 5 if args.quick else 7)]
    fits, fit_table = fit_times(sizes, device=CUDA)
    quality = [_kl_trace(seed, device=CUDA) for seed in range(1 if args.quick else 2)]
    rows = [[q["seed"], f"{q['reached_s']:.0f}" if q["reached_s"] is not None else "not reached",
             f"{q['final_kl']:.3f} at {q['fit_s']:.0f} s"] for q in quality]  # fmt: skip
    quality_table = markdown_table(["seed", "time to KL <= 0.05 (s)", "final KL"], rows)
    text = "\n\n".join([
        _titled("Fit time vs N on the GPU: VMoNF K = 5 defaults on pinwheel (k-means and "
                "300 pre-training steps, then 2 epochs)", fit_table),
        _titled("Time to quality on the GPU: VMoNF on pinwheel, speed.py's quality "
                "settings, held-out KL to truth (nats)", quality_table),
    ])  # fmt: skip
    return {"fit": fits, "quality": quality}, text


SECTIONS: dict[str, Section] = {
    "step": section_step,
    "score": section_score,
    "fit": section_fit,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures one (speed.py measures the CPU)")
    args.rounds, args.steps = (3, 5) if args.quick else (7, 20)
    torch.set_num_threads(1)
    started = time.perf_counter()
    names, payload, tables = run_sections(parser, args, SECTIONS)
    props = torch.cuda.get_device_properties(0)
    run = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": props.total_memory / 2**30,
        "cuda": torch.version.cuda,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": 1,
        "quick": args.quick,
        "wall_time_s": time.perf_counter() - started,
    }
    footer = (
        f"Machine: {run['gpu']} ({run['gpu_memory_gib']:.0f} GiB), CUDA {run['cuda']}, torch "
        f"{torch.__version__}; host {run['cpu_model']}, {run['cpu_cores']} cores, 1 torch thread."
    )
    name = "gpu" if not args.sections else "gpu_" + "_".join(names)
    if args.quick:
        name += "_quick"
    path = write_results(name, {"run": run, **payload}, "\n\n".join([*tables, footer]))
    print(footer)
    print(f"\nwall time {run['wall_time_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
