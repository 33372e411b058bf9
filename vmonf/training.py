"""The one training loop: mini-batches, time budget, schedules, early stopping, NaN guard.

Every estimator in vmonf and competitive trains through :func:`train`. What is
optimised is given by an *objective*: a callable ``objective(batch, step) ->
scalar mean loss`` over a tuple of tensors indexed along their first axis.

Data-parallel under torchrun without a rewrite: the batch order comes from an
injected sampler that shards every global batch over ranks, the device from the
data, and every cross-process reduction goes through :mod:`vmonf.distributed`.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from tqdm.auto import tqdm

from vmonf._validation import (
    check_betas,
    check_choice,
    check_positive_float,
    check_positive_int,
    user_stacklevel,
)
from vmonf.checkpoint import CheckpointError
from vmonf.distributed import (
    ShardedBatches,
    all_reduce_gradients,
    all_reduce_sum,
    any_rank,
    broadcast_module,
    rank_and_size,
    shard_range,
)
from vmonf.heap import retain_freed_memory
from vmonf.packing import pack_parameters
from vmonf.resume import Checkpointer, set_rng_state

__all__ = [
    "EVAL_CHUNK",
    "GPU_EVAL_CHUNK",
    "FitClock",
    "NonFiniteLossError",
    "ShardedBatches",
    "TrainConfig",
    "TrainResult",
    "can_show_progress",
    "eval_chunk",
    "evaluate",
    "fit_threads",
    "map_chunks",
    "torch_threads",
    "train",
    "warm_up_optimizer",
]

Batch = tuple[Tensor, ...]
MAX_BATCH = 2**31 - 1  # far beyond any memory; a size of 2**63 overflowed inside torch
MAX_THREADS = 1024  # torch.set_num_threads(100_000) crashes the process
Objective = Callable[[Batch, int], Tensor]
# Rows per no-grad evaluation chunk on the CPU: K x rows x width activations of a few MiB
# stay in cache and reuse freed memory; 65536-row chunks scored 2-2.5x slower (K = 5,
# width 32). On a CUDA GPU each chunk's time is kernel launches: with K = 5, width 32,
# 65536 rows scored 9-13x faster than 4096 on an H100 (N = 1e5 ... 1e7), adding up to
# 190 MiB of GPU memory against 50 (benchmarks/gpu.py). Each activation is K x rows x
# width floats (K = 20, width 256: 1.3 GB): lower it for wide mixtures on small GPUs.
EVAL_CHUNK = 4096
GPU_EVAL_CHUNK = 65536


class NonFiniteLossError(RuntimeError):
    """Training kept producing non-finite losses or gradients and was stopped.

    ``result`` holds the history up to the failure; the trained module was left
    in its best (or last good) state.
    """

    def __init__(self, message: str, result: TrainResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train` (validated on construction).

    Args:
        max_epochs: passes over the data.
        max_time: wall-clock budget in seconds (None = no limit).
        batch_size: points per step.
        learning_rate: Adam step size.
        adam_betas: Adam's (beta1, beta2).
        weight_decay: Adam L2 penalty.
        lr_schedule: ``"constant"`` or ``"cosine"`` (to ``lr_floor * learning_rate``).
        lr_schedule_epochs, lr_schedule_start: the cosine schedule spans
            ``lr_schedule_epochs`` epochs (None: ``max_epochs``), of which this call
            starts at epoch ``lr_schedule_start``: consecutive calls, e.g. competitive
            rounds, then follow one schedule instead of restarting it.
        grad_clip: max global gradient norm (None = no clipping).
        patience: early stopping after this many epochs without a better
            validation loss (None = no early stopping; needs validation data).
        max_bad_steps: non-finite steps tolerated before giving up.
        verbose: show a progress bar (only in a terminal or a Jupyter kernel).
        desc: progress bar label.
    """

    max_epochs: int = 100
    max_time: float | None = None
    batch_size: int = 256
    learning_rate: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    lr_schedule_epochs: int | None = None
    lr_schedule_start: int = 0
    lr_floor: float = 0.05
    grad_clip: float | None = 50.0
    patience: int | None = None
    max_bad_steps: int = 10
    verbose: bool = False
    desc: str = "fit"

    def __post_init__(self) -> None:
        # The checked values replace the given ones: numpy scalars (from a parameter
        # grid) become the Python numbers that torch requires, e.g. of split sizes.
        checked = {
            "max_epochs": check_positive_int(self.max_epochs, "max_epochs"),
            "max_time": check_positive_float(self.max_time, "max_time", allow_none=True),
            "batch_size": check_positive_int(self.batch_size, "batch_size", maximum=MAX_BATCH),
            "learning_rate": check_positive_float(self.learning_rate, "learning_rate"),
            "weight_decay": check_positive_float(
                self.weight_decay, "weight_decay", allow_zero=True
            ),
            "lr_floor": check_positive_float(self.lr_floor, "lr_floor"),
            "lr_schedule_start": check_positive_int(
                self.lr_schedule_start, "lr_schedule_start", minimum=0
            ),
            "grad_clip": check_positive_float(self.grad_clip, "grad_clip", allow_none=True),
            "max_bad_steps": check_positive_int(self.max_bad_steps, "max_bad_steps", minimum=0),
        }
        if self.patience is not None:
            checked["patience"] = check_positive_int(self.patience, "patience")
        if self.lr_schedule_epochs is not None:
            checked["lr_schedule_epochs"] = check_positive_int(
                self.lr_schedule_epochs, "lr_schedule_epochs"
            )
        check_betas(self.adam_betas, "adam_betas")
        check_choice(self.lr_schedule, "lr_schedule", ("constant", "cosine"))
        for name, value in checked.items():
            object.__setattr__(self, name, value)


@dataclass
class TrainResult:
    """What :func:`train` did: per-epoch history and counters."""

    history: dict[str, list[float]] = field(default_factory=dict)
    n_epochs: int = 0
    n_steps: int = 0
    n_bad_steps: int = 0
    stop_reason: str = "max_epochs"
    best_validation: float = math.inf
    # Adam's state at the end (with return_optimizer_state): train(optimizer_state=...)
    # continues the optimisation.
    optimizer_state: dict[str, Any] | None = None


def can_show_progress() -> bool:
    """A terminal, or a Jupyter kernel (tqdm.auto draws a widget there); not a log file."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class FitClock:
    """The clock of a fit's ``max_time``: wall time less the time spent in the
    :meth:`excluding` blocks, so that a user's callback (recording frames, tracking
    rounds) does not take training time away. Pass it to :func:`train` as ``clock``."""

    def __init__(self) -> None:
        self._excluded = 0.0
        self._started = time.perf_counter()

    def __call__(self) -> float:
        """Seconds on this clock (an arbitrary origin, like ``time.perf_counter``)."""
        return time.perf_counter() - self._excluded

    def elapsed(self) -> float:
        """Seconds counted since the clock was made."""
        return self() - self._started

    def remaining(self, budget: float | None) -> float | None:
        """What is left of ``budget`` seconds (at least 1 ms; None = no budget)."""
        return None if budget is None else max(budget - self.elapsed(), 1e-3)

    @contextmanager
    def excluding(self) -> Iterator[None]:
        """Time inside this block is not counted."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - started


@functools.cache
def warm_up_optimizer() -> None:
    """Pay, once per process, what building the first ``torch.optim.Adam`` costs: torch
    2.13 imports ``torch._dynamo`` then (1.5-2.7 s here). Fits call this before their
    clock starts, so the first fit of a process is not left with almost no ``max_time``."""
    torch.optim.Adam([nn.Parameter(torch.zeros(1))], fused=True)


@contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run the block with ``n_threads`` torch threads, restoring the old count after."""
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))  # torch and threadpoolctl refuse numpy ints
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def fit_threads(n_threads: int | None) -> Iterator[None]:
    """:func:`torch_threads`, and the same limit on the native thread pools (OpenMP, BLAS)
    that numpy and scikit-learn use within a fit: k-means of 300 points took 0.13-0.36 s
    on OpenMP's default 2 threads with other work on this machine's 2 cores, 0.03 s on one."""
    if n_threads is None:
        yield
        return
    with torch_threads(n_threads), threadpool_limits(int(n_threads)):
        yield


def eval_chunk(device: torch.device) -> int:
    """Rows per no-grad evaluation chunk on ``device``: :data:`GPU_EVAL_CHUNK` on a CUDA
    device, else :data:`EVAL_CHUNK` (no other accelerator has been measured)."""
    return GPU_EVAL_CHUNK if device.type == "cuda" else EVAL_CHUNK


def map_chunks(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` of x's rows, :func:`eval_chunk` rows at a time (bounded memory), concatenated
    along the first axis."""
    return torch.cat([fn(c) for c in x.split(eval_chunk(x.device))])


@torch.no_grad()
def evaluate(objective: Objective, data: Batch, step: int, chunk_size: int | None = None) -> float:
    """Mean objective over ``data`` in chunks of ``chunk_size`` rows (default
    :func:`eval_chunk`), without gradients; data-parallel runs score one shard per rank
    and all-reduce the sum."""
    chunk_size = chunk_size or eval_chunk(data[0].device)
    start, stop = shard_range(data[0].shape[0])
    total = torch.zeros(2, dtype=torch.float64, device=data[0].device)  # sum, count
    for first in range(start, stop, chunk_size):
        batch = tuple(t[first : min(first + chunk_size, stop)] for t in data)
        total[0] += objective(batch, step).double() * batch[0].shape[0]
        total[1] += batch[0].shape[0]
    total = all_reduce_sum(total)
    return float(total[0] / total[1].clamp_min(1))


class _Snapshot:
    """A copy of a module's state, refreshed in place (no allocation after the first)."""

    def __init__(self, module: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> _Snapshot:
        snapshot = cls.__new__(cls)
        snapshot.state = dict(state)
        return snapshot

    @torch.no_grad()
    def take(self, module: nn.Module) -> None:
        current = module.state_dict()
        torch._foreach_copy_(list(self.state.values()), [current[k] for k in self.state])

    def restore(self, module: nn.Module) -> None:
        module.load_state_dict(self.state)


def _zero(params: Sequence[nn.Parameter]) -> Tensor:
    """A zero loss that still reaches every parameter (an empty shard's contribution)."""
    return sum((p.sum() * 0.0 for p in params), params[0].new_zeros(()))


def _cosine_factor(step: int, total_steps: int, floor: float) -> float:
    progress = min(step / max(total_steps, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class _LoopState:
    """Everything :func:`train` changes as it goes: checkpointed to resume a stage."""

    step: int
    epoch: int = 0
    batch: int = 0  # batches finished in the current epoch
    lr_scale: float = 1.0
    epoch_total: float = 0.0  # summed loss and points of the current epoch so far
    epoch_seen: int = 0
    epochs_since_best: int = 0
    elapsed: float = 0.0  # seconds trained before the current session
    epoch_order_state: Tensor | None = None  # generator state that draws the epoch's order
    # An epoch ended: its weights become the "last good" ones once a loss proves them finite.
    good_due: bool = False
    # Updates applied since the last restore, in all, and those a later finite loss
    # confirmed: a stage whose every update was undone has kept none.
    updates_since_restore: int = 0
    n_updates: int = 0
    n_confirmed: int = 0


def _result_fields(result: TrainResult) -> dict[str, object]:
    return {
        "history": result.history,
        "n_epochs": result.n_epochs,
        "n_steps": result.n_steps,
        "n_bad_steps": result.n_bad_steps,
        "stop_reason": result.stop_reason,
        "best_validation": result.best_validation,
        "optimizer_state": result.optimizer_state,
    }


def train(
    module: nn.Module,
    objective: Objective,
    data: Batch,
    config: TrainConfig,
    *,
    generator: torch.Generator,
    validation: Batch | None = None,
    validation_objective: Objective | None = None,
    parameters: Sequence[nn.Parameter] | None = None,
    on_epoch_end: Callable[[int, int, dict[str, list[float]]], None] | None = None,
    sampler: Callable[[int, int, torch.Generator], ShardedBatches] = ShardedBatches,
    start_step: int = 0,
    checkpointer: Checkpointer | None = None,
    clock: Callable[[], float] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    return_optimizer_state: bool = False,
) -> TrainResult:
    """Minimise ``objective`` over ``data`` with Adam; returns the history.

    Args:
        module: what is trained (its state is restored on failures and, with
            early stopping (``patience``), to the best validation epoch at the end).
        objective: ``objective(batch, step) -> scalar`` mean loss of the batch.
        data: tensors with a common first axis N.
        config: a :class:`TrainConfig`.
        generator: seeds the batch order.
        validation: held-out tensors for early stopping and ``val_loss``.
        validation_objective: what ``val_loss`` measures (default: ``objective``),
            e.g. the exact held-out NLL while training on a bound.
        parameters: what to optimise (default: all of ``module``'s).
        on_epoch_end: ``callback(epoch, step, history)``; may add entries to the history.
        sampler: batch index source: yields this rank's indices of each global batch
            and tells the global batch's size (:class:`ShardedBatches`).
        start_step: global step offset, e.g. for temperature schedules across stages.
        checkpointer: periodic training-state checkpoints (:mod:`vmonf.resume`); a
            stage it finished before is replayed, one it was in is continued.
        clock: seconds for ``max_time`` and the history's ``time`` (default
            ``time.perf_counter``; a :class:`FitClock` leaves callbacks out).
        optimizer_state: a previous call's ``TrainResult.optimizer_state`` on the same
            parameters: Adam continues with its moments instead of starting afresh.
        return_optimizer_state: keep a copy of Adam's final state in the result (and in
            a checkpointed stage's record, so that a resumed fit continues alike).

    The trained parameters (those that require grad) are first packed into one buffer
    (:func:`vmonf.packing.pack_parameters`): each stays the same Parameter object, now a
    view of that buffer, and its gradient a view of a gradient buffer. Gradients are
    zeroed, not set to None, between steps, so a parameter the loss does not reach in a
    step still moves with Adam's momentum and weight decay (as with
    ``zero_grad(set_to_none=False)``); pass ``parameters`` to train a subset.

    A non-finite loss or gradient never reaches the weights: the step is skipped,
    the weights of the last good epoch restored (Adam's moments reset), the
    learning rate halved and a warning issued; once more than ``max_bad_steps`` such
    steps have occurred :class:`NonFiniteLossError` is raised with the last good (or
    best) state kept; so it is when the stage ends with no update kept at all.
    """
    n = data[0].shape[0]
    if n == 0:
        raise ValueError("cannot train on zero points")
    if config.patience is not None and validation is None:
        raise ValueError("patience (early stopping) needs validation data")
    n_ranks = rank_and_size()[1]
    if min(n, config.batch_size) < n_ranks:  # the first global batch: a point per rank
        raise ValueError(
            f"data-parallel training on {n_ranks} processes needs at least {n_ranks} points "
            f"per batch; got batch_size={config.batch_size} and {n} points"
        )
    stage = None if checkpointer is None else checkpointer.open_stage()
    if stage is not None and stage.finished is not None:
        return TrainResult(**stage.replay(module, generator))
    retain_freed_memory()  # every step reallocates its activations: skip the page faults
    params = list(dict.fromkeys(module.parameters() if parameters is None else parameters))
    trainable = [p for p in params if p.requires_grad]
    # One tensor for Adam, clipping, zeroing and the all-reduce (see vmonf.packing).
    packed = pack_parameters(trainable)
    optimised = trainable if packed is None else [packed]
    for p in optimised:  # zeroed, never None: the same updates in one process or many
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer = torch.optim.Adam(
        optimised,
        lr=config.learning_rate,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
        fused=True,
    )
    if optimizer_state is not None:
        _load_optimizer_state(optimizer, optimizer_state)
    max_norm = math.inf if config.grad_clip is None else config.grad_clip
    device = params[0].device if params else data[0].device
    batches = sampler(n, config.batch_size, generator)
    schedule_steps = (config.lr_schedule_epochs or config.max_epochs) * len(batches)
    schedule_offset = config.lr_schedule_start * len(batches) - start_step
    result = TrainResult(history={"loss": [], "lr": [], "time": []})
    if validation is not None:
        result.history["val_loss"] = []
    state = _LoopState(step=start_step)
    broadcast_module(module)  # data-parallel ranks start from rank 0's weights...
    good = _Snapshot(module)  # ... and fall back to them
    best: _Snapshot | None = None
    if stage is not None and stage.progress is not None:
        best = _resume(stage.progress, module, optimizer, good, state, result)
        stage.last_saved_step = state.step
    clock = clock or time.perf_counter
    started = clock() - state.elapsed

    def snapshot() -> dict[str, object]:
        state.elapsed = clock() - started
        return {
            "loop": dict(vars(state)),
            "result": _result_fields(result),
            "module": module.state_dict(),  # serialised at once: no copies needed
            "optimizer": optimizer.state_dict(),
            "good": good.state,
            "best": None if best is None else best.state,
        }

    show = config.verbose and can_show_progress()
    bar = tqdm(
        range(state.epoch, config.max_epochs),
        desc=config.desc,
        disable=not show,
        leave=False,
        initial=state.epoch,
        total=config.max_epochs,
    )
    last_batch: Batch | None = None
    for epoch in bar:
        module.train()
        state.epoch = epoch
        if state.batch == 0:
            state.epoch_order_state = generator.get_state()
            state.epoch_total, state.epoch_seen = 0.0, 0
        else:  # continuing a checkpointed epoch: redraw its order, skip what was done
            # Drawn at the epoch's first batch, here or in the run that checkpointed it.
            generator.set_state(cast(Tensor, state.epoch_order_state))
        out_of_time = False
        for position, idx in enumerate(batches):
            if position < state.batch:
                continue
            if config.lr_schedule == "cosine":
                factor = _cosine_factor(
                    state.step + schedule_offset, schedule_steps, config.lr_floor
                )
            else:
                factor = 1.0
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * factor * state.lr_scale
            batch = tuple(t[idx] for t in data)
            if packed is None:
                optimizer.zero_grad(set_to_none=False)
            else:
                packed_grad = packed.grad
                assert packed_grad is not None  # pack_parameters gave it one; never unset
                packed_grad.zero_()
            # This rank's share of the global batch's mean loss (the whole of it in one
            # process); every rank back-propagates and joins the all-reduce, even on NaN.
            share = idx.numel() / batches.global_size
            loss = objective(batch, state.step) * share if idx.numel() else _zero(params)
            loss.backward()
            loss = all_reduce_gradients(optimised, loss)
            norm = torch.nn.utils.clip_grad_norm_(optimised, max_norm)
            finite = bool(torch.isfinite(loss) & torch.isfinite(norm))
            state.batch = position + 1
            if not finite:
                result.n_bad_steps += 1
                good.restore(module)
                state.updates_since_restore = 0
                state.good_due = False  # the epoch that ended on these weights is dropped
                optimizer.state.clear()  # Adam's moments may hold the blow-up
                state.lr_scale *= 0.5
                warnings.warn(
                    f"non-finite loss or gradient at step {state.step}: step skipped, last "
                    f"good state restored, learning rate halved to "
                    f"{config.learning_rate * state.lr_scale:.3g}",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
                if result.n_bad_steps > config.max_bad_steps:
                    if best is not None:
                        best.restore(module)
                    result.n_steps = state.step - start_step
                    raise NonFiniteLossError(
                        f"training stopped after {result.n_bad_steps} non-finite steps; the "
                        "last good parameters were kept. Check the data for extreme values "
                        "or lower learning_rate.",
                        result,
                    )
                state.step += 1
                continue
            if state.updates_since_restore:  # the last update gave this finite loss
                state.n_confirmed += 1
            if state.good_due:  # the weights the last epoch ended on just gave a finite loss
                good.take(module)
                state.good_due = False
            last_batch = batch
            optimizer.step()
            state.updates_since_restore += 1
            state.n_updates += 1
            state.epoch_total += float(loss) * batches.global_size
            state.epoch_seen += batches.global_size
            state.step += 1
            if stage is not None and stage.due(state.step, device):
                stage.save(state.step, snapshot(), device)
            if config.max_time is not None and any_rank(
                clock() - started > config.max_time, device
            ):
                out_of_time = True
                break
        state.batch = 0
        result.n_epochs = epoch + 1
        elapsed = clock() - started
        seen = state.epoch_seen
        result.history["loss"].append(state.epoch_total / seen if seen else math.nan)
        result.history["lr"].append(optimizer.param_groups[0]["lr"])
        result.history["time"].append(elapsed)
        postfix = {"loss": f"{result.history['loss'][-1]:.4f}"}
        if validation is not None:
            module.eval()
            val = evaluate(validation_objective or objective, validation, state.step)
            result.history["val_loss"].append(val)
            postfix["val"] = f"{val:.4f}"
            if val < result.best_validation:
                result.best_validation = val
                if best is None:
                    best = _Snapshot(module)
                else:
                    best.take(module)
                state.epochs_since_best = 0
            else:
                state.epochs_since_best += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch, state.step, result.history)
        bar.set_postfix(postfix)
        if seen:
            state.good_due = True
        if out_of_time or (  # the time now: validation and callbacks took some too
            config.max_time is not None and any_rank(clock() - started > config.max_time, device)
        ):
            result.stop_reason = "max_time"
            break
        if config.patience is not None and state.epochs_since_best >= config.patience:
            result.stop_reason = "early_stopping"
            break
        state.epoch = epoch + 1
    bar.close()
    if state.good_due and last_batch is not None:
        _check_last_update(objective, last_batch, state, good, module, result, device)
    result.n_steps = state.step - start_step
    if not all(bool(torch.isfinite(p).all()) for p in params):
        # Only possible when training started from non-finite weights (the restored
        # "good" state) and no step was finite: there is nothing sound to return.
        raise NonFiniteLossError(
            "training ended with non-finite parameters: they were non-finite when it "
            "started and no step was finite",
            result,
        )
    if result.n_bad_steps and state.n_updates and not state.n_confirmed:
        if best is not None:
            best.restore(module)
        raise NonFiniteLossError(
            f"no update survived: each of the {state.n_updates} update(s) made the next "
            "loss non-finite and was undone, so the parameters are those the stage started "
            "from. Lower learning_rate, or check the data for extreme values.",
            result,
        )
    if best is not None and config.patience is not None:
        best.restore(module)
    module.eval()
    if return_optimizer_state:  # a copy: the optimiser's own tensors are not kept
        result.optimizer_state = copy.deepcopy(optimizer.state_dict())
    if stage is not None:
        stage.finish(_result_fields(result), module, generator)
    return result


def _check_last_update(
    objective: Objective,
    batch: Batch,
    state: _LoopState,
    good: _Snapshot,
    module: nn.Module,
    result: TrainResult,
    device: torch.device,
) -> None:
    """Every update but the last is checked by the next step's loss: check the last
    one on its batch, and fall back to the last good weights if it broke the model."""
    module.train()  # modes as in training: a compiled objective is not recompiled
    empty = batch[0].shape[0] == 0  # this rank's shard of the last global batch
    broken = not empty and not bool(torch.isfinite(objective(batch, state.step).detach()))
    if not any_rank(broken, device):
        state.n_confirmed += state.updates_since_restore > 0
    else:
        result.n_bad_steps += 1
        good.restore(module)
        state.updates_since_restore = 0
        warnings.warn(
            "the last update made the loss non-finite: the weights of the last good epoch "
            "were restored",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    state.good_due = False


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Continue ``optimizer`` from a previous call's state, which must be of the same
    parameters (packed alike: one buffer of the same size)."""
    try:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        moments = [state["state"][i]["exp_avg"] for i in range(len(params)) if i in state["state"]]
        if any(m.shape != p.shape for m, p in zip(moments, params, strict=False)):
            raise ValueError("its moments have other shapes than the parameters")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(copy.deepcopy(state))  # it would update the caller's
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"optimizer_state is not of these parameters: {exc}") from None
    for group, setting in zip(optimizer.param_groups, settings, strict=True):
        group.update(setting)  # the moments carry over; this call's config sets the rest


def _resume(
    progress: dict[str, Any],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    good: _Snapshot,
    state: _LoopState,
    result: TrainResult,
) -> _Snapshot | None:
    """Load a checkpointed stage into the loop's objects; returns the best snapshot."""
    try:
        module.load_state_dict(progress["module"])
        optimizer.load_state_dict(progress["optimizer"])
        good.state = dict(progress["good"])
        for key, value in progress["loop"].items():
            setattr(state, key, value)
        if "n_confirmed" not in progress["loop"]:  # a state from before the count:
            state.n_confirmed = 1  # assume progress rather than fail a resumed fit
        for key, value in progress["result"].items():
            setattr(result, key, value)
        set_rng_state(progress["rng"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"the training state does not fit this model: {exc}") from None
    if progress["best"] is None:
        return None
    return _Snapshot.from_state(progress["best"])
