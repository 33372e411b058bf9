"""``ImageMixture``: a mixture estimator (VMoNF, CompetitiveMixture) on pixel data.

It dequantises, logit-transforms and (optionally) PCA-projects images with
:class:`~vmonf.image_transforms.ImageTransform`, fits the wrapped estimator on the
features, reports log-likelihoods in nats and bits per dimension on the original
pixel scale, and samples images::

    from vmonf import VMoNF, datasets
    from vmonf.images import ImageMixture

    X, y = datasets.images("mnist", classes=range(5))          # uint8 (N, 28, 28)
    X_test, y_test = datasets.images("mnist", "test", classes=range(5))
    m = ImageMixture(VMoNF(5, random_state=0), pca_components=20, random_state=0).fit(X)
    m.predict(X_test); m.bits_per_dim(X_test); m.sample(64)   # -> uint8 images, components
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin, DensityMixin, clone

from vmonf._validation import (
    SeedLike,
    check_bool,
    check_positive_int,
    check_random_state,
    check_seed,
    user_stacklevel,
)
from vmonf.base import (
    MixtureEstimator,
    NotFittedError,
    check_loadable_device,
    fitted_setting,
    sampling_seed,
    torch_device,
)
from vmonf.checkpoint import (
    CheckpointError,
    from_plain,
    load_checkpoint,
    plain_setting,
    save_checkpoint,
    to_plain,
)
from vmonf.distributed import broadcast_int, init_from_env
from vmonf.image_transforms import (
    ImageTransform,
    bits_per_dim,
    check_image_shape,
    check_images,
    dequantize,
    dequantize_by_content,
    quantize,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ImageMixture"]


def _estimator_classes() -> dict[str, type[MixtureEstimator]]:
    """Every imported MixtureEstimator subclass by checkpoint kind."""
    found: dict[str, type[MixtureEstimator]] = {}
    stack = list(MixtureEstimator.__subclasses__())
    while stack:
        cls = stack.pop()
        found.setdefault(cls._checkpoint_kind, cls)
        stack.extend(cls.__subclasses__())
    return found


class ImageMixture(DensityMixin, ClusterMixin, BaseEstimator):
    """Fit a mixture estimator to images: dequantise, logit, PCA or checkerboard order.

    Args:
        estimator: an unfitted :class:`~vmonf.base.MixtureEstimator` (``VMoNF``,
            ``CompetitiveMixture``); it is cloned by :meth:`fit`.
        n_levels: grey levels L of the pixels (256 for MNIST, 17 for sklearn's digits).
        logit_alpha: alpha of the logit transform; None fits the dequantised
            pixels on [0, 1) directly. The feature density also puts some mass outside
            the pixel cube (measured: 0.3 % with 0.05, 1.9 % with None on a 2-pixel
            toy), so the pixel density integrates to a little under 1 (scores stay
            conservative) and :meth:`sample` clips those draws into the edge levels.
        pca_components: number of principal axes handed to the estimator (the rest
            get Gaussians, so densities stay exact); None keeps every pixel, in
            checkerboard order so the flows' alternating masks are checkerboards.
        random_state: seed of the dequantisation noise (training and scoring); the
            wrapped estimator's own ``random_state`` seeds its training: set both for
            a reproducible fit. A numpy ``RandomState``/``Generator`` gives a seed drawn
            at each fit, ``score_samples`` and ``sample`` (fresh noise each time, as None).
            The wrapped estimator is cloned at each fit: its ``warm_start`` has no effect.

    Input X: uint8/integer images (N, H, W) or (N, H, W, C), or flattened (N, D);
    samples come back in the same layout. Fitted attributes: ``estimator_``,
    ``transform_`` (:class:`ImageTransform`), ``image_shape_``, ``n_features_in_`` (D),
    ``fitted_params_`` (the settings of the fit, which scoring, sampling and :meth:`save`
    keep to: ``set_params`` changes the next fit).
    """

    _checkpoint_kind = "ImageMixture"

    def __init__(
        self,
        estimator: MixtureEstimator,
        *,
        n_levels: int = 256,
        logit_alpha: float | None = 0.05,
        pca_components: int | None = None,
        random_state: SeedLike = None,
    ) -> None:
        self.estimator = estimator
        self.n_levels = n_levels
        self.logit_alpha = logit_alpha
        self.pca_components = pca_components
        self.random_state = random_state

    # -- helpers -------------------------------------------------------------------------
    def _check_is_fitted(self) -> None:
        if not hasattr(self, "estimator_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(X) first"
            )

    def _pixels(self, X: object) -> np.ndarray:
        """Validate images for the fitted model -> int64 (N, D)."""
        self._check_is_fitted()
        levels, shape = check_images(X, fitted_setting(self, "n_levels"))
        check_image_shape(shape, self.image_shape_)
        return levels

    def _features(self, X: object, noise: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (features (N, d), extra log-density terms (N,), nats), dequantised at
        the bins' centres or (``noise``) with scoring noise: with a ``random_state``,
        each image's drawn from its own values, else fresh."""
        levels = self._pixels(X)
        n_levels = fitted_setting(self, "n_levels")
        if not noise:
            return self.transform_.forward(dequantize(levels, n_levels))
        seed = check_seed(fitted_setting(self, "random_state"))  # drawn only for noise
        if seed is None:
            v = dequantize(levels, n_levels, np.random.default_rng())
        else:
            v = dequantize_by_content(levels, n_levels, seed)
        return self.transform_.forward(v)

    # -- fitting -------------------------------------------------------------------------
    def fit(self, X: object, y: object | None = None, *, resume: bool = False) -> Self:
        """Fit to images X; ``y`` (N,) optional labels passed on to the estimator, and
        ``resume`` to its ``fit`` (with a ``checkpoint`` and a fixed ``random_state``,
        so that the dequantised features are the same again)."""
        if not isinstance(self.estimator, MixtureEstimator):
            raise TypeError(
                "estimator must be a vmonf MixtureEstimator (VMoNF, CompetitiveMixture), "
                f"got {type(self.estimator).__name__}"
            )
        settings = self.get_params(deep=False)
        fixed = check_random_state(self.random_state)
        if resume and not isinstance(fixed, int):
            raise ValueError(
                "resume=True needs a fixed (int) random_state: the dequantisation noise "
                "must be drawn again exactly as in the interrupted fit"
            )
        seed = check_seed(fixed)
        if seed is None:  # data-parallel ranks must dequantise alike: rank 0's draw
            init_from_env(self.estimator._torch_device)
            seed = broadcast_int(int(np.random.SeedSequence().generate_state(1)[0]))
        levels, shape = check_images(X, self.n_levels)
        top = int(levels.max())
        if top < self.n_levels // 4:
            warnings.warn(
                f"the brightest pixel of X is level {top}, far below n_levels="
                f"{self.n_levels}: if X has {top + 1} levels (datasets.images('digits') has "
                "17), pass n_levels to match, or bits per dimension and samples are off",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        transform = ImageTransform(
            self.n_levels,
            logit_alpha=self.logit_alpha,
            pca_components=self.pca_components,
            image_shape=shape,
        )
        v = dequantize(levels, self.n_levels, np.random.default_rng(seed))
        features, _ = transform.fit(v).forward(v)
        estimator = clone(self.estimator).fit(features, y, resume=resume)
        # Set only now: a failed fit leaves the previous fit whole, never half replaced.
        self.transform_, self.estimator_, self.fitted_params_ = transform, estimator, settings
        self.image_shape_, self.n_features_in_ = shape, levels.shape[1]
        return self

    # -- features and assignments ------------------------------------------------------
    def transform(self, X: object) -> np.ndarray:
        """Model features (N, d) of images X, each pixel at the centre of its bin."""
        return self._features(X, noise=False)[0]

    def predict_proba(self, X: object, **kwargs: Any) -> np.ndarray:
        """Responsibilities (N, K) of the wrapped estimator (keyword options passed on)."""
        features = self.transform(X)
        return self.estimator_.predict_proba(features, **kwargs)

    def predict(self, X: object, **kwargs: Any) -> np.ndarray:
        """Component of each image, (N,) int64 (keyword options passed on)."""
        features = self.transform(X)
        return self.estimator_.predict(features, **kwargs)

    # -- likelihoods ---------------------------------------------------------------------
    def score_samples(self, X: object) -> np.ndarray:
        """log p(x + u) of each image, (N,), nats on the pixel scale [0, L)^D.

        One uniform dequantisation draw per image; its expectation lower-bounds the
        discrete log-probability of the image. With a ``random_state`` the draw depends on
        that seed and the image's pixels only: an image scores the same in any batch, and
        copies of an image share one draw (a data set of many duplicates averages fewer
        draws, so its mean is a noisier estimate of the bound).
        """
        features, extra = self._features(X, noise=True)
        return self.estimator_.score_samples(features) + extra

    def score(self, X: object, y: object | None = None) -> float:
        """Mean of :meth:`score_samples` (nats per image)."""
        return float(np.mean(self.score_samples(X)))

    def elbo(self, X: object) -> np.ndarray:
        """The wrapped estimator's per-image bound (``elbo``), (N,), nats on the pixel scale:
        VMoNF's ELBO; for CompetitiveMixture exact log p (flows) or a stochastic lower
        bound (VAEs: :meth:`competitive.CompetitiveMixture.elbo`)."""
        features, extra = self._features(X, noise=True)
        elbo = getattr(self.estimator_, "elbo", None)
        if not callable(elbo):
            raise TypeError(f"{type(self.estimator_).__name__} has no elbo")
        return elbo(features) + extra

    def bits_per_dim(self, X: object, *, bound: bool = False) -> float:
        """Mean bits per dimension on the pixel scale (lower is better).

        ``bound=True`` uses :meth:`elbo` (for models without an exact likelihood, e.g. VAEs).
        """
        log_p = self.elbo(X) if check_bool(bound, "bound") else self.score_samples(X)
        return float(np.mean(bits_per_dim(log_p, self.n_features_in_)))

    # -- sampling ------------------------------------------------------------------------
    def sample(
        self, n_samples: int = 1, random_state: SeedLike = None, *, residual_noise: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw images -> (images (n, *image_shape_) in levels 0..L-1, components (n,)).

        ``residual_noise=False`` sets the axes a PCA front-end discards to their mean
        (the PCA reconstruction of each sample) instead of drawing them. ``random_state``
        as in :meth:`vmonf.base.MixtureEstimator.sample` (None: this model's, else the
        wrapped estimator's; it seeds the features and the residual noise alike).
        """
        self._check_is_fitted()
        n = check_positive_int(n_samples, "n_samples")
        seed = sampling_seed(self, random_state)
        if seed is None:  # then the wrapped estimator's seed, or one drawn for both parts
            seed = sampling_seed(self.estimator_, None)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        features, components = self.estimator_.sample(n, random_state=seed)
        rng = np.random.default_rng([seed, 2])
        v = self.transform_.inverse(features, rng if residual_noise else None)
        images = quantize(v, fitted_setting(self, "n_levels")).reshape(n, *self.image_shape_)
        return images, components

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted model atomically: the estimator's checkpoint, the transform's state."""
        self._check_is_fitted()
        kind = self.estimator_._checkpoint_kind
        inner = self.estimator_._to_payload()
        params = dict(self.fitted_params_) if hasattr(self, "fitted_params_") else {}
        params = {**self.get_params(deep=False), **params}  # the fitted settings
        del params["estimator"]
        payload = {
            "params": {k: plain_setting(v) for k, v in params.items()},
            "estimator_kind": kind,
            "estimator": inner,
            "transform": {k: to_plain(v) for k, v in self.transform_.get_state().items()},
            "image_shape_": list(self.image_shape_),
        }
        return save_checkpoint(payload, path, self._checkpoint_kind)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        estimator_class: type[MixtureEstimator] | None = None,
        device: str | torch.device | None = None,
    ) -> Self:
        """Read a model written by :meth:`save`.

        The wrapped estimator's class is found among the imported ``MixtureEstimator``
        subclasses by its checkpoint kind (import ``competitive`` first for a
        CompetitiveMixture), or given as ``estimator_class``. ``device`` overrides the
        device it was fitted on (see :meth:`MixtureEstimator.load`).
        """
        if device is not None:
            torch_device(device)  # a bad argument is the caller's, not the file's
        if estimator_class is not None and not (
            isinstance(estimator_class, type) and issubclass(estimator_class, MixtureEstimator)
        ):
            raise TypeError(
                "estimator_class must be a MixtureEstimator subclass (e.g. VMoNF), got "
                f"{estimator_class!r}"
            )
        payload = load_checkpoint(path, cls._checkpoint_kind)
        kind = payload.get("estimator_kind")
        inner_cls = estimator_class or _estimator_classes().get(kind)  # type: ignore[arg-type]
        if inner_cls is None:
            raise CheckpointError(
                f"{path} wraps a {kind} estimator, which is not imported: import the module "
                "that defines it (e.g. `import competitive`) or pass estimator_class"
            )
        if inner_cls._checkpoint_kind != kind:
            raise TypeError(
                f"{path} wraps a {kind} estimator, not a {inner_cls.__name__} (estimator_class)"
            )
        try:
            check_loadable_device(payload.get("estimator"), device, path, cls.__name__)
            estimator = inner_cls._from_payload(payload["estimator"], device, "its estimator")
            model = cls(estimator, **payload["params"])
            model.fitted_params_ = model.get_params(deep=False)
            state = {k: from_plain(v) for k, v in payload["transform"].items()}
            model.transform_ = ImageTransform.from_state(state)
            model.image_shape_ = tuple(int(s) for s in payload["image_shape_"])
        except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path} holds an unusable {cls.__name__} file: {exc}") from None
        model.estimator_ = estimator
        model.n_features_in_ = int(math.prod(model.image_shape_))
        return model
