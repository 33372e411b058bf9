"""``MixtureEstimator``: what both mixture estimators share.

The base owns input validation, standardisation, devices and dtypes, seeding,
chunked evaluation, scoring, sampling and checkpoints; subclasses fill small
hooks (``_fit``, ``_log_joint``, ``_log_proba``, ``_build``), as in
scikit-learn's ``BaseMixture``.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
import warnings
import weakref
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Self, cast

import numpy as np
import sklearn.exceptions
import torch
from sklearn.base import BaseEstimator, ClusterMixin, DensityMixin
from sklearn.cluster import KMeans
from torch import Tensor, nn

from vmonf._validation import (
    SeedLike,
    check_array,
    check_bool,
    check_feature_names,
    check_labels,
    check_positive_float,
    check_positive_int,
    check_random_state,
    check_seed,
    feature_names,
    image_shape,
    user_stacklevel,
)
from vmonf.checkpoint import (
    CheckpointError,
    from_plain,
    load_checkpoint,
    plain_setting,
    save_checkpoint,
    to_plain,
)
from vmonf.distributed import broadcast_int, count_ranks, init_from_env
from vmonf.heap import retain_freed_memory
from vmonf.packing import unpack_parameters
from vmonf.preprocessing import Standardizer
from vmonf.resume import Checkpointer, fingerprint
from vmonf.training import (
    MAX_BATCH,
    MAX_THREADS,
    NonFiniteLossError,
    eval_chunk,
    fit_threads,
    torch_threads,
    warm_up_optimizer,
)

__all__ = [
    "DIVERGENCE_MARGIN",
    "MixtureEstimator",
    "NotFittedError",
    "check_loadable_device",
    "divergence_floor",
    "fitted_setting",
    "kmeans_clusters",
    "probabilities",
    "sampling_seed",
    "torch_device",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dtype_name(value: object) -> str:
    """ "float32" or "float64" from that name, a torch dtype, or a numpy dtype-like
    (``np.float64``, ``np.dtype("f4")``); ``ValueError`` for any other."""
    name: object = value
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif value is not None and not isinstance(value, str):  # np.dtype(None) is float64
        with suppress(TypeError, ValueError):
            name = np.dtype(cast(Any, value)).name
    if name not in DTYPES:
        raise ValueError(
            f"dtype must be one of {tuple(DTYPES)} (or the numpy or torch dtype), got {value!r}"
        )
    return cast(str, name)


DEVICES = ("cpu", "cuda", "auto")  # and "cuda:N", or a torch.device of those
_CUDA_INDEX = re.compile(r"cuda:(0|[1-9]\d{0,3})")  # as torch.device parses it


def device_name(device: object) -> str:
    """A ``device`` setting as its canonical name: "cpu", "cuda", "cuda:N" or "auto"
    (from that string or a ``torch.device``); ValueError/TypeError naming the choices."""
    if isinstance(device, torch.device):
        device = "cpu" if device.type == "cpu" else str(device)
    if not isinstance(device, str):
        raise TypeError(
            f"device must be 'cpu', 'cuda', 'cuda:N', 'auto' or a torch.device, got "
            f"{type(device).__name__}"
        )
    if device in DEVICES or _CUDA_INDEX.fullmatch(device):
        return device
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


# Standardised magnitudes beyond these overflow the model's arithmetic (z**2, MLPs).
MAX_STANDARDISED = {torch.float32: 1e15, torch.float64: 1e150}
# Settings that do not change what a fit computes: a fit may resume under other values.
RESUMABLE_CHANGES = frozenset(
    {"callback", "verbose", "n_threads", "max_time", "checkpoint", "checkpoint_every",
     "checkpoint_seconds"}
)  # fmt: skip


# Version of what save() writes; load() reads every earlier one. 2: VMoNF's elbo_ in the
# user's units (it was standardised), fit_time_ and labels_ saved. 3: VMoNF's
# history_ losses in the user's units. 4: CompetitiveMixture's settings may be "auto" (tol,
# assignment) and None (activation), which earlier versions cannot read. 5:
# CompetitiveMixture has a warm_start setting.
SAVE_FORMAT = 5
# A fit whose mean training log-likelihood (exact, nats per point) ends this far below
# log K under the untrained model's has diverged: with uniform weights, flows that each
# model their own points at least as well as the untrained density lose at most log K
# against it, so anything worse means broken flows. (Not the ELBO: while q(c|x) is still
# wrong the bound can sit far below log p(x).)
DIVERGENCE_MARGIN = 1.0


def divergence_floor(initial_score: float, n_components: int) -> float:
    """The lowest mean training score (nats per point) of a fit that has not diverged,
    given the untrained model's ``initial_score``."""
    return initial_score - math.log(n_components) - DIVERGENCE_MARGIN


def probabilities(log_p: np.ndarray | Tensor) -> np.ndarray:
    """exp(log_p) normalised along the last axis in float64: (..., K) -> (..., K).

    Log-probabilities normalised in float32 sum to 1 only within about 1e-7 after
    exp, which ``numpy.random.choice`` and scikit-learn's ``log_loss`` refuse."""
    if isinstance(log_p, Tensor):
        log_p = log_p.detach().cpu().numpy()
    log_p = np.asarray(log_p, dtype=np.float64)
    p = log_p - log_p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)  # in place: 1e7 rows of K = 5 are 400 MB a copy
    p /= p.sum(axis=-1, keepdims=True)
    return p


def sampling_seed(estimator: Any, random_state: object) -> int | None:
    """The seed of a ``sample`` call: ``random_state``, else the estimator's fitted one."""
    seed = check_seed(random_state, "random_state")
    return check_seed(fitted_setting(estimator, "random_state")) if seed is None else seed


def fitted_setting(estimator: Any, name: str) -> Any:
    """The value setting ``name`` had when ``estimator`` was fitted (or loaded), from its
    ``fitted_params_``; from the start of a fit on, that fit's. ``set_params`` after a
    fit changes the next fit, not this one's predictions or saved settings."""
    params = getattr(estimator, "fitted_params_", None)
    if params is None:  # unfitted (NotFittedError), or pickled by an older vmonf
        estimator._check_is_fitted()
        return getattr(estimator, name)
    return params[name]


def torch_device(device: object) -> torch.device:
    """The torch device a ``device`` setting (see :func:`device_name`) names here; a
    ValueError for another value, or for a CUDA device this machine does not have."""
    name = device_name(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} was requested but CUDA is not available")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r} was requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        if index is not None and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
            raise ValueError(
                f"device={name!r} under torchrun would put every process on one GPU: use "
                "device='cuda' (each process its LOCAL_RANK's)"
            )
    return torch.device(name)


def check_loadable_device(
    payload: object, device: object, path: str | os.PathLike, loader: str
) -> None:
    """Refuse, with the way out, a checkpoint fitted on CUDA where there is none, unless
    ``device`` (checked by the caller with :func:`torch_device`) overrides where it loads."""
    if device is not None:
        return
    params = payload.get("params", {}) if isinstance(payload, dict) else None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} holds no settings")
    fitted_on = str(params.get("device"))
    if fitted_on.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(
            f"{path} was fitted with device={fitted_on!r} and CUDA is not available here: "
            f"load it with {loader}.load(path, device='cpu')"
        )


# Estimators inside fit(): how many fits of each are running (a callback may refit).
_FITTING: weakref.WeakKeyDictionary[MixtureEstimator, int] = weakref.WeakKeyDictionary()


class _WarmSource(NamedTuple):
    """The fit a ``warm_start`` fit continues: its standardisation and model."""

    standardizer: Standardizer
    model: nn.Module


# The fit each running fit continues, kept beside the estimator, not on it (as _FITTING):
# a copy or pickle taken in a callback carries no previous model, and a refit from a
# callback gets its own entry.
_WARM_SOURCES: weakref.WeakKeyDictionary[MixtureEstimator, _WarmSource | None] = (
    weakref.WeakKeyDictionary()
)


def _comparable(value: object) -> object:
    """A setting as compared across fits: a list (a loaded model's) as a tuple."""
    return tuple(value) if isinstance(value, list) else value


def kmeans_clusters(x: Tensor, n_clusters: int, seed: int) -> Tensor:
    """k-means (scikit-learn, 10 restarts) cluster of each point x (N, D): int64 (N,) on
    x's device; the initialisation both estimators offer."""
    km = KMeans(n_clusters, n_init=10, random_state=seed)
    return torch.as_tensor(km.fit_predict(x.double().cpu().numpy()), device=x.device).long()


def _warn_on_merged_values(u64: Tensor, dtype: torch.dtype) -> None:
    """Warn when casting the standardised training points u64 (a sample of rows, float64)
    to the model's dtype merges many distinct values of a feature: a few extreme points
    stretch the standardisation until the rest become indistinguishable (one point at
    1e10 among 200 normal ones left 5 distinct rows in float32)."""
    if dtype == torch.float64 or u64.shape[0] < 20:
        return

    def distinct(values: Tensor) -> Tensor:  # per column
        ordered = values.sort(dim=0).values
        return (ordered[1:] != ordered[:-1]).sum(0) + 1

    before, after = distinct(u64), distinct(u64.to(dtype))
    merged = ((before >= 20) & (after < before / 2)).nonzero().flatten().tolist()
    if merged:
        warnings.warn(
            f"feature(s) {merged[:10]} of X: in the model's dtype "
            f"({str(dtype).removeprefix('torch.')}) most of their distinct values become "
            "equal after standardisation, because a few extreme values stretch it; use "
            'dtype="float64", or remove or clip the extreme values',
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _fit_time(started: float, checkpointer: Checkpointer | None) -> float:
    """Wall seconds of a fit, with what it ran before a resume (to its last checkpoint)."""
    if checkpointer is not None:
        return checkpointer.elapsed()
    return time.perf_counter() - started


class NotFittedError(sklearn.exceptions.NotFittedError):
    """The estimator was used before ``fit`` (a ValueError and an AttributeError, as
    scikit-learn's, which it subclasses)."""


class _CountsUnused(Protocol):
    """A layer with trained entries it never reads, such as LULinear."""

    def n_unused_parameters(self) -> int: ...


class MixtureEstimator(DensityMixin, ClusterMixin, BaseEstimator):
    """Base of mixture estimators: numpy at the boundary, tensors inside.

    Subclasses store hyper-parameters in ``__init__`` only (at least
    ``n_components, max_epochs, max_time, batch_size, learning_rate, random_state,
    verbose, device``, plus ``dtype``, ``n_threads``, ``compile``, ``validation_fraction``,
    ``warm_start``, ``checkpoint``, ``checkpoint_every`` and ``checkpoint_seconds``), name
    the settings that shape their model in ``_warm_architecture``, and implement:

    * ``_validate_params()`` -> None
    * ``_fit(x: Tensor, y: Tensor, generator, checkpointer) -> None``: train on
      standardised x, passing ``checkpointer`` to every :func:`vmonf.training.train`
      call; set ``self.model_`` (an ``nn.Module``) and fitted attributes;
    * ``_build() -> nn.Module``: an untrained model of the right shape (for load);
    * ``_log_joint(u) -> (N, K)``: log pi_k + log p_k(u) in standardised units;
    * ``_log_proba(u) -> (N, K)``: the log responsibilities used by ``predict``.
    """

    _checkpoint_kind = "MixtureEstimator"
    _uses_labels = True  # False: fit ignores y, as scikit-learn's unsupervised estimators
    _warm_architecture: tuple[str, ...] = ()  # settings a warm start keeps as fitted

    # Fitted attributes (set by fit or load).
    model_: nn.Module
    standardizer_: Standardizer

    # -- hooks --------------------------------------------------------------------------
    @abstractmethod
    def _validate_params(self) -> None: ...

    @abstractmethod
    def _fit(
        self, x: Tensor, y: Tensor, generator: torch.Generator, checkpointer: Checkpointer | None
    ) -> None: ...

    @abstractmethod
    def _build(self) -> nn.Module: ...

    @abstractmethod
    def _log_joint(self, u: Tensor) -> Tensor: ...

    def _log_proba(self, u: Tensor) -> Tensor:
        return torch.log_softmax(self._log_joint(u), dim=1)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} cannot sample")

    def _min_features(self) -> int:
        """Fewest features the components can model (coupling flows: 2)."""
        return 2

    def _fitted_state(self) -> dict[str, Any]:
        """Plain-data fitted attributes to save (beyond the model's weights)."""
        return {}

    # -- validation and plumbing -------------------------------------------------------
    def _validate_settings(self) -> None:
        """Check every hyper-parameter (the shared ones, then the subclass's)."""
        self._validate_common()
        self._validate_params()

    def _check_n_samples(self, n_samples: int) -> None:
        """Refuse fewer training points than components (checked settings)."""
        if self.n_components > n_samples:
            raise ValueError(
                f"n_components={self.n_components} is larger than the number of samples "
                f"({n_samples})"
            )

    def _validate_common(self) -> None:
        check_positive_int(self.n_components, "n_components")
        check_positive_int(self.max_epochs, "max_epochs")
        check_positive_float(self.max_time, "max_time", allow_none=True)
        check_positive_int(self.batch_size, "batch_size", maximum=MAX_BATCH)
        check_positive_float(self.learning_rate, "learning_rate")
        check_random_state(self.random_state)  # validated only: fit draws from a generator
        device_name(self.device)
        dtype_name(self.dtype)
        if self.n_threads is not None:
            check_positive_int(self.n_threads, "n_threads", maximum=MAX_THREADS)
        check_bool(self.compile, "compile")
        check_bool(self.warm_start, "warm_start")
        if self.warm_start and self.checkpoint is not None:
            raise ValueError(
                "warm_start=True cannot be combined with a checkpoint: the training state "
                "does not record the weights a warm-started fit began from"
            )
        fraction = check_positive_float(
            self.validation_fraction, "validation_fraction", allow_zero=True
        )
        if fraction >= 0.5:
            raise ValueError(f"validation_fraction must be < 0.5, got {fraction}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str | os.PathLike):
            raise TypeError(
                f"checkpoint must be a file path or None, got {type(self.checkpoint).__name__}"
            )
        if self.checkpoint is not None and Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint must name a file, got the directory {self.checkpoint!r}")
        if self.checkpoint_every is not None:
            check_positive_int(self.checkpoint_every, "checkpoint_every")
        check_positive_float(self.checkpoint_seconds, "checkpoint_seconds", allow_none=True)
        if self.callback is not None and not callable(self.callback):
            raise TypeError(
                f"callback must be callable as callback(estimator, epoch_or_round) or None, "
                f"got {type(self.callback).__name__}"
            )

    @property
    def _torch_device(self) -> torch.device:
        return torch_device(self.device)

    @property
    def _torch_dtype(self) -> torch.dtype:
        return DTYPES[dtype_name(self.dtype)]

    # The fitted model computes where and in the dtype it was fitted (or loaded): device
    # and dtype set by set_params after a fit take effect at the next fit, as in sklearn.
    @property
    def _fitted_device(self) -> torch.device:
        return self.standardizer_.mean.device

    @property
    def _fitted_dtype(self) -> torch.dtype:
        return next(t for t in self.model_.state_dict().values() if t.is_floating_point()).dtype

    @contextmanager
    def _seeded(self, seed: int, device: torch.device | None = None) -> Iterator[None]:
        """Within the block torch's global RNGs (the CPU's, and the CUDA device's where the
        model computes: ``device``, by default the fitted model's) start from ``seed``;
        the caller's states are restored after."""
        device = self._fitted_device if device is None else device
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):  # "cuda:1"'s generator, not the current one's
                    torch.cuda.manual_seed(seed)
            yield

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Evaluation mode, no gradients and the estimator's thread count; malloc keeps
        freed memory (:func:`~vmonf.heap.retain_freed_memory`), as in training: every
        chunk reallocates the last one's temporaries, and a process that scores a loaded
        model without fitting one scored at about half the speed (100-120 thousand
        points/s, with a minor page fault per point, against 220-245 thousand)."""
        retain_freed_memory()
        self.model_.eval()
        with torch.no_grad(), torch_threads(self.n_threads):
            yield

    def _check_is_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(X) first"
            )

    def _fitted_setting(self, name: str) -> Any:
        return fitted_setting(self, name)

    def _standardise(self, x: np.ndarray, dtype: torch.dtype) -> Tensor:
        """x (N, D) standardised in float64 (the standardiser is kept in float64), then
        cast to ``dtype``; refuses values so far out that they would overflow it."""
        self._check_standardisable(x, dtype)
        return self._standardised(x, dtype)

    def _standardised(self, x: np.ndarray, dtype: torch.dtype) -> Tensor:
        """:meth:`_standardise` without the range check."""
        x64 = torch.as_tensor(x, dtype=torch.float64, device=self._fitted_device)
        return self.standardizer_(x64).to(dtype)

    def _check_standardisable(self, x: np.ndarray, dtype: torch.dtype) -> None:
        """Refuse finite rows x (N, D) whose standardised values would overflow ``dtype``.

        Judged from each column's extremes (standardising is increasing in every
        column), so that no standardised copy of x is made.
        """
        if x.shape[0] == 0:
            return
        extremes = torch.as_tensor(
            np.stack([x.min(axis=0), x.max(axis=0)]), device=self._fitted_device
        )
        limit = MAX_STANDARDISED[dtype]
        if bool((self.standardizer_(extremes).abs() > limit).any()):
            raise ValueError(
                f"X has values more than {limit:.0e} standard deviations from the training "
                f"data, which overflow the model's dtype ({str(dtype).removeprefix('torch.')})"
            )

    def _validate_X(self, X: object) -> np.ndarray:
        """Validate X for a fitted model: float64 rows (N, D) in the user's units, whose
        standardised values fit the model's dtype; images (N, H, W[, C]) only for a
        model fitted to images (flattened). :meth:`_chunked` standardises them chunk by
        chunk, :meth:`_standardise` all at once."""
        self._check_is_fitted()
        check_feature_names(X, getattr(self, "feature_names_in_", None), type(self).__name__)
        x = check_array(
            X, "X", n_features=self.n_features_in_, fitted_by=type(self).__name__,
            allow_images=getattr(self, "image_shape_", None) is not None,
        )  # fmt: skip
        self._check_standardisable(x, self._fitted_dtype)
        return x

    def _chunked(self, fn: Callable[[Tensor], Tensor], u: Tensor | np.ndarray) -> np.ndarray:
        """Apply ``fn`` in chunks without gradients; numpy float64 out.

        ``u`` is standardised already (a tensor) or rows from :meth:`_validate_X` (numpy),
        standardised a chunk at a time: scoring 1e7 2-D rows then holds the output and
        one chunk's temporaries, not float64 and model-dtype copies of all of them.
        Results go straight into one preallocated array: keeping a small tensor per
        chunk between the chunks' large temporaries fragmented the heap (scoring 1e7
        points took 4.8 GiB more memory instead of the output's 80 MiB).
        """
        out: np.ndarray | None = None
        dtype = self._fitted_dtype
        with self._inference():
            chunk = eval_chunk(self._fitted_device)
            for i in range(0, u.shape[0], chunk):
                rows = u[i : i + chunk]
                if isinstance(rows, np.ndarray):
                    rows = self._standardised(rows, dtype)
                part = fn(rows).double().cpu().numpy()
                if out is None:
                    out = np.empty((u.shape[0], *part.shape[1:]))
                out[i : i + part.shape[0]] = part
        return out if out is not None else np.empty((0,))

    def _checkpointer(
        self, x: np.ndarray, labels: np.ndarray, seed: int, resume: bool
    ) -> Checkpointer | None:
        if self.checkpoint is None:
            if resume:
                raise ValueError("resume=True needs a checkpoint path (the checkpoint parameter)")
            return None
        settings = {
            k: v for k, v in self.get_params(deep=False).items() if k not in RESUMABLE_CHANGES
        }
        settings["dtype"] = dtype_name(settings["dtype"])  # "float64" resumes np.float64's
        settings["device"] = device_name(settings["device"])
        checkpointer = Checkpointer(
            self.checkpoint,
            fingerprint(x, labels, settings={"estimator": type(self).__name__, **settings}),
            every_steps=self.checkpoint_every,
            every_seconds=self.checkpoint_seconds,
            resume=resume,
            seed=seed,
        )
        if resume:  # data-parallel: rank 0 wrote the file; every rank must read it
            found, ranks = count_ranks(checkpointer.resumed, self._torch_device)
            if 0 < found < ranks:
                raise ValueError(
                    f"{self.checkpoint} was found by {found} of {ranks} processes: a "
                    "data-parallel fit resumes only from a folder every machine shares"
                )
        return checkpointer

    # -- public API --------------------------------------------------------------------
    def fit(self, X: object, y: object | None = None, *, resume: bool = False) -> Self:
        """Fit to X (N, D), or (N, ...) of 3 or more dimensions (images (N, H, W) or
        (N, H, W, C)), each row flattened (``sample`` returns that layout); ``y`` (N,)
        optional labels in [-1, K), -1 = unlabelled (ignored by unsupervised estimators).
        For pixel data see :class:`vmonf.images.ImageMixture`.

        With a ``checkpoint`` path the training state is saved there every
        ``checkpoint_every`` steps / ``checkpoint_seconds`` seconds and on Ctrl-C
        (which then raises :class:`vmonf.resume.TrainingInterrupted`);
        ``resume=True`` continues from that file when it exists and ends with the
        same weights as an uninterrupted fit.

        With ``warm_start=True`` a fitted estimator continues from its previous fit (its
        model and standardisation) instead of starting afresh.
        """
        self._validate_settings()
        source = None
        if self.warm_start and hasattr(self, "model_"):
            self._check_warm_architecture()
            source = _WarmSource(self.standardizer_, self.model_)
        outer = _WARM_SOURCES.get(self)
        _WARM_SOURCES[self] = source
        try:
            return self._fit_validated(X, y, resume)
        finally:
            if outer is None:
                _WARM_SOURCES.pop(self, None)
            else:
                _WARM_SOURCES[self] = outer

    def _fit_validated(self, X: object, y: object | None, resume: bool) -> Self:
        """``fit`` once the settings are checked."""
        check_bool(resume, "resume")
        init_from_env(self._torch_device)  # under torchrun: train data-parallel
        x = check_array(X, "X", min_samples=2, allow_images=True)
        if x.shape[1] < self._min_features():
            raise ValueError(
                f"X has {x.shape[1]} feature(s) (n_features={x.shape[1]}), but "
                f"{type(self).__name__} with coupling flows "
                f"needs at least {self._min_features()}: each coupling splits the features "
                "in two"
            )
        self._check_n_samples(x.shape[0])
        labels = (
            check_labels(y, x.shape[0], self.n_components)
            if y is not None and self._uses_labels
            else np.full(x.shape[0], -1, dtype=np.int64)
        )
        seed = check_seed(self.random_state)  # a plain int (torch refuses numpy ints)
        if seed is None:  # data-parallel ranks draw one: rank 0's
            seed = broadcast_int(int(np.random.SeedSequence().generate_state(1)[0]))
        # A one-off import, outside max_time and fit_time_ (the checkpointer's clock
        # counts from its creation: fit_time_ includes the time before a resume).
        warm_up_optimizer()
        checkpointer = self._checkpointer(x, labels, seed, resume)
        if checkpointer is not None:
            seed = checkpointer.seed  # a resumed fit continues with the stored seed
        generator = torch.Generator().manual_seed(seed)
        interruptible = nullcontext() if checkpointer is None else checkpointer.interruptible()
        before = self._fitted_attributes()
        for name in before:  # mid-fit (a callback, a copy) shows no previous fit's results
            delattr(self, name)
        started = time.perf_counter()
        # save() refuses a half-set fit (e.g. from the callback); kept beside the
        # estimator, not on it, so that a copy or pickle taken meanwhile does not carry it
        _FITTING[self] = _FITTING.get(self, 0) + 1
        try:
            # What this fit computes with: set_params after it changes the next fit, not
            # this one's predictions or what save() writes beside its weights.
            self.fitted_params_ = {
                # A callback is no setting of the model: kept, it would hold what it
                # recorded and stop a fitted model from pickling.
                name: None if name == "callback" else value
                for name, value in self.get_params(deep=False).items()
            }
            device = self._torch_device
            with fit_threads(self.n_threads), self._seeded(seed, device), interruptible:
                x64 = torch.as_tensor(x, dtype=torch.float64, device=device)
                self.standardizer_ = self._standardizer_for(x64)
                self.n_features_in_ = x.shape[1]
                names = feature_names(X)  # a data frame's columns, as scikit-learn keeps them
                if names is None:
                    self.__dict__.pop("feature_names_in_", None)
                else:
                    self.feature_names_in_ = names
                self.image_shape_ = image_shape(X)  # (H, W[, C]) when fitted to images
                u = self._standardise(x, self._torch_dtype)
                sample = x64[:: max(1, x.shape[0] // 2000)]  # ~2000 rows: enough to tell
                _warn_on_merged_values(self.standardizer_(sample), u.dtype)
                self._fit(u, torch.as_tensor(labels, device=u.device), generator, checkpointer)
        except NonFiniteLossError:
            self.fit_time_ = _fit_time(started, checkpointer)
            raise  # _fit kept the last good model, fitted and usable
        except BaseException:
            # Never half old fit, half new: back to the previous fit (or to unfitted).
            for name in self._fitted_attributes():
                delattr(self, name)
            self.__dict__.update(before)
            raise
        finally:
            _FITTING[self] -= 1
            if not _FITTING[self]:  # the outermost fit: no training of its own goes on
                del _FITTING[self]
                for value in vars(self).values():  # the fitted modules, trained packed
                    if isinstance(value, nn.Module):
                        unpack_parameters(value)
        self.fit_time_ = _fit_time(started, checkpointer)
        return self

    def _standardizer_for(self, x64: Tensor) -> Standardizer:
        """The standardisation a fit trains in: fitted to ``x64`` (N, D) float64, or a
        warm start's, the previous fit's (its model was trained in those units)."""
        source = _WARM_SOURCES.get(self)
        if source is None:
            return Standardizer(x64.shape[1]).to(x64.device).fit(x64)
        n_fitted = source.standardizer.mean.numel()
        if x64.shape[1] != n_fitted:
            raise ValueError(
                f"warm_start: X has {x64.shape[1]} features, the previous fit {n_fitted}"
            )
        return copy.deepcopy(source.standardizer).to(x64.device)

    def _check_warm_architecture(self) -> None:
        """The settings that shape the model must be those of the fit warm-started from."""
        fitted = getattr(self, "fitted_params_", None) or {}
        now = self.get_params(deep=False)
        changed = [
            name
            for name in self._warm_architecture
            if name in fitted and _comparable(fitted[name]) != _comparable(now[name])
        ]
        if changed:
            raise ValueError(
                f"warm_start: {', '.join(changed)} changed since the fit it would continue "
                f"({', '.join(f'{n}={fitted[n]!r}' for n in changed)} there); refit with "
                "warm_start=False for another model"
            )

    def _warm_model(self) -> nn.Module | None:
        """In a warm-started fit, a copy of the previous fit's model in this fit's dtype
        and device; else None."""
        source = _WARM_SOURCES.get(self)
        if source is None:
            return None
        state = source.model.state_dict()
        model = self._build_to_load(state)
        model.load_state_dict(state)  # same architecture settings: same shapes
        return model

    def _fitted_attributes(self) -> dict[str, Any]:
        """The fitted attributes (scikit-learn's trailing underscore). A fit assigns
        new objects to them and never changes the previous ones in place."""
        return {n: v for n, v in vars(self).items() if n.endswith("_") and not n.startswith("_")}

    def fit_predict(self, X: object, y: object | None = None) -> np.ndarray:
        """``fit(X, y).predict(X)``."""
        return self.fit(X, y).predict(X)

    def score_samples(self, X: object) -> np.ndarray:
        """Exact log density log p(x) of each row, (N,), nats, in the user's units."""
        u = self._validate_X(X)
        log_det = self.standardizer_.log_abs_det()
        return self._chunked(lambda c: torch.logsumexp(self._log_joint(c), dim=1) + log_det, u)

    def score(self, X: object, y: object | None = None) -> float:
        """Mean of :meth:`score_samples` (nats per point)."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X: object) -> np.ndarray:
        """Responsibilities (N, K) of each component for each row."""
        u = self._validate_X(X)
        return probabilities(self._chunked(self._log_proba, u))

    def predict(self, X: object) -> np.ndarray:
        """Most responsible component of each row, (N,) int64."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def sample(
        self, n_samples: int = 1, random_state: SeedLike = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw points from the fitted mixture -> (X (n, D), component labels (n,)).

        ``random_state`` seeds the draw; None takes the estimator's ``random_state``, as
        scikit-learn's ``GaussianMixture.sample`` does (an int then gives the same points
        at every call; fresh ones when that is None too; a numpy ``RandomState`` or
        ``Generator`` gives a seed drawn from it at each call). A model fitted to images
        (N, H, W) returns X as images (n, H, W).
        """
        self._check_is_fitted()
        n = check_positive_int(n_samples, "n_samples", minimum=1)
        seed = sampling_seed(self, random_state)
        generator = torch.Generator(device=self._fitted_device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        with self._inference():
            u, labels = self._sample(n, generator)
            x = self.standardizer_.inverse(u)  # float64
        x_np = x.cpu().numpy()
        shape = getattr(self, "image_shape_", None)
        if shape is not None:  # fitted to images: samples are images
            x_np = x_np.reshape(n, *shape)
        return x_np, labels.cpu().numpy().astype(np.int64, copy=False)

    @classmethod
    def _upgrade_params(cls, params: dict[str, Any], version: int) -> dict[str, Any]:
        """Settings saved in file format ``version``, as this version reads them."""
        return params

    def _upgrade_fitted(self, version: int) -> None:
        """Bring fitted attributes loaded from file format ``version`` up to date."""

    def _build_to_load(self, state: dict[str, Tensor]) -> nn.Module:
        """The untrained model that ``state`` (a saved state dict) loads into."""
        return self._build()

    def _density_module(self) -> nn.Module:
        """The components that define p(x), mixing weights aside (what BIC/AIC count)."""
        return self.model_

    def _n_weight_parameters(self) -> int:
        """Free mixing weights fitted to the data: K - 1, or 0 when they are fixed."""
        return 0

    def n_parameters(self) -> int:
        """Number of fitted scalars that define p(x) (for BIC/AIC): the components'
        trained parameters (less entries a layer never reads, such as the unused
        triangles of :class:`~vmonf.coupling.LULinear`'s factors) plus the free mixing
        weights."""
        self._check_is_fitted()
        module = self._density_module()
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        unused = sum(  # layers that say so, such as LULinear
            cast(_CountsUnused, layer).n_unused_parameters()
            for layer in module.modules()
            if hasattr(layer, "n_unused_parameters")
        )
        return trained - unused + self._n_weight_parameters()

    def bic(self, X: object) -> float:
        """Bayesian information criterion on X (lower is better).

        The penalty counts every trained weight (:meth:`n_parameters`: hundreds per flow
        component), so BIC and AIC favour few components far more than for a Gaussian
        mixture; choose K by held-out log-likelihood (:meth:`score` on held-out points,
        or ``GridSearchCV`` over ``n_components``) instead."""
        n = check_array(X, "X", allow_images=True).shape[0]
        return float(-2.0 * self.score(X) * n + self.n_parameters() * np.log(n))

    def aic(self, X: object) -> float:
        """Akaike information criterion on X (lower is better); see :meth:`bic` on
        choosing K."""
        n = check_array(X, "X", allow_images=True).shape[0]
        return float(-2.0 * self.score(X) * n + 2.0 * self.n_parameters())

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted estimator atomically (weights and plain data only; not the
        ``callback``, nor the ``checkpoint`` path of the fit's training state)."""
        if self in _FITTING:
            raise ValueError(
                f"{type(self).__name__}.save() is not available while fit() runs (e.g. in "
                "its callback): the fitted attributes belong to no single fit yet. Save "
                "after fit returns, or pass checkpoint= to keep mid-fit training states"
            )
        self._check_is_fitted()
        try:
            payload = self._to_payload()
        except AttributeError as exc:  # e.g. a copy taken inside a first fit's callback
            raise ValueError(
                f"this {type(self).__name__} holds an unfinished fit ({exc}): fit it to the "
                "end before saving"
            ) from None
        return save_checkpoint(payload, path, self._checkpoint_kind)

    def _to_payload(self) -> dict[str, Any]:
        """What :meth:`save` writes: plain data and CPU tensors only."""
        return {
            # Callables (e.g. a callback) are not data: they are not saved. Nor is the
            # path of the fit's training state: it belongs to that run, and a loaded
            # model refitted with it would overwrite the run's state file.
            "params": {
                k: None if k == "checkpoint" else plain_setting(v)
                for k, v in self._fitted_params().items()
            },
            "format": SAVE_FORMAT,
            "model": {k: v.cpu() for k, v in self.model_.state_dict().items()},
            "standardizer": {k: v.cpu() for k, v in self.standardizer_.state_dict().items()},
            "fitted": {
                name: to_plain(value)
                for name, value in {
                    "n_features_in_": self.n_features_in_,
                    "image_shape_": getattr(self, "image_shape_", None),
                    "fit_time_": getattr(self, "fit_time_", math.nan),
                    # a list of str: an object array is no plain data
                    **(
                        {"feature_names_in_": self.feature_names_in_.tolist()}
                        if hasattr(self, "feature_names_in_")
                        else {}
                    ),
                    **self._fitted_state(),
                }.items()
            },
        }

    def _fitted_params(self) -> dict[str, Any]:
        """The settings as fitted (``set_params`` since takes effect at the next fit), the
        device as it resolved, so that a saved model loads as it computes now; those that
        do not change what a fit computes (``verbose``, ``n_threads``, ...) as they are."""
        params = self.get_params(deep=False)
        fitted = getattr(self, "fitted_params_", None) or {}
        params.update({k: v for k, v in fitted.items() if k not in RESUMABLE_CHANGES})
        dtype = self._fitted_dtype
        params["dtype"] = next(name for name, value in DTYPES.items() if value == dtype)
        if params["device"] != "auto" or torch_device("auto") != self._fitted_device:
            params["device"] = self._fitted_device.type
        return params

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Self:
        """Read an estimator written by :meth:`save` (``torch.load(weights_only=True)``).

        ``device`` ("cpu", "cuda", "cuda:N", "auto", a ``torch.device``) overrides the
        device it was fitted on, as ``torch.load``'s ``map_location`` does: a model fitted
        on a GPU loads on a CPU-only machine with ``device="cpu"``.
        """
        if device is not None:
            torch_device(device)  # a bad argument is the caller's, not the file's
        return cls._from_payload(load_checkpoint(path, cls._checkpoint_kind), device, path)

    @classmethod
    def _from_payload(
        cls, payload: dict[str, Any], device: str | torch.device | None, path: str | os.PathLike
    ) -> Self:
        """The estimator :meth:`_to_payload` described; ``path`` names the file in errors."""
        try:
            if not isinstance(payload, dict):
                raise CheckpointError(f"its content is a {type(payload).__name__}, not a dict")
            version = payload.get("format", 1)
            if not isinstance(version, int) or not 1 <= version <= SAVE_FORMAT:
                raise CheckpointError(
                    f"file format {version!r}: this version of vmonf reads formats 1 to "
                    f"{SAVE_FORMAT} (a newer vmonf wrote it?)"
                )
            check_loadable_device(payload, device, path, cls.__name__)
            params = cls._upgrade_params(dict(payload["params"]), version)
            if device is not None:
                params["device"] = device
            estimator = cls(**params)
            estimator.fitted_params_ = estimator.get_params(deep=False)
            for name, value in dict(payload["fitted"]).items():
                if not (isinstance(name, str) and name.endswith("_") and name[0] != "_"):
                    raise CheckpointError(f"{name!r} is not a fitted attribute")
                setattr(estimator, name, from_plain(value))
            if hasattr(estimator, "feature_names_in_"):
                estimator.feature_names_in_ = np.asarray(
                    [str(name) for name in estimator.feature_names_in_], dtype=object
                )
            estimator.standardizer_ = Standardizer(estimator.n_features_in_)
            estimator.standardizer_.load_state_dict(payload["standardizer"])
            estimator.model_ = estimator._build_to_load(payload["model"])
            estimator.model_.load_state_dict(payload["model"])
            estimator._upgrade_fitted(version)
        except CheckpointError as exc:
            if str(path) in str(exc):
                raise
            raise CheckpointError(f"{path} holds an unusable {cls.__name__} file: {exc}") from None
        except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{path} holds an incompatible {cls.__name__} checkpoint: {exc}"
            ) from None
        loaded_on, dtype = estimator._torch_device, estimator._torch_dtype
        estimator.standardizer_.to(device=loaded_on, dtype=torch.float64)
        estimator.model_.to(device=loaded_on, dtype=dtype).eval()
        return estimator
