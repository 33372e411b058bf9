"""Speed benchmarks (issue 6): K flows at close to the cost of one, against the alternatives.

    python benchmarks/speed.py                      # every section (about 16 minutes)
    python benchmarks/speed.py --quick              # smaller sizes, for development
    python benchmarks/speed.py --sections loop,scaling

Sections, run in this order: ``compile`` (torch.compile: step time and a cold-start
warm-up), ``loop`` (training step, K = 5: batched, eager and compiled, vs a Python loop
over 5 nflows ``Flow``s), ``split`` (the same step split over two cores as two
processes on half the batch each: a lower bound for two threads), ``scaling`` (K = 1
... 20 vs one flow), ``threads``,
``malloc`` (the step under glibc's malloc thresholds and under :mod:`vmonf.heap`'s),
``score`` (score_samples and sample throughput for N = 1e3 ... 1e7, peak memory),
``fit`` (fit time vs N), ``quality`` (time to held-out KL on pinwheel, next to
scikit-learn's GaussianMixture) and ``top_k`` (``elbo_top_k=2`` against the exact
ELBO, K = 9).

Every ratio is measured side by side in one process: each contender trains one
short epoch of :func:`vmonf.training.train` (the estimators' own loop: Adam,
gradient clipping, NaN guard) in turn, round after round in rotating order, and
its median round is kept. Run it alone on the machine; it records the load
average before and after. Prints markdown tables and writes results/speed.json
and .md (results/speed_<sections>.* for a subset).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import summary, write_results
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import AffineCouplingTransform
from quality import VMONF_CASES
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from competitive.generators import FlowGenerators
from vmonf import VMoNF, datasets, metrics
from vmonf.coupling import ACTIVATIONS
from vmonf.flows import ComponentFlows, alternating_masks
from vmonf.heap import retain_freed_memory
from vmonf.mixture import MixtureOfFlows
from vmonf.model import VariationalMixture
from vmonf.objectives import mixture_loss
from vmonf.posterior import PosteriorNet
from vmonf.reporting import markdown_table
from vmonf.training import TrainConfig, torch_threads, train

D = 2
KL_TARGET, TIME_TARGET = 0.05, 60.0


@dataclass(frozen=True)
class Arch:
    """A flow architecture and batch size to time."""

    name: str
    n_layers: int
    hidden: int
    activation: str
    batch: int
    posterior_hidden: tuple[int, ...] = (32, 32)


# The comparison (8 affine couplings, MLP 64-64, batch 512) and VMoNF's defaults.
WIDE = Arch("8 couplings, MLP 64-64 ReLU, batch 512", 8, 64, "relu", 512)
_defaults = VMoNF().get_params()
DEFAULT = Arch(
    "VMoNF defaults: 8 couplings, MLP 32-32 tanh, batch 256",
    _defaults["n_layers"],
    _defaults["hidden_features"],
    _defaults["activation"],
    _defaults["batch_size"],
    tuple(_defaults["posterior_hidden"]),
)
LARGE = Arch("8 couplings, MLP 256-256 ReLU, batch 4096", 8, 256, "relu", 4096)
WIDE_HALF = replace(WIDE, name="8 couplings, MLP 64-64 ReLU, batch 256", batch=WIDE.batch // 2)


# --------------------------------------------------------------------------- contenders


class Conditioner(nn.Module):
    """An nflows transform net: in -> hidden -> hidden -> out MLP (context ignored)."""

    def __init__(self, n_in: int, n_out: int, arch: Arch) -> None:
        super().__init__()
        act = ACTIVATIONS[arch.activation]
        self.net = nn.Sequential(
            nn.Linear(n_in, arch.hidden), act(), nn.Linear(arch.hidden, arch.hidden), act(),
            nn.Linear(arch.hidden, n_out),
        )  # fmt: skip

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


class NflowsLoopMixture(nn.Module):
    """The alternative: K separate nflows ``Flow``s called in a Python loop.

    Each flow is ``n_layers`` nflows ``AffineCouplingTransform``s (same masks and
    conditioner widths as ours); q(c|x) and the loss are the same as VMoNF's.
    """

    def __init__(self, k: int, arch: Arch) -> None:
        super().__init__()

        def net(n_in: int, n_out: int) -> Conditioner:
            return Conditioner(n_in, n_out, arch)

        self.flows = nn.ModuleList(
            Flow(
                CompositeTransform(
                    [AffineCouplingTransform(m, net) for m in alternating_masks(D, arch.n_layers)]
                ),
                StandardNormal([D]),
            )
            for _ in range(k)
        )
        self.posterior = PosteriorNet(D, k, arch.posterior_hidden, arch.activation)
        self.register_buffer("log_weights", torch.full((k,), -math.log(k)))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-point VMoNF loss (N,), the K flows evaluated one after another."""
        log_joint = torch.stack([f.log_prob(x) for f in self.flows], dim=1) + self.log_weights
        return mixture_loss(log_joint, self.posterior(x), y, alpha=1.0, objective="elbo")

    def owned_loss(self, x: Tensor, owner: Tensor) -> Tensor:
        """Competitive loss: flow k on the points it owns only, (1,) mean over the batch."""
        total = sum(-f.log_prob(x[owner == k]).sum() for k, f in enumerate(self.flows))
        return total / x.shape[0]


def vmonf_model(k: int, arch: Arch) -> VariationalMixture:
    """VMoNF's model: K batched flows and q(c|x)."""
    flows = ComponentFlows(D, k, arch.n_layers, arch.hidden, 2, arch.activation)
    posterior = PosteriorNet(D, k, arch.posterior_hidden, arch.activation)
    return VariationalMixture(MixtureOfFlows(flows), posterior)


def _config(batch: int) -> TrainConfig:
    # One epoch per call; the estimators' optimiser settings (Adam, clipping at 50).
    return TrainConfig(max_epochs=1, batch_size=batch, lr_schedule="constant")


def epoch_runner(
    module: nn.Module,
    objective: Callable[[tuple[Tensor, ...], int], Tensor],
    data: tuple[Tensor, ...],
    batch: int,
) -> Callable[[], int]:
    """One call = one epoch of :func:`vmonf.training.train`; returns its step count."""
    config = _config(batch)
    generator = torch.Generator().manual_seed(0)

    def run() -> int:
        return train(module, objective, data, config, generator=generator).n_steps

    return run


def points(n: int, seed: int = 0) -> Tensor:
    """n standardised pinwheel points, float32 (N, 2)."""
    x, _ = datasets.toy("pinwheel", n_classes=5).sample(n, seed=seed)
    x = (x - x.mean(0)) / x.std(0)
    return torch.as_tensor(x, dtype=torch.float32)


def vmonf_step(
    k: int,
    arch: Arch,
    steps: int,
    compile: bool = False,
    extra: int = 0,
    top_k: int | None = None,
    device: str = "cpu",
) -> Callable[[], int]:
    """VMoNF's training step (ELBO, all K flows batched): ``steps`` batches (plus a last
    one of ``extra`` points) per call, optionally through ``torch.compile`` as
    ``VMoNF(compile=True)`` does, or on each point's ``top_k`` components under q as
    ``VMoNF(elbo_top_k=...)`` does."""
    model = vmonf_model(k, arch).to(device)
    loss = torch.compile(model.loss, dynamic=True) if compile else model.loss
    x = points(steps * arch.batch + extra).to(device)
    y = torch.full((x.shape[0],), -1, device=device)
    if top_k is not None:
        _fit_posterior_to_kmeans(model, x)

    def objective(batch: tuple[Tensor, ...], _: int) -> Tensor:
        return loss(batch[0], batch[1], alpha=1.0, objective="elbo", top_k=top_k).mean()

    return epoch_runner(model, objective, (x, y), arch.batch)


def _fit_posterior_to_kmeans(model: VariationalMixture, x: Tensor, steps: int = 300) -> None:
    """Train q(c|x) on k-means clusters of x, as VMoNF's ``init="kmeans"`` does, so that
    each point's top components are spread over K as in a real fit (an untrained q
    sends most points to the same few components)."""
    k = model.mixture.n_components
    labels = KMeans(k, n_init=3, random_state=0).fit_predict(x.cpu().numpy())
    clusters = torch.as_tensor(labels, device=x.device).long()
    optimizer = torch.optim.Adam(model.posterior.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.nll_loss(model.posterior(x), clusters).backward()
        optimizer.step()


def loop_step(k: int, arch: Arch, steps: int, device: str = "cpu") -> Callable[[], int]:
    """The same step with K nflows ``Flow``s in a Python loop."""
    model = NflowsLoopMixture(k, arch).to(device)
    x = points(steps * arch.batch).to(device)
    y = torch.full((x.shape[0],), -1, device=device)
    return epoch_runner(model, lambda b, _: model.loss(b[0], b[1]).mean(), (x, y), arch.batch)


def _owners(n: int, k: int) -> Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1))


def _flow_generators(k: int, arch: Arch) -> FlowGenerators:
    return FlowGenerators(
        D, k, n_layers=arch.n_layers, hidden_features=arch.hidden,
        activation=arch.activation, linear=False,
    )  # fmt: skip


def competitive_step(k: int, arch: Arch, steps: int) -> Callable[[], int]:
    """Competitive training's step: each flow on its own points (one-hot weights)."""
    gens = _flow_generators(k, arch)
    x = points(steps * arch.batch)
    weights = F.one_hot(_owners(x.shape[0], k), k).float()
    config, generator = _config(arch.batch), torch.Generator().manual_seed(0)
    return lambda: gens.fit_weighted(x, weights, config, generator).n_steps


def competitive_masked_step(k: int, arch: Arch, steps: int) -> Callable[[], int]:
    """The one-hot mask without regrouping: every flow evaluated on every point."""
    gens = _flow_generators(k, arch)
    x = points(steps * arch.batch)
    weights = F.one_hot(_owners(x.shape[0], k), k).float()
    return epoch_runner(
        gens, lambda b, _: (b[1] * gens.per_point_loss(b[0])).sum(1).mean(), (x, weights),
        arch.batch,
    )  # fmt: skip


def competitive_loop_step(k: int, arch: Arch, steps: int) -> Callable[[], int]:
    """Competitive step with K nflows ``Flow``s, each called on the points it owns."""
    model = NflowsLoopMixture(k, arch)
    x = points(steps * arch.batch)
    return epoch_runner(
        model, lambda b, _: model.owned_loss(b[0], b[1]), (x, _owners(x.shape[0], k)), arch.batch
    )


def gemm_floor(k: int, arch: Arch) -> Callable[[], int]:
    """The arithmetic both contenders share, alone: the three (K, batch, hidden) x
    (K, hidden, hidden) products per coupling of one training step (forward, input
    gradient, weight gradient), as batched GEMMs into reused buffers. One call = one
    step's worth."""
    h = torch.randn(k, arch.batch, arch.hidden)
    w = torch.randn(k, arch.hidden, arch.hidden)
    out, weight_grad = torch.empty_like(h), torch.empty_like(w)

    def run() -> int:
        for _ in range(arch.n_layers):
            torch.bmm(h, w, out=out)
            torch.bmm(h, w.mT, out=out)
            torch.bmm(h.mT, h, out=weight_grad)
        return 1

    return run


def _pair_worker(
    conn: Connection, rank: int, steps: int, compile: bool, store: str | None, shm: bool
) -> None:
    """One of :class:`ProcessPair`'s processes, on one torch thread: with ``store``, a
    data-parallel rank (the global batch is split by the training loop), else a
    process training alone on half of each batch."""
    os.environ["VMONF_SHARED_MEMORY"] = "1" if shm else "0"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if store is not None:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=2
        )
    arch = WIDE if store is not None else WIDE_HALF
    run = vmonf_step(5, arch, steps, compile=compile)
    conn.send(0)
    while conn.recv():
        conn.send(run())
    if store is not None:
        torch.distributed.destroy_process_group()


class ProcessPair:
    """VMoNF's K = 5, 64-wide step on two cores as two processes of one torch thread.

    ``data_parallel=False``: each process trains its own copy of the model on half of
    every batch, with no communication: a lower bound on any split of the step over two
    cores (each process pays the step's serial per-op cost, as one Python thread would
    for both). ``data_parallel=True``: the two are ranks of one gloo group training one
    model, as under ``torchrun --nproc-per-node 2``, gradients summed through shared
    memory (``shm``) or gloo. One call = one epoch in both processes at once; returns
    its step count."""

    def __init__(
        self, steps: int, *, compile: bool = False, data_parallel: bool = False, shm: bool = True
    ) -> None:
        context = multiprocessing.get_context("spawn")
        store = os.path.join(tempfile.mkdtemp(prefix="vmonf-"), "store") if data_parallel else None
        self.conns, self.procs = [], []
        for rank in range(2):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_pair_worker, args=(child, rank, steps, compile, store, shm)
            )
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            conn.recv()

    def __call__(self) -> int:
        for conn in self.conns:
            conn.send(True)
        return min(conn.recv() for conn in self.conns)

    def close(self) -> None:
        for conn in self.conns:
            conn.send(False)
        for proc in self.procs:
            proc.join()


# --------------------------------------------------------------------------- timing


def interleaved(
    contenders: dict[str, Callable[[], int]], rounds: int, threads: dict[str, int] | None = None
) -> dict[str, dict[str, float]]:
    """Median seconds per step (wall and CPU) of each contender, run in turn every round.

    ``threads`` gives a contender's torch thread count (default 1).
    """
    threads = threads or {}
    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 warms up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with torch_threads(threads.get(name, 1)):
                w0, c0 = time.perf_counter(), time.process_time()
                steps = contenders[name]()
                w1, c1 = time.perf_counter(), time.process_time()
            if r:
                wall[name].append((w1 - w0) / steps)
                cpu[name].append((c1 - c0) / steps)
    return {
        n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n])} for n in names
    }


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


# --------------------------------------------------------------------------- sections


def section_loop(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Training step, K = 5: batched (eager and ``compile=True``) vs a Python loop over 5
    nflows Flows, 1 and 2 threads."""
    k, arch, rows, results = 5, WIDE, [], {}
    targets = {1: 0.45, 2: 0.30}

    def verdict(ratio: float, n_threads: int) -> str:
        return "met" if ratio <= targets[n_threads] else "NOT met"

    for n_threads in (1, 2):
        contenders = {
            "vmonf": vmonf_step(k, arch, args.steps),
            "vmonf_compiled": vmonf_step(k, arch, args.steps, compile=True),
            "loop": loop_step(k, arch, args.steps),
            "competitive": competitive_step(k, arch, args.steps),
            "competitive_loop": competitive_loop_step(k, arch, args.steps),
            "gemm_floor": gemm_floor(k, arch),
        }
        # Round 0 (not timed) compiles: the warm-up is in the compile section.
        t = interleaved(contenders, args.rounds, dict.fromkeys(contenders, n_threads))
        ratio = t["vmonf"]["wall"] / t["loop"]["wall"]
        compiled_ratio = t["vmonf_compiled"]["wall"] / t["loop"]["wall"]
        comp_ratio = t["competitive"]["wall"] / t["competitive_loop"]["wall"]
        floor_ratio = t["gemm_floor"]["wall"] / t["loop"]["wall"]
        results[f"{n_threads}_threads"] = {
            "times": t,
            "ratio": ratio,
            "compiled_ratio": compiled_ratio,
            "competitive_ratio": comp_ratio,
            "gemm_floor_ratio": floor_ratio,
        }
        rows.append([
            n_threads, ms(t["loop"]["wall"]), ms(t["vmonf"]["wall"]), f"{ratio:.2f}",
            verdict(ratio, n_threads), ms(t["vmonf_compiled"]["wall"]), f"{compiled_ratio:.2f}",
            verdict(compiled_ratio, n_threads), f"<= {targets[n_threads]:.2f}",
            ms(t["competitive_loop"]["wall"]), ms(t["competitive"]["wall"]), f"{comp_ratio:.2f}",
            ms(t["gemm_floor"]["wall"]), f"{floor_ratio:.2f}",
        ])  # fmt: skip
    header = [
        "threads", "nflows loop (ms/step)", "VMoNF batched, eager (ms/step)", "ratio", "",
        "VMoNF batched, compile=True (ms/step)", "ratio", "", "target",
        "competitive: nflows loop on owned points (ms/step)", "competitive batched (ms/step)",
        "ratio", f"the step's {arch.hidden}x{arch.hidden} GEMMs alone (ms/step)", "ratio (floor)",
    ]  # fmt: skip
    title = f"Training step, K = 5, {arch.name} (median of {args.rounds} interleaved rounds)"
    return {"arch": asdict(arch), "targets": targets, **results}, _titled(
        title, markdown_table(header, rows)
    )


def section_split(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The K = 5, 64-wide step on two cores, split as evenly as it can be: two processes,
    half the batch each (:class:`ProcessPair`), against the nflows loop and the
    batched step at 1 and 2 threads, and data-parallel training over two processes."""
    k, arch = 5, WIDE
    pairs = {
        "pair": ProcessPair(args.steps),
        "pair_compiled": ProcessPair(args.steps, compile=True),
        "ddp_shm": ProcessPair(args.steps, data_parallel=True),
        "ddp_gloo": ProcessPair(args.steps, data_parallel=True, shm=False),
        "ddp_compiled": ProcessPair(args.steps, compile=True, data_parallel=True),
    }
    contenders: dict[str, Callable[[], int]] = {
        "loop_1": loop_step(k, arch, args.steps),
        "loop_2": loop_step(k, arch, args.steps),
        "vmonf_1": vmonf_step(k, arch, args.steps),
        "vmonf_2": vmonf_step(k, arch, args.steps),
        "half_1": vmonf_step(k, WIDE_HALF, args.steps),
        "compiled_2": vmonf_step(k, arch, args.steps, compile=True),
        **pairs,
    }
    threads = {"loop_2": 2, "vmonf_2": 2, "compiled_2": 2}
    try:
        t = interleaved(contenders, args.rounds, threads)
    finally:
        for pair in pairs.values():
            pair.close()
    loop_1, loop_2 = t["loop_1"]["wall"], t["loop_2"]["wall"]
    rows_spec = [
        ("nflows loop", "1 thread", "loop_1", loop_1, None),
        ("nflows loop", "2 threads", "loop_2", loop_2, None),
        ("VMoNF batched, eager", "1 thread", "vmonf_1", loop_1, 0.45),
        ("VMoNF batched, eager, half the batch (256)", "1 thread", "half_1", loop_1, None),
        ("VMoNF batched, eager", "2 threads", "vmonf_2", loop_2, 0.30),
        ("VMoNF batched, compile=True", "2 threads", "compiled_2", loop_2, 0.30),
        ("two processes, half the batch each, eager", "2 x 1 thread", "pair", loop_2, 0.30),
        ("the same, compile=True", "2 x 1 thread", "pair_compiled", loop_2, 0.30),
        (
            "data-parallel, 2 ranks, shared-memory all-reduce",
            "2 x 1 thread",
            "ddp_shm",
            loop_2,
            0.30,
        ),
        ("the same, compile=True", "2 x 1 thread", "ddp_compiled", loop_2, 0.30),
        ("data-parallel, 2 ranks, gloo all-reduce", "2 x 1 thread", "ddp_gloo", loop_2, 0.30),
    ]
    rows, ratios = [], {}
    for label, cores, name, reference, target in rows_spec:
        ratio = t[name]["wall"] / reference
        ratios[name] = ratio
        verdict = "" if target is None else ("met" if ratio <= target else "NOT met")
        rows.append([
            label, cores, ms(t[name]["wall"]), f"{ratio:.2f}",
            "" if target is None else f"<= {target:.2f}", verdict,
        ])  # fmt: skip
    # Step time = serial + parallel part: from the full and the half batch at 1 thread.
    serial = 2 * t["half_1"]["wall"] - t["vmonf_1"]["wall"]
    header = [
        "K = 5 training step", "cores", "ms/step", "ratio to the nflows loop (same cores)",
        "target", "",
    ]  # fmt: skip
    title = (
        f"The step split over two cores, K = 5, {arch.name} (median of {args.rounds} "
        f"interleaved rounds; part of the step that does not shrink with the batch, 1 "
        f"thread: {ms(serial)} ms)"
    )
    payload = {"arch": asdict(arch), "times": t, "ratios": ratios, "serial_s": serial}
    return payload, _titled(title, markdown_table(header, rows))


def section_scaling(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Training step for K = 1 ... 20 against one flow of the same size (1 thread; the
    64-wide exact ELBO also at 2 threads, and at each K's faster thread count)."""
    ks = (1, 2, 5, 10, 20)
    cases = [
        ("VMoNF", DEFAULT, vmonf_step, 1),
        ("VMoNF", WIDE, vmonf_step, 1),
        ("VMoNF, 2 threads", WIDE, vmonf_step, 2),
        ("VMoNF, elbo_top_k=2", WIDE, functools.partial(vmonf_step, top_k=2), 1),
        ("competitive", WIDE, competitive_step, 1),
        ("competitive, masked (every flow on every point)", WIDE, competitive_masked_step, 1),
    ]
    rows, results = [], []

    def add_row(kind: str, arch: Arch, wall: dict[str, float], **extra: Any) -> None:
        ratios = {k: wall[str(k)] / wall["1"] for k in ks}
        results.append({"kind": kind, "arch": asdict(arch), "ratios": ratios, **extra})
        rows.append([
            kind, arch.name, *(f"{ms(wall[str(k)])} ({ratios[k]:.2f}x)" for k in ks),
            "met" if ratios[10] <= 3.0 else "NOT met",
        ])  # fmt: skip

    by_threads: dict[int, dict[str, dict[str, float]]] = {}
    for kind, arch, build, n_threads in cases:
        contenders = {str(k): build(k, arch, args.steps) for k in ks}
        t = interleaved(contenders, args.rounds, dict.fromkeys(contenders, n_threads))
        add_row(kind, arch, {k: v["wall"] for k, v in t.items()}, threads=n_threads, times=t)
        if kind.startswith("VMoNF") and arch is WIDE and "top_k" not in kind:
            by_threads[n_threads] = t
    faster: dict[str, dict[str, float]] = {}  # each K at the thread count it ran faster at
    for k in by_threads[1]:
        n = 1 if by_threads[1][k]["wall"] <= by_threads[2][k]["wall"] else 2
        faster[k] = {**by_threads[n][k], "threads": n}
    wall = {k: v["wall"] for k, v in faster.items()}
    add_row("VMoNF, each K at its faster of 1 and 2 threads", WIDE, wall, times=faster)
    header = ["training", "architecture", *(f"K = {k}" for k in ks), "K = 10 <= 3x"]
    title = "Training step (ms) vs K, ratio to K = 1, 1 thread unless the row says otherwise"
    return {"cases": results}, _titled(title, markdown_table(header, rows))


def section_threads(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Step time at 1 and 2 torch threads, small to large flows (K = 5)."""
    rows, results = [], []
    for arch in (DEFAULT, WIDE, LARGE):
        steps = max(2, args.steps * WIDE.batch // arch.batch)
        contenders = {f"{n}": vmonf_step(5, arch, steps) for n in (1, 2)}
        t = interleaved(contenders, args.rounds, {"1": 1, "2": 2})
        best = min(t, key=lambda n: t[n]["wall"])
        results.append({"arch": asdict(arch), "times": t, "fastest": int(best)})
        rows.append([arch.name, ms(t["1"]["wall"]), ms(t["2"]["wall"]), best])
    header = ["VMoNF, K = 5", "1 thread (ms/step)", "2 threads (ms/step)", "fastest"]
    return {"cases": results}, _titled("Torch threads", markdown_table(header, rows))


def section_compile(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """torch.compile (``compile=True``): warm-up, then step time against eager."""
    rows, results = [], []
    # A cold start: compile into an empty cache, as a first fit on a machine does.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    for arch in (WIDE, DEFAULT):
        # Epochs end with a part batch, as fits do: warm-up covers both shapes.
        eager = vmonf_step(5, arch, args.steps, extra=arch.batch // 3)
        compiled = vmonf_step(5, arch, args.steps, compile=True, extra=arch.batch // 3)
        started = time.perf_counter()
        compiled()
        warmup = time.perf_counter() - started
        t = interleaved({"eager": eager, "compiled": compiled}, args.rounds)
        saved = t["eager"]["wall"] - t["compiled"]["wall"]
        breakeven = warmup / saved if saved > 0 else math.inf
        results.append(
            {"arch": asdict(arch), "times": t, "warmup_s": warmup, "breakeven_steps": breakeven}
        )
        rows.append([
            arch.name, ms(t["eager"]["wall"]), ms(t["compiled"]["wall"]),
            f"{t['compiled']['wall'] / t['eager']['wall']:.2f}", f"{warmup:.0f}",
            f"{breakeven:,.0f}" if math.isfinite(breakeven) else "never",
        ])  # fmt: skip
    header = [
        "VMoNF, K = 5", "eager (ms/step)", "compiled (ms/step)", "ratio", "warm-up (s)",
        "steps to break even",
    ]  # fmt: skip
    return {"cases": results}, _titled("torch.compile (1 thread)", markdown_table(header, rows))


def _fitted_vmonf(n_components: int = 5) -> VMoNF:
    X, _ = datasets.toy("pinwheel", n_classes=5).sample(2560, seed=0)
    return VMoNF(n_components, max_epochs=2, random_state=0).fit(X)


def _memory_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak) of this process from /proc, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def probe(model_path: str, n: int, what: str) -> dict[str, float]:
    """In a fresh process: seconds and peak memory of ``score_samples``/``sample`` on n points.

    The peak is the kernel's high-water mark of resident memory, reset just before
    the call (Linux ``/proc/self/clear_refs``; a forked child inherits its parent's).
    """
    model = VMoNF.load(model_path)
    X = np.random.default_rng(0).normal(size=(n, D))
    warm = X[:1000] if what == "score" else None
    model.score_samples(warm) if warm is not None else model.sample(1000)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _memory_mib("VmRSS")
    repeats = max(1, 100_000 // n)
    started = time.perf_counter()
    for _ in range(repeats):
        out = model.score_samples(X) if what == "score" else model.sample(n, random_state=0)[0]
    seconds = (time.perf_counter() - started) / repeats
    peak = _memory_mib("VmHWM")
    return {
        "n": n, "what": what, "seconds": seconds, "points_per_s": n / seconds,
        "input_mib": X.nbytes / 2**20, "output_mib": out.nbytes / 2**20,
        "rss_before_mib": before, "peak_rss_mib": peak, "extra_peak_mib": peak - before,
    }  # fmt: skip


def section_score(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """score_samples and sample: throughput for N = 1e3 ... 1e7 and peak memory."""
    sizes = [10**e for e in range(3, 6 if args.quick else 8)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.pt")
        _fitted_vmonf().save(path)
        for what in ("score", "sample"):
            for n in sizes:
                out = subprocess.run(
                    [sys.executable, __file__, "--probe", path, str(n), what],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [
        [
            r["what"], f"{r['n']:.0e}", f"{r['points_per_s']:,.0f}", f"{r['seconds']:.3f}",
            f"{r['input_mib']:.0f}", f"{r['extra_peak_mib']:.0f}",
        ]
        for r in results
    ]  # fmt: skip
    header = [
        "call", "N", "points / s", "seconds", "input X (MiB)", "peak memory added (MiB)",
    ]  # fmt: skip
    title = (
        "score_samples / sample, VMoNF K = 5 (defaults), 1 thread; memory = peak resident "
        "memory of a fresh process during the call minus its resident memory before"
    )
    return {"results": results}, _titled(title, markdown_table(header, rows))


def fit_times(sizes: list[int], device: str = "cpu") -> tuple[list[dict[str, float]], str]:
    """Fit time vs N (VMoNF defaults, K = 5, 2 epochs): results and a markdown table."""
    toy = datasets.toy("pinwheel", n_classes=5)
    results, rows = [], []
    for n in sizes:
        X, _ = toy.sample(n, seed=0)
        started = time.perf_counter()
        model = VMoNF(5, max_epochs=2, random_state=0, device=device).fit(X)
        total = time.perf_counter() - started
        epoch = model.history_["time"][-1] - model.history_["time"][-2]
        results.append(
            {"n": n, "fit_s": total, "epoch_s": epoch, "us_per_point_epoch": 1e6 * epoch / n}
        )
        rows.append([f"{n:.0e}", f"{total:.1f}", f"{epoch:.2f}", f"{1e6 * epoch / n:.1f}"])
    header = ["N", "fit, 2 epochs (s)", "one epoch (s)", "µs per point per epoch"]
    return results, markdown_table(header, rows)


def section_fit(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Fit time vs N (VMoNF defaults, K = 5, 2 epochs): cost per point per epoch."""
    results, table = fit_times([10**e for e in range(3, 6 if args.quick else 7)])
    title = (
        "Fit time vs N: VMoNF K = 5 defaults on pinwheel (k-means and 300 pre-training "
        "steps, then 2 epochs), 1 thread"
    )
    return {"results": results}, _titled(title, table)


def step_probe(rounds: int, steps: int) -> dict[str, Any]:
    """In a fresh process (malloc as the environment leaves it): step time and minor
    page faults per step of VMoNF and the nflows loop, K = 5, 1 thread."""
    contenders = {"vmonf": vmonf_step(5, WIDE, steps), "loop": loop_step(5, WIDE, steps)}
    times = interleaved(contenders, rounds)
    faults = {}
    for name, run in contenders.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        n_steps = run()
        faults[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n_steps
    return {"times": times, "faults_per_step": faults, "tuned": retain_freed_memory()}


def section_malloc(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Training step with glibc malloc's defaults against :mod:`vmonf.heap`'s thresholds,
    each in fresh processes (the setting is process-wide), alternating."""
    runs: dict[str, list[dict[str, Any]]] = {"0": [], "1": []}
    for _ in range(2 if args.quick else 3):
        for tuning in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--step-probe", str(args.rounds), str(args.steps)],
                check=True, capture_output=True, text=True,
                env={**os.environ, "VMONF_MALLOC_TUNING": tuning},
            )  # fmt: skip
            runs[tuning].append(json.loads(out.stdout.splitlines()[-1]))
    rows, summary = [], {}
    for tuning, label in (("0", "glibc defaults"), ("1", "vmonf.heap thresholds")):
        med = {
            name: statistics.median(r["times"][name]["wall"] for r in runs[tuning])
            for name in ("vmonf", "loop")
        }
        faults = {
            name: statistics.median(r["faults_per_step"][name] for r in runs[tuning])
            for name in ("vmonf", "loop")
        }
        summary[tuning] = {"median_wall": med, "faults_per_step": faults}
        rows.append([
            label, ms(med["loop"]), ms(med["vmonf"]), f"{med['vmonf'] / med['loop']:.2f}",
            f"{faults['loop']:.0f}", f"{faults['vmonf']:.0f}",
        ])  # fmt: skip
    header = [
        "malloc", "nflows loop (ms/step)", "VMoNF batched (ms/step)", "ratio",
        "loop: page faults/step", "VMoNF: page faults/step",
    ]  # fmt: skip
    title = (
        f"Training step, K = 5, {WIDE.name}, 1 thread, glibc malloc thresholds "
        f"(median of {len(runs['0'])} fresh processes each)"
    )
    return {"runs": runs, "summary": summary}, _titled(title, markdown_table(header, rows))


# Time to quality trains on 10,240 points for 50 epochs (as many steps as quality.py's
# 2,560 points x 200 epochs): with 2,560 points the held-out KL stalls at 0.045-0.054
# whatever the time budget, a finite-sample floor rather than a speed limit.
QUALITY_N_TRAIN, QUALITY_EPOCHS = 10_240, 50


def _kl_trace(seed: int, device: str = "cpu") -> dict[str, Any]:
    """Fit VMoNF with quality.py's pinwheel settings on ``QUALITY_N_TRAIN`` points (on
    ``device``), recording held-out KL per epoch. Times exclude the KL evaluations
    themselves.
    """
    case = next(c for c in VMONF_CASES if c.name == "pinwheel")
    toy = datasets.toy(case.toy, **case.toy_params)
    X, _ = toy.sample(QUALITY_N_TRAIN, seed=seed)
    X_test, _ = toy.sample(case.n_test, seed=seed + 10_000)
    true_lp = toy.log_prob(X_test)
    trace: list[tuple[float, float]] = []
    paused = [0.0]
    started = time.perf_counter()

    def record(model: VMoNF, epoch: int) -> None:
        t0 = time.perf_counter()
        trace.append(
            (t0 - started - paused[0], metrics.kl_to_truth(true_lp, model.score_samples(X_test)))
        )
        paused[0] += time.perf_counter() - t0

    params = {**case.params, "max_epochs": QUALITY_EPOCHS}
    model = VMoNF(toy.n_classes, random_state=seed, callback=record, device=device, **params).fit(X)
    fit_time = time.perf_counter() - started - paused[0]
    final = metrics.kl_to_truth(true_lp, model.score_samples(X_test))
    reached = next((t for t, kl in trace if kl <= KL_TARGET), None)
    at_60 = [kl for t, kl in trace if t <= TIME_TARGET]
    gmm = {}
    for k in (toy.n_classes, 30):
        t0 = time.perf_counter()
        with threadpool_limits(1):  # one thread, as VMoNF
            g = GaussianMixture(k, n_init=3, random_state=seed).fit(X)
        gmm[k] = {
            "fit_s": time.perf_counter() - t0,
            "kl": metrics.kl_to_truth(true_lp, g.score_samples(X_test)),
        }
    return {
        "seed": seed, "trace": trace, "fit_s": fit_time, "final_kl": final,
        "best_kl": min(kl for _, kl in trace), "reached_s": reached,
        "kl_at_60s": at_60[-1] if at_60 else None, "gmm": gmm,
    }  # fmt: skip


def section_quality(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Time to quality: VMoNF on pinwheel (5 wings), held-out KL over time, vs GaussianMixture."""
    results = [_kl_trace(seed) for seed in range(1 if args.quick else 5)]
    rows = []
    for r in results:
        best_t = next(t for t, kl in r["trace"] if kl == r["best_kl"])
        rows.append([
            r["seed"], f"{r['reached_s']:.0f}" if r["reached_s"] is not None else "not reached",
            f"{r['kl_at_60s']:.3f}" if r["kl_at_60s"] is not None else "n/a",
            f"{r['best_kl']:.3f} at {best_t:.0f} s", f"{r['final_kl']:.3f} at {r['fit_s']:.0f} s",
            f"{r['gmm'][5]['kl']:.3f} in {r['gmm'][5]['fit_s']:.2f} s",
            f"{r['gmm'][30]['kl']:.3f} in {r['gmm'][30]['fit_s']:.2f} s",
        ])  # fmt: skip
    header = [
        "seed", f"time to KL <= {KL_TARGET} (s)", "KL at 60 s", "best KL", "final KL",
        "GaussianMixture K = 5", "GaussianMixture K = 30",
    ]  # fmt: skip
    title = (
        f"Time to quality: VMoNF on pinwheel ({QUALITY_N_TRAIN:,} points, {QUALITY_EPOCHS} "
        "epochs, otherwise quality.py's settings: Student-t base, df 20), held-out KL to truth "
        "(nats, 4096 points), 1 thread"
    )
    return {"results": results, "targets": {"kl": KL_TARGET, "seconds": TIME_TARGET}}, _titled(
        title, markdown_table(header, rows)
    )


def section_top_k(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``elbo_top_k=2`` against the exact ELBO: fit time and quality with many components
    (skewed_gmm, 9 modes, K = 9, quality.py's settings)."""
    case = next(c for c in VMONF_CASES if c.name == "skewed_gmm_9")
    toy = datasets.toy(case.toy, **case.toy_params)
    params = {**case.params, **({"max_epochs": 10} if args.quick else {})}
    rows, results = [], []
    for seed in range(1 if args.quick else 2):
        X, _ = toy.sample(case.n_train, seed=seed)
        X_test, y_test = toy.sample(case.n_test, seed=seed + 10_000)
        true_lp = toy.log_prob(X_test)
        for top_k in (None, 2):
            t0 = time.perf_counter()
            model = VMoNF(toy.n_classes, random_state=seed, elbo_top_k=top_k, **params).fit(X)
            fit_s = time.perf_counter() - t0
            kl = metrics.kl_to_truth(true_lp, model.score_samples(X_test))
            ari = adjusted_rand_score(y_test, model.predict(X_test))
            results.append(
                {"seed": seed, "elbo_top_k": top_k, "fit_s": fit_s, "kl": kl, "ari": ari}
            )
            rows.append([seed, "all 9 (exact)" if top_k is None else top_k,
                         f"{fit_s:.1f}", f"{kl:.4f}", f"{ari:.3f}"])  # fmt: skip
    header = ["seed", "components per point (elbo_top_k)", "fit (s)", "held-out KL", "ARI"]
    title = (
        f"elbo_top_k: VMoNF on skewed_gmm, 9 modes, K = 9 ({case.n_train:,} points, "
        f"{params['max_epochs']} epochs, batch {params['batch_size']}), 1 thread"
    )
    return {"case": case.name, "results": results}, _titled(title, markdown_table(header, rows))


Section = Callable[[argparse.Namespace], tuple[dict[str, Any], str]]


# "compile" runs first: its warm-up is a cold start only before anything else in the
# process has compiled (the loop section compiles the same step).
SECTIONS: dict[str, Section] = {
    "compile": section_compile,
    "loop": section_loop,
    "split": section_split,
    "scaling": section_scaling,
    "threads": section_threads,
    "malloc": section_malloc,
    "score": section_score,
    "fit": section_fit,
    "quality": section_quality,
    "top_k": section_top_k,
}


def _titled(title: str, table: str) -> str:
    return f"**{title}**\n\n{table}"


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_sections(
    parser: argparse.ArgumentParser, args: argparse.Namespace, sections: dict[str, Section]
) -> tuple[list[str], dict[str, Any], list[str]]:
    """Run the ``--sections`` asked for (all by default) in ``sections``' order, printing
    each table as it comes: -> (names, JSON payload by name, markdown tables)."""
    requested = args.sections.split(",") if args.sections else list(sections)
    unknown = set(requested) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    names = [name for name in sections if name in requested]
    payload: dict[str, Any] = {}
    tables = []
    for name in names:
        t0 = time.perf_counter()
        payload[name], table = sections[name](args)
        payload[name]["seconds"] = time.perf_counter() - t0
        print(table + "\n", flush=True)
        tables.append(table)
    return names, payload, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--probe", nargs=3, metavar=("MODEL", "N", "WHAT"), help=argparse.SUPPRESS)
    parser.add_argument("--step-probe", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.step_probe:
        print(json.dumps(step_probe(*args.step_probe)))
        return
    if args.probe:
        print(json.dumps(probe(args.probe[0], int(args.probe[1]), args.probe[2])))
        return
    args.rounds, args.steps = (3, 10) if args.quick else (7, 20)
    load_before = os.getloadavg()
    started = time.perf_counter()
    names, payload, tables = run_sections(parser, args, SECTIONS)
    load_after = os.getloadavg()
    run = {
        "cpu_model": cpu_model(),
        "torch_threads": "1 unless a table says otherwise",
        "malloc_thresholds": "vmonf.heap" if retain_freed_memory() else "left as they were",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "quick": args.quick,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "wall_time_s": time.perf_counter() - started,
    }
    footer = (
        f"Machine: {run['cpu_model']}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"glibc malloc thresholds: {run['malloc_thresholds']} (for every contender); "
        f"load average (1, 5, 15 min) {tuple(round(v, 2) for v in load_before)} before, "
        f"{tuple(round(v, 2) for v in load_after)} after."
    )
    md = "\n\n".join([*tables, footer])
    name = "speed" if not args.sections else "speed_" + "_".join(names)
    if args.quick:  # a smoke run must not replace the results the README quotes
        name += "_quick"
    path = write_results(name, {"run": run, **payload}, md)
    print(footer)
    print(f"\nwall time {run['wall_time_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
