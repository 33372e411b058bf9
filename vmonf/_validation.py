"""Input validation shared by every public entry point.

Public functions validate with these helpers and raise ``ValueError``/``TypeError``
naming the argument; private code may then assume clean inputs.
"""

from __future__ import annotations

import numbers
import operator
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Literal, cast, overload

import numpy as np
import scipy.sparse
import torch
from numpy.typing import ArrayLike

# torch seeds are 64-bit: keep to the signed range, with room for derived seeds.
MAX_SEED = 2**63 - 1

__all__ = [
    "MAX_SEED",
    "NUMPY_GENERATORS",
    "SeedLike",
    "check_array",
    "check_betas",
    "check_bool",
    "check_choice",
    "check_feature_names",
    "check_integer_labels",
    "check_labels",
    "check_output_file",
    "check_points",
    "check_positive_float",
    "check_positive_int",
    "check_random_state",
    "check_seed",
    "check_widths",
    "feature_names",
    "image_shape",
    "unnamed_points",
]


def as_numpy(x: object, name: str = "X") -> object:
    """A torch tensor as a numpy array (half-precision floats widened to float32, which
    numpy lacks or torch cannot export); anything else unchanged. Sparse and meta
    tensors raise ``TypeError`` naming ``name``."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_sparse or x.layout != torch.strided:
        raise TypeError(f"{name} is a sparse torch tensor: pass a dense one ({name}.to_dense())")
    if x.is_meta:
        raise TypeError(f"{name} is a meta tensor, which holds no values")
    x = x.detach()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x.cpu().numpy()


def check_real_numbers(arr: np.ndarray, name: str) -> None:
    """Refuse an array of anything but real numbers (bools count): ``TypeError`` for
    other dtypes, ``ValueError`` for complex ones (scikit-learn's words)."""
    if not (np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)):
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"Complex data not supported: {name} has dtype {arr.dtype}")


def _is_missing(value: object) -> bool:
    # pandas' NA (nullable dtypes' missing value) and None, without importing pandas
    return value is None or type(value).__name__ == "NAType"


def _missing_as_nan(arr: np.ndarray) -> np.ndarray:
    """An object array with its missing values (None, ``pd.NA``) as NaN, so that they
    are refused as NaN, as scikit-learn does, not as values that are not numbers."""
    missing = np.asarray(np.frompyfunc(_is_missing, 1, 1)(arr), dtype=bool)  # 0-d: a bool
    if not missing.any():
        return arr
    arr = arr.copy()
    arr[missing] = np.nan
    return arr


def check_array(
    X: object,
    name: str = "X",
    *,
    n_features: int | None = None,
    fitted_by: str | None = None,
    min_samples: int = 1,
    allow_1d: bool = False,
    allow_images: bool = False,
) -> np.ndarray:
    """Return ``X`` as a finite float64 array of shape (N, D), never a read-only view.

    With ``allow_images``, arrays of 3 or more dimensions (images (N, H, W) or
    (N, H, W, C)) are flattened to (N, H*W*C). Raises ``TypeError`` for non-numeric
    or sparse input and ``ValueError`` for complex numbers (as scikit-learn), wrong
    dimensionality, too few rows, a feature-count mismatch (with ``n_features``, that
    of ``fitted_by``) or non-finite values.
    """
    if scipy.sparse.issparse(X):
        raise TypeError(f"{name} is a sparse matrix: pass a dense array ({name}.toarray())")
    X = as_numpy(X, name)
    try:
        arr = np.asarray(X)
        if arr.dtype == object:  # numbers in an object array, as scikit-learn accepts
            arr = _missing_as_nan(arr).astype(np.float64)
    except Exception as exc:  # ragged lists, strings in an object array and the like
        raise TypeError(f"{name} must be array-like of numbers: {exc}") from None
    check_real_numbers(arr, name)
    if arr.ndim == 1 and allow_1d:
        arr = arr[:, None]
    if arr.ndim >= 3 and allow_images:
        arr = arr.reshape(arr.shape[0], -1)
    if arr.ndim != 2:
        hint = (
            f". Reshape your data: {name}.reshape(-1, 1) for a single feature, "
            f"{name}.reshape(1, -1) for a single sample"
            if arr.ndim == 1
            else ""
        )
        raise ValueError(
            f"{name} must be 2-D of shape (n_samples, n_features), got shape {arr.shape}{hint}"
        )
    # The wording below is scikit-learn's (its estimator checks match it).
    if arr.shape[1] == 0:
        raise ValueError(
            f"{name} has 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required."
        )
    if arr.shape[0] < min_samples:
        raise ValueError(
            f"{name} has {arr.shape[0]} sample(s) (n_samples={arr.shape[0]}) while a minimum "
            f"of {min_samples} is required."
        )
    if n_features is not None and arr.shape[1] != n_features:
        expected = (
            f"{n_features} were expected"
            if fitted_by is None  # scikit-learn's wording for a fitted estimator:
            else f"{fitted_by} is expecting {n_features} features as input"
        )
        raise ValueError(f"{name} has {arr.shape[1]} features, but {expected}")
    # torch warns on (and must not share) read-only memory, such as a memmap's, and
    # refuses negative or odd strides (X[::-1], a structured array's field)
    arr = arr.astype(np.float64, copy=not arr.flags.writeable)
    if any(stride < 0 or stride % arr.itemsize for stride in arr.strides):
        arr = np.ascontiguousarray(arr)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values ({bad} row(s))")
    return arr


def check_points(
    x: object,
    n_features: int,
    dtype: torch.dtype,
    name: str = "x",
    *,
    computed_by: str = "module",
    n_components: int | None = None,
) -> None:
    """Refuse anything but a tensor of ``dtype`` shaped (N, n_features) or, with
    ``n_components``, also (n_components, N, n_features): a ``TypeError`` for a
    non-tensor or another dtype, a ``ValueError`` for another shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    stacked = n_components is not None and x.dim() == 3
    if not (x.dim() == 2 or stacked) or x.shape[-1] != n_features:
        expected = f"(N, {n_features})"
        if n_components is not None:
            expected += f" or ({n_components}, N, {n_features})"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if stacked and x.shape[0] != n_components:
        raise ValueError(f"{name} has {x.shape[0]} component slices, expected {n_components}")
    if x.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the weights of the {computed_by} are {dtype}: "
            f"convert one ({name}.to({dtype}) or {computed_by}.to(...))"
        )


_NO_NAMES = "X does not have valid feature names"  # scikit-learn's words
_PACKAGES = ("vmonf", "competitive")


def user_stacklevel() -> int:
    """The ``stacklevel`` for a warning raised by the function calling this one that
    names the first frame outside vmonf and competitive: the user's line, however deep
    inside the estimator the check ran."""
    level = 1
    frame: FrameType | None = sys._getframe(1)  # the function that warns
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _PACKAGES:
        level, frame = level + 1, frame.f_back
    return level


def feature_names(X: object) -> np.ndarray | None:
    """The column names of a data frame X (pandas, polars, ...) as an object array when
    they are all strings, as scikit-learn records them; else None."""
    if isinstance(X, np.ndarray) or hasattr(X, "detach"):
        return None
    columns = getattr(X, "columns", None)
    if columns is None:
        return None
    names = list(columns)
    if not names or not all(isinstance(name, str) for name in names):
        return None
    return np.asarray(names, dtype=object)


def check_feature_names(X: object, fitted: np.ndarray | None, fitted_by: str) -> None:
    """scikit-learn's rule for X against the names seen in fit (``fitted``, None for
    none): a ValueError for other names or another order, a UserWarning when only one
    of the two has names."""
    names = feature_names(X)
    if fitted is not None and names is not None:
        if names.shape != fitted.shape or not (names == fitted).all():
            raise ValueError(
                "The feature names should match those that were passed during fit: "
                f"{fitted.tolist()}, got {names.tolist()}"
            )
    elif fitted is not None:
        warnings.warn(
            f"{_NO_NAMES}, but {fitted_by} was fitted with feature names",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    elif names is not None:
        warnings.warn(
            f"X has feature names, but {fitted_by} was fitted without feature names",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


@contextmanager
def unnamed_points() -> Iterator[None]:
    """For library code that evaluates a model at points it made itself (a plot's grid):
    no warning that they lack the column names of a data frame the model was fitted on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _NO_NAMES, UserWarning)
        yield


def image_shape(X: object) -> tuple[int, ...] | None:
    """Shape of one image, ``X.shape[1:]``, when X has 3 or more dimensions; else None."""
    array = cast(ArrayLike, X)  # np.shape and np.ndim take any object: () and 0 for a scalar
    return tuple(int(s) for s in np.shape(array)[1:]) if np.ndim(array) >= 3 else None


def check_integer_labels(
    y: object, name: str = "y", n_samples: int | None = None, *, rows_of: str = "X"
) -> np.ndarray:
    """Return labels as int64 of shape (N,); floats must be whole numbers.

    ``n_samples`` (the rows of the matching array, named ``rows_of`` in errors) is
    checked when given; otherwise an empty vector is an error.
    """
    arr = np.asarray(as_numpy(y, name))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n_samples,), got shape {arr.shape}")
    if n_samples is not None and arr.shape[0] != n_samples:
        raise ValueError(f"{name} has {arr.shape[0]} labels but {rows_of} has {n_samples} rows")
    if n_samples is None and arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        if not np.all(arr == np.round(arr)):
            raise TypeError(f"{name} must hold integer labels, got non-integer values")
    elif not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise TypeError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind in "uf":  # beyond int64, the cast would wrap them
        low, high = arr.min().item(), arr.max().item()  # Python numbers: exact compares
        if high > np.iinfo(np.int64).max or low < np.iinfo(np.int64).min:
            raise ValueError(f"{name} has labels beyond the int64 range")
    return arr.astype(np.int64)


_LABEL_HINT = (
    "labels are component indices (-1 = unlabelled): map class labels to 0..K-1 first, "
    "e.g. with sklearn.preprocessing.LabelEncoder"
)


def check_labels(y: object, n_samples: int, n_classes: int, name: str = "y") -> np.ndarray:
    """Return labels as int64 of shape (N,), each in [-1, n_classes); -1 = unlabelled."""
    try:
        arr = check_integer_labels(y, name, n_samples)
    except TypeError as exc:
        raise TypeError(f"{exc}; {_LABEL_HINT}") from None
    bad = (arr < -1) | (arr >= n_classes)
    if bad.any():
        raise ValueError(
            f"{name} must lie in [-1, {n_classes}) (-1 = unlabelled); "
            f"found {sorted(set(arr[bad].tolist()))[:5]}: {_LABEL_HINT}"
        )
    return arr


def check_positive_int(
    value: object, name: str, *, minimum: int = 1, maximum: int | None = None
) -> int:
    """Return ``value`` as a Python int >= ``minimum`` (and <= ``maximum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    number = operator.index(value)  # exactly the Integral's value, as a Python int
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return number


@overload
def check_positive_float(
    value: object, name: str, *, allow_none: Literal[False] = False, allow_zero: bool = False
) -> float: ...


@overload
def check_positive_float(
    value: object, name: str, *, allow_none: bool, allow_zero: bool = False
) -> float | None: ...


def check_positive_float(
    value: object, name: str, *, allow_none: bool = False, allow_zero: bool = False
) -> float | None:
    """Return ``value`` as a finite float > 0 (>= 0 with ``allow_zero``), or None if allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` as a bool: a bool (numpy's included) or the integer 0 or 1.
    Anything else is refused: a string such as "False" would read as True."""
    if isinstance(value, bool | np.bool_) or (
        isinstance(value, numbers.Integral) and value in (0, 1)
    ):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_widths(value: object, name: str) -> tuple[int, ...]:
    """Return ``value``, a sequence of layer widths, as a tuple of ints >= 1."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of layer widths, got {value!r}")
    return tuple(check_positive_int(width, f"{name} entries") for width in value)


def check_betas(value: object, name: str) -> tuple[float, float]:
    """Return ``value``, Adam's (beta1, beta2), as two floats in [0, 1)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be two numbers in [0, 1), got {value!r}")
    betas = tuple(value)
    # 0 <= b < 1 with the < and <= that numbers.Real declares, without float(b) rounding
    # (a fraction just under 1) or overflowing (a huge int)
    if len(betas) != 2 or not all(
        isinstance(b, numbers.Real) and not isinstance(b, bool) and not b < 0.0 and b < 1.0
        for b in betas
    ):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {value!r}")
    return float(betas[0]), float(betas[1])


def check_choice(value: object, name: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


#: The numpy random generators a ``random_state`` may be (state, not settings).
NUMPY_GENERATORS = (np.random.RandomState, np.random.Generator)
#: What a ``random_state`` may be (scikit-learn's convention, plus numpy's Generator).
SeedLike = int | np.random.RandomState | np.random.Generator | None


def check_random_state(seed: object, name: str = "random_state") -> object:
    """Validate a ``random_state`` without drawing from it: an int in [0, MAX_SEED], None,
    or a numpy ``RandomState``/``Generator`` (scikit-learn's convention). Returns it."""
    if seed is None or isinstance(seed, NUMPY_GENERATORS):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"{name} must be an int, None, or a numpy RandomState or Generator, got "
            f"{type(seed).__name__}"
        )
    number = operator.index(seed)  # exactly the Integral's value, as a Python int
    if not 0 <= number <= MAX_SEED:
        raise ValueError(f"{name} must be in [0, {MAX_SEED}], got {seed}")
    return number


def check_seed(seed: object, name: str = "random_state") -> int | None:
    """The seed a ``random_state`` gives now, a plain int or None (fresh randomness): an
    int as it is; a numpy ``RandomState`` or ``Generator`` draws one, so that each call
    differs and the sequence follows the generator's state, as in scikit-learn."""
    checked = check_random_state(seed, name)
    if isinstance(checked, np.random.RandomState):
        return int(checked.randint(MAX_SEED, dtype=np.int64))
    if isinstance(checked, np.random.Generator):
        return int(checked.integers(MAX_SEED))
    return cast(int | None, checked)


def check_output_file(path: object, name: str = "path") -> Path:
    """Return ``path`` (str or os.PathLike) as a Path naming a file that can be written,
    its folder created; ValueError for a directory or a folder part that is a file."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    out = Path(path)
    text = os.fspath(path)
    ends_in_separator = isinstance(text, str) and text.endswith((os.sep, "/"))
    if out.name == "" or out.is_dir() or ends_in_separator:  # "newdir/" is a folder
        raise ValueError(f"{name} must name a file, got the directory {str(path)!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write {str(path)!r}: a part of its folder is a file") from None
    return out
