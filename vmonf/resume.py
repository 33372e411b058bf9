"""Resumable fits: periodic atomic checkpoints of the whole training state.

A fit is a fixed sequence of :func:`vmonf.training.train` calls ("stages"; e.g.
pre-training, then training, per restart). A :class:`Checkpointer` numbers the
stages as they open and writes, every ``every_steps`` steps or ``every_seconds``
seconds, one file holding

* for each finished stage: its result, the trained module's final state and the
  batch generator's state (so a resumed fit can replay it in no time), and
* for the stage in progress: module, Adam, the loop's counters and schedules,
  snapshots for the non-finite guard and early stopping, the state that draws the
  current epoch's batch order, and the global torch RNGs (CPU, and CUDA when used).

Resuming runs the fit from the start: finished stages are replayed from the file,
the stage in progress continues at its last checkpointed step, so the resumed fit
ends with the same weights as an uninterrupted one. Files go through
:func:`vmonf.checkpoint.save_checkpoint` (temporary file, fsync, rename) and load
with ``weights_only=True``.

SIGINT (Ctrl-C) during :meth:`Checkpointer.interruptible` does not tear a step: a
flag is raised, the training loop saves at the next step boundary and raises
:class:`TrainingInterrupted`. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vmonf._validation import NUMPY_GENERATORS, check_positive_float, check_positive_int
from vmonf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vmonf.distributed import any_rank, is_main_process

__all__ = [
    "TRAINING_STATE_FORMAT",
    "Checkpointer",
    "Stage",
    "TrainingInterrupted",
    "fingerprint",
    "identity_difference",
    "rng_state",
    "set_rng_state",
]

KIND = "vmonf-training-state"


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (SIGINT); the training state was saved first."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"training interrupted; its state was saved to {path}")
        self.path = path


#: What a training state holds and how fits use it; a state written under another
#: format is refused like other settings. 2: competitive rounds continue Adam's state
#: (kept with each finished stage) and one learning-rate schedule. 3: the identity is
#: a dict (format, data, each setting), so a refusal names what differs.
TRAINING_STATE_FORMAT = 3


def fingerprint(*arrays: np.ndarray, settings: dict[str, Any]) -> dict[str, str]:
    """What a resumed fit must share with the first: the training-state format
    (:data:`TRAINING_STATE_FORMAT`), a SHA-256 of the data, and each setting's canonical
    repr, one entry each, so that a refusal can name what differs
    (:func:`identity_difference`)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return {
        "format": str(TRAINING_STATE_FORMAT),
        "data": digest.hexdigest(),
        **{f"setting {name}": repr(_canonical(settings[name])) for name in sorted(settings)},
    }


def identity_difference(stored: object, current: dict[str, str] | str) -> str:
    """Why a training state's identity is not the current fit's, in words that follow
    "it was written"."""
    if not isinstance(current, dict):
        return "for another fit"
    if not isinstance(stored, dict) or stored.get("format") != current.get("format"):
        found = stored.get("format", "?") if isinstance(stored, dict) else "1 or 2"
        return (
            "by a vmonf whose training differs (training-state format "
            f"{found}; this one writes {current.get('format')})"
        )
    if stored.get("setting estimator") != current.get("setting estimator"):
        other = str(stored.get("setting estimator", "?")).strip("'")  # a repr'd name
        return f"for another estimator ({other})"
    keys = sorted(set(stored) | set(current))
    settings = [k.removeprefix("setting ") for k in keys if k.startswith("setting ")
                and stored.get(k) != current.get(k)]  # fmt: skip
    parts = (["other data (X or y)"] if stored.get("data") != current.get("data") else []) + (
        [f"other settings ({', '.join(settings)})"] if settings else []
    )
    return "for " + " and ".join(parts) if parts else "for another fit"


def _canonical(value: Any) -> Any:
    """Settings in a form whose repr is equal exactly when the computation is: numpy
    scalars as Python numbers, lists as tuples, arrays by content (numpy's repr of a
    large array elides its middle)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _canonical(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, NUMPY_GENERATORS):
        # Its state moves with every draw; a resumed fit continues with the stored seed.
        return f"numpy {type(value).__name__}"
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return ("array", str(array.dtype), array.shape, hashlib.sha256(array.tobytes()).hexdigest())
    return value


def rng_state() -> dict[str, Any]:
    """The global RNG states training draws from (e.g. a VAE's noise): the CPU's, and
    every CUDA device's once CUDA is in use."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore what :func:`rng_state` returned (a bare tensor: the CPU state alone)."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state, "cuda": []}
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Stage:
    """One :func:`train` call as the checkpointer sees it.

    ``finished`` holds the stored result of a stage completed before an
    interruption (replay it); ``progress`` the state of the stage that was in
    progress (continue it); both are None for a new stage.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        index: int,
        finished: dict[str, Any] | None,
        progress: dict[str, Any] | None,
    ) -> None:
        self.checkpointer = checkpointer
        self.index = index
        self.finished = finished
        self.progress = progress
        self.last_saved_step = 0

    def replay(self, module: nn.Module, generator: torch.Generator) -> dict[str, Any]:
        """Put ``module`` and ``generator`` where the finished stage left them; returns
        its stored result fields."""
        assert self.finished is not None
        module.load_state_dict(self.finished["module"])
        generator.set_state(self.finished["generator"])
        set_rng_state(self.finished["rng"])
        return self.finished["result"]

    def due(self, step: int, device: torch.device) -> bool:
        """Whether a checkpoint is due after ``step`` (or an interruption is pending) on
        any rank: data-parallel ranks decide together."""
        return any_rank(self.checkpointer.due(step - self.last_saved_step), device)

    def save(self, step: int, progress: dict[str, Any], device: torch.device) -> None:
        """Write the in-progress state (from :func:`train`, at a step boundary); then
        raise :class:`TrainingInterrupted` on every rank if any rank was interrupted."""
        self.last_saved_step = step
        self.checkpointer.write(progress={**progress, "rng": rng_state()})
        if any_rank(self.checkpointer.interrupt_requested, device):
            raise TrainingInterrupted(self.checkpointer.path)

    def finish(self, result: dict[str, Any], module: nn.Module, generator: torch.Generator) -> None:
        """Record the stage as finished (result, final module and generator states)."""
        self.checkpointer.finished.append(
            {
                "result": result,
                "module": _cpu_state(module),
                "generator": generator.get_state(),
                "rng": rng_state(),
            }
        )
        self.checkpointer.write(progress=None)


class Checkpointer:
    """Periodic, atomic training-state checkpoints for one fit (see the module doc).

    Args:
        path: the training-state file.
        identity: what a resumed fit must match (e.g. :func:`fingerprint` of data
            and settings); a file written for another identity is refused.
        every_steps: checkpoint after this many optimiser steps (None = never by count).
        every_seconds: ... or after this many seconds (None = never by time).
        resume: continue from ``path`` if it exists (else start afresh).
        seed: the fit's seed; a resumed fit uses the seed stored in the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        identity: dict[str, str] | str,
        *,
        every_steps: int | None = 100,
        every_seconds: float | None = 60.0,
        resume: bool = False,
        seed: int = 0,
    ) -> None:
        if every_steps is not None:
            check_positive_int(every_steps, "checkpoint_every")
        check_positive_float(every_seconds, "checkpoint_seconds", allow_none=True)
        self.path = Path(path)
        self.identity = identity
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.seed = seed
        self.finished: list[dict[str, Any]] = []
        self.resumed = False
        self.interrupt_requested = False
        self._progress: dict[str, Any] | None = None
        self._next_stage = 0
        self._last_write = time.monotonic()
        self._opened = time.perf_counter()
        self.elapsed_before = 0.0  # seconds the fit ran before, up to the file's last write
        if resume and self.path.exists():
            payload = load_checkpoint(self.path, KIND)
            if payload.get("identity") != identity:
                difference = identity_difference(payload.get("identity"), identity)
                raise ValueError(
                    f"cannot resume from {self.path}: it was written {difference} "
                    "(start without resume, or use another checkpoint path)"
                )
            try:
                self.seed = int(payload["seed"])
                self.finished = list(payload["finished"])
                self._progress = payload["progress"]
                self.elapsed_before = float(payload.get("elapsed", 0.0))
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{self.path} is a damaged training state: {exc}") from None
            self.resumed = True
        elif self.path.exists():
            self._check_overwritable()

    def _check_overwritable(self) -> None:
        """A fresh fit replaces an earlier training state at its path, never another file
        (a saved model given as ``checkpoint`` by mistake)."""
        try:
            load_checkpoint(self.path, KIND)
        except CheckpointError as exc:
            raise ValueError(
                f"checkpoint={str(self.path)!r} names a file that is not a vmonf training "
                f"state ({exc}); a fit would overwrite it: choose another checkpoint path, "
                "or delete the file"
            ) from None

    def elapsed(self) -> float:
        """Seconds this fit has run: before the resume (as last saved) and since."""
        return self.elapsed_before + time.perf_counter() - self._opened

    def open_stage(self) -> Stage:
        """The next stage of the fit: a replay, a continuation or a new one."""
        index = self._next_stage
        self._next_stage += 1
        if index < len(self.finished):
            return Stage(self, index, self.finished[index], None)
        progress = self._progress if index == len(self.finished) else None
        self._progress = None
        return Stage(self, index, None, progress)

    def due(self, steps_since: int) -> bool:
        if self.interrupt_requested:
            return True
        if self.every_steps is not None and steps_since >= self.every_steps:
            return True
        return (
            self.every_seconds is not None
            and time.monotonic() - self._last_write >= self.every_seconds
        )

    def write(self, progress: dict[str, Any] | None) -> None:
        payload = {
            "identity": self.identity,
            "seed": self.seed,
            "finished": self.finished,
            "progress": progress,
            "elapsed": self.elapsed(),
        }
        if is_main_process():  # data-parallel ranks hold the same state: rank 0 writes it
            save_checkpoint(payload, self.path, KIND)
        self._last_write = time.monotonic()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within the block, the first SIGINT asks for a checkpoint and a clean stop; a
        process that ignores SIGINT, as background and nohup jobs do, keeps ignoring it."""
        if (
            threading.current_thread() is not threading.main_thread()  # only it sets handlers
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        ):
            yield
            return

        def request(signum: int, frame: object) -> None:
            if self.interrupt_requested:
                raise KeyboardInterrupt
            self.interrupt_requested = True

        previous = signal.signal(signal.SIGINT, request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
