r"""Pixels <-> continuous features for density models of images, with exact log-determinants.

An image of D pixels with integer levels 0..L-1 is turned into a point of R^d by

1. **uniform dequantisation**: :math:`v = (x + u) / L`, u ~ U[0, 1)^D, so v lies in
   [0, 1)^D and a density on v is a density on the pixel scale [0, L)^D divided by
   :math:`L^D`;
2. an optional **logit** transform (RealNVP): :math:`s = \alpha + (1 - 2\alpha) v`,
   :math:`y = \log s - \log(1 - s)`;
3. either a **checkerboard ordering** of the pixels (so that the alternating
   feature-parity masks of :class:`vmonf.ComponentFlows` split every image into the
   two colours of a checkerboard), or an optional **PCA front-end**: y is rotated
   into the principal axes of the training data; the first d coordinates go to the
   model and the remaining D - d get independent Gaussians with their own variances
   (the maximum-likelihood ones), so the density stays exact on all of R^D.

Every step is a bijection whose log-determinant (or, for the discarded PCA axes, log
density) is known, so ``log p_pixel(x + u) = log p_model(f) + extra(x + u)``: the
model's log density of the features plus :meth:`ImageTransform.forward`'s second
output, in nats on the original pixel scale. :func:`bits_per_dim` turns it into
bits per dimension.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from vmonf._gaussian import log_normal
from vmonf._validation import as_numpy, check_array, check_positive_float, check_positive_int

__all__ = [
    "ImageTransform",
    "bits_per_dim",
    "check_image_shape",
    "check_images",
    "checkerboard_order",
    "dequantize",
    "dequantize_by_content",
    "quantize",
]


def check_images(X: object, n_levels: int, name: str = "X") -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate pixel data: (N, H, W[, C]) or flattened (N, D) integer levels in [0, n_levels).

    Returns the images flattened to int64 (N, D) and the shape of one image
    ((D,) for flattened input). Float input must hold whole numbers.
    """
    n_levels = check_positive_int(n_levels, "n_levels", minimum=2)
    X = as_numpy(X, name)
    try:
        arr = np.asarray(X)
    except ValueError:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular array of images") from None
    if arr.ndim < 2:
        raise ValueError(f"{name} must be images (N, H, W) or flattened (N, D), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} holds no images")
    shape = tuple(int(s) for s in arr.shape[1:])
    flat = check_array(arr.reshape(arr.shape[0], -1), name)
    if not np.all(flat == np.round(flat)):
        raise ValueError(f"{name} must hold integer pixel levels (dequantisation is done here)")
    if flat.min() < 0 or flat.max() >= n_levels:
        raise ValueError(
            f"{name} pixel levels must lie in [0, {n_levels}) (n_levels={n_levels}); "
            f"found [{flat.min():g}, {flat.max():g}]"
        )
    return flat.astype(np.int64), shape


def check_image_shape(shape: tuple[int, ...], expected: tuple[int, ...], name: str = "X") -> None:
    """ValueError unless images of ``shape`` are the ``expected`` ones: the same shape,
    or with a trailing channel axis of 1 added or dropped; when either is flattened, the
    same number of pixels."""

    def squeeze(s: tuple[int, ...]) -> tuple[int, ...]:
        return s[:-1] if len(s) > 2 and s[-1] == 1 else s

    flat = len(shape) == 1 or len(expected) == 1  # flattened on either side: pixel counts
    if squeeze(shape) == squeeze(expected) or (flat and math.prod(shape) == math.prod(expected)):
        return
    raise ValueError(f"{name} has shape {shape} per image, but {expected} is expected")


def dequantize(
    levels: np.ndarray, n_levels: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """(N, D) integer levels -> float64 (N, D) in [0, 1): (x + u) / L, u ~ U[0, 1).

    With ``rng=None`` u = 1/2 (the centre of every pixel's bin: deterministic).
    """
    noise = 0.5 if rng is None else rng.random(levels.shape)
    return (levels + noise) / float(n_levels)


def dequantize_by_content(levels: np.ndarray, n_levels: int, seed: int) -> np.ndarray:
    """:func:`dequantize` with each row's u drawn from ``seed`` and that row's values only:
    an image is dequantised the same wherever it sits and whatever it is scored with."""
    noise = np.empty(levels.shape)
    for i, row in enumerate(np.ascontiguousarray(levels, dtype=np.int64)):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
        noise[i] = np.random.default_rng([seed, int.from_bytes(digest, "little")]).random(row.shape)
    return (levels + noise) / float(n_levels)


def quantize(values: np.ndarray, n_levels: int) -> np.ndarray:
    """float (N, D) on the [0, 1) scale -> levels floor(v L), clipped to [0, L): uint8,
    uint16 or int64, the smallest that holds L levels."""
    levels = np.clip(np.floor(np.asarray(values) * n_levels), 0, n_levels - 1)
    if n_levels <= 256:
        return levels.astype(np.uint8)
    return levels.astype(np.uint16 if n_levels <= 65536 else np.int64)


def bits_per_dim(log_prob: object, n_dims: int) -> np.ndarray:
    """Per-image log densities (N,) in nats on the pixel scale -> bits per dimension (N,).

    ``-log p / (D ln 2)``; for a density of dequantised pixels, averaged over the
    dequantisation noise, this is an upper bound on the discrete model's code length in
    bits per pixel (one draw per image is an estimate of that average, not a bound).
    """
    n_dims = check_positive_int(n_dims, "n_dims")
    values = np.asarray(log_prob, dtype=np.float64)
    return -values / (n_dims * math.log(2.0))


def checkerboard_order(shape: tuple[int, ...]) -> np.ndarray:
    """Permutation (D,) of flattened pixels: black squares at even positions, white at odd.

    ``shape`` is (H, W) or (H, W, C); the colour of pixel (r, c, channel) is
    (r + c + channel) mod 2. With this order, the alternating feature-parity coupling
    masks of :func:`vmonf.flows.alternating_masks` become checkerboard masks.
    """
    if len(shape) < 2:
        raise ValueError(f"shape must be (H, W) or (H, W, C), got {shape}")
    colour = (np.indices(shape).sum(axis=0) % 2).reshape(-1)
    black, white = np.flatnonzero(colour == 0), np.flatnonzero(colour == 1)
    order = np.empty(colour.size, dtype=np.int64)
    order[0::2], order[1::2] = black, white
    return order


class ImageTransform:
    """Dequantised pixels (N, D) on [0, 1) <-> model features (N, d), with log-determinants.

    Args:
        n_levels: grey levels L of the data (256 for MNIST, 17 for sklearn's digits).
        logit_alpha: alpha of the logit transform (None = no logit; features in [0, 1)).
        pca_components: d; None keeps all D pixels (in checkerboard order when
            ``image_shape`` is 2-D or 3-D).
        image_shape: shape of one image, for the checkerboard ordering.

    After :meth:`fit`: ``mean_`` (D,), ``components_`` (D, D) principal axes (columns,
    by decreasing variance), ``variances_`` (D,), ``order_`` (D,) pixel permutation.
    """

    def __init__(
        self,
        n_levels: int = 256,
        *,
        logit_alpha: float | None = 0.05,
        pca_components: int | None = None,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.n_levels = check_positive_int(n_levels, "n_levels", minimum=2)
        if logit_alpha is not None:
            alpha = check_positive_float(logit_alpha, "logit_alpha")
            if alpha >= 0.5:
                raise ValueError(f"logit_alpha must be < 0.5, got {alpha}")
        self.logit_alpha = logit_alpha
        if pca_components is not None:
            check_positive_int(pca_components, "pca_components")
        self.pca_components = pca_components
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    # -- fitting -------------------------------------------------------------------------
    def fit(self, v: np.ndarray) -> ImageTransform:
        """Fit the PCA front-end (if any) to dequantised pixels ``v`` (N, D) on [0, 1)."""
        if np.ndim(v) != 2 or np.shape(v)[0] == 0:
            raise ValueError(f"v must be (N, D) dequantised pixels, got shape {np.shape(v)}")
        d = v.shape[1]
        if self.pca_components is not None:
            if self.pca_components > d:
                raise ValueError(
                    f"pca_components={self.pca_components} exceeds the {d} pixels per image"
                )
            if v.shape[0] <= d:
                # Fewer images than pixels: the discarded axes' variances would be 0.
                raise ValueError(
                    f"pca_components needs more images than pixels to estimate their "
                    f"covariance: got {v.shape[0]} images of {d} pixels"
                )
            y, _ = self._logit(v)
            self.mean_ = y.mean(axis=0)
            centred = y - self.mean_
            variances, axes = np.linalg.eigh(centred.T @ centred / y.shape[0])
            top = np.argsort(variances)[::-1]
            self.variances_ = np.clip(variances[top], 1e-12, None)
            self.components_ = axes[:, top]
        shape = self.image_shape
        if self.pca_components is None and shape is not None and len(shape) >= 2:
            self.order_ = checkerboard_order(shape)
        else:
            self.order_ = np.arange(d)
        self.n_pixels_ = d
        return self

    @property
    def n_features_out(self) -> int:
        """d, the number of features handed to the model."""
        return self.n_pixels_ if self.pca_components is None else self.pca_components

    # -- the bijection -------------------------------------------------------------------
    def _logit(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.logit_alpha is None:
            return v, np.zeros(v.shape[0])
        a = float(self.logit_alpha)
        s = a + (1.0 - 2.0 * a) * v
        log_s, log_1ms = np.log(s), np.log1p(-s)
        log_det = (math.log(1.0 - 2.0 * a) - log_s - log_1ms).sum(axis=1)
        return log_s - log_1ms, log_det

    def _expit(self, y: np.ndarray) -> np.ndarray:
        if self.logit_alpha is None:
            return y
        a = float(self.logit_alpha)
        return (1.0 / (1.0 + np.exp(-y)) - a) / (1.0 - 2.0 * a)

    def _check_fitted_to(self, v: np.ndarray) -> None:
        if not hasattr(self, "n_pixels_"):
            raise ValueError("this ImageTransform is not fitted yet; call fit(v) first")
        if np.ndim(v) != 2 or np.shape(v)[1] != self.n_pixels_:
            raise ValueError(
                f"v must be (N, {self.n_pixels_}) dequantised pixels, got shape {np.shape(v)}"
            )

    def forward(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dequantised pixels (N, D) on [0, 1) -> features (N, d) and extra (N,) in nats.

        ``extra`` = log|det d(logit)/dv| + log density of the discarded PCA axes
        - D log L, so log p_pixel = log p_model(features) + extra.
        """
        self._check_fitted_to(v)
        y, extra = self._logit(v)
        extra = extra - self.n_pixels_ * math.log(self.n_levels)
        if self.pca_components is None:
            return y[:, self.order_], extra
        coords = (y - self.mean_) @ self.components_
        d = self.pca_components
        tail, var = coords[:, d:], self.variances_[d:]
        return coords[:, :d], extra + log_normal(tail, 0.0, np.sqrt(var)).sum(axis=1)

    def inverse(self, features: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Features (N, d) -> pixels (N, D) on the [0, 1) scale (not yet quantised).

        With a PCA front-end the discarded axes are drawn from their Gaussians with
        ``rng``; ``rng=None`` sets them to their mean (the PCA reconstruction).
        """
        if not hasattr(self, "n_pixels_"):
            raise ValueError("this ImageTransform is not fitted yet; call fit(v) first")
        d = self.n_pixels_ if self.pca_components is None else self.pca_components
        features = check_array(features, "features", n_features=d)
        if self.pca_components is None:
            y = np.empty_like(features)
            y[:, self.order_] = features
        else:
            n, d = features.shape[0], self.pca_components
            tail = np.zeros((n, self.n_pixels_ - d))
            if rng is not None:
                tail = rng.standard_normal(tail.shape) * np.sqrt(self.variances_[d:])
            y = np.concatenate([features, tail], axis=1) @ self.components_.T + self.mean_
        return self._expit(y)

    # -- persistence ---------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Plain-data state (numpy arrays and scalars) for checkpoints."""
        state: dict[str, Any] = {
            "n_levels": self.n_levels,
            "logit_alpha": self.logit_alpha,
            "pca_components": self.pca_components,
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "order_": self.order_,
            "n_pixels_": self.n_pixels_,
        }
        if self.pca_components is not None:
            state.update(mean_=self.mean_, components_=self.components_, variances_=self.variances_)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ImageTransform:
        """Rebuild a fitted transform from :meth:`get_state`."""
        shape = state["image_shape"]
        transform = cls(
            state["n_levels"],
            logit_alpha=state["logit_alpha"],
            pca_components=state["pca_components"],
            image_shape=None if shape is None else tuple(shape),
        )
        for key in ("order_", "n_pixels_", "mean_", "components_", "variances_"):
            if key in state:
                value = state[key]
                setattr(transform, key, np.asarray(value) if key != "n_pixels_" else int(value))
        return transform
