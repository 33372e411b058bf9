"""Offline sample-quality metrics for images: a small LeNet and the Fréchet LeNet distance.

FID needs Inception weights from the internet; here a LeNet-5-style classifier is
trained on the data set's own training split, deterministically (fixed seed, one
torch thread, fixed batch order), on first use, and cached in
``vmonf.datasets.image_data.cache_dir()``. Its 84-d penultimate layer is the feature
space of the **Fréchet LeNet distance** (FLD): the Fréchet distance between
Gaussians fitted to the features of two image sets, as FID does with Inception.
Every score carries the SHA-256 of the network's weights (``feature_hash``), so
numbers from different networks are never compared unknowingly.

:func:`label_histogram` counts the classes the LeNet sees in a set of samples
(mode coverage).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmonf._dtypes import float32_default
from vmonf._validation import check_array, check_choice, check_integer_labels, check_positive_int
from vmonf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vmonf.datasets import image_data
from vmonf.image_transforms import check_image_shape, check_images
from vmonf.training import EVAL_CHUNK, TrainConfig, torch_threads, train

__all__ = [
    "FeatureNet",
    "FrechetResult",
    "LeNet",
    "frechet_distance",
    "frechet_lenet_distance",
    "label_histogram",
    "lenet",
    "train_lenet",
]

LENET_VERSION = 2  # bump when the architecture or the training recipe changes
DEFAULT_EPOCHS = {"digits": 60, "mnist": 4, "fashion_mnist": 6}
_BATCH = 128


class LeNet(nn.Module):
    """LeNet-5-style classifier for (N, 1, H, W) images (H, W >= 8), features 84-d.

    conv 5x5 (6) -> ReLU -> max-pool 2 -> conv 5x5 (16) -> ReLU -> adaptive max-pool
    4x4 -> 120 -> 84 (features) -> n_classes.
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) in [0, 1] -> (N, 84) penultimate activations."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.adaptive_max_pool2d(F.relu(self.conv2(h)), 4).flatten(1)
        return F.relu(self.fc2(F.relu(self.fc1(h))))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) -> class logits (N, n_classes)."""
        return self.fc3(self.features(x))


def _weights_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FeatureNet:
    """A trained LeNet with what it was trained on.

    Attributes: ``model``, ``dataset``, ``n_levels``, ``image_shape`` (H, W),
    ``n_classes``, ``sha256`` (of the weights), ``test_accuracy`` (on the test split).
    """

    model: LeNet
    dataset: str
    n_levels: int
    image_shape: tuple[int, int]
    n_classes: int
    sha256: str
    test_accuracy: float

    def _inputs(self, images: object) -> Tensor:
        levels, shape = check_images(images, self.n_levels, "images")
        check_image_shape(shape, tuple(self.image_shape), "images")
        x = torch.as_tensor(levels, dtype=torch.float32) / (self.n_levels - 1)
        return x.reshape(-1, 1, *self.image_shape)

    def _apply(self, fn: str, images: object) -> np.ndarray:
        x = self._inputs(images)
        self.model.eval()
        with torch.no_grad(), torch_threads(1):
            parts = [getattr(self.model, fn)(c) for c in x.split(EVAL_CHUNK)]
        return torch.cat(parts).double().numpy()

    def features(self, images: object) -> np.ndarray:
        """Pixel images (N, H, W) or (N, H*W), levels 0..n_levels-1 -> features (N, 84)."""
        return self._apply("features", images)

    def predict(self, images: object) -> np.ndarray:
        """Most likely class of each image, (N,) int64."""
        return self._apply("forward", images).argmax(axis=1).astype(np.int64)


def train_lenet(X: object, y: object, n_levels: int, *, epochs: int = 4, seed: int = 0) -> LeNet:
    """Train a :class:`LeNet` deterministically on images X (N, H, W) with labels y (N,).

    Cross-entropy by :func:`vmonf.training.train` (Adam 1e-3, batch 128, constant rate,
    no clipping), one torch thread, batch order and initialisation from ``seed``: the
    same inputs give bit-identical weights on the same torch build.
    """
    epochs = check_positive_int(epochs, "epochs")
    levels, shape = check_images(X, n_levels)
    if len(shape) != 2:
        raise ValueError(f"X must be grey images (N, H, W), got images of shape {shape}")
    labels = torch.as_tensor(check_integer_labels(y, "y", levels.shape[0]))
    if bool((labels < 0).any()):
        raise ValueError("y must hold one non-negative class label per image")
    x = torch.as_tensor(levels, dtype=torch.float32).reshape(-1, 1, *shape) / (n_levels - 1)
    config = TrainConfig(
        max_epochs=epochs, batch_size=_BATCH, learning_rate=1e-3, lr_schedule="constant",
        grad_clip=None, desc="LeNet",
    )  # fmt: skip
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with float32_default():
            model = LeNet(int(labels.max()) + 1)
        train(
            model,
            lambda batch, _: F.cross_entropy(model(batch[0]), batch[1]),
            (x, labels),
            config,
            generator=torch.Generator().manual_seed(seed),
        )
    return model.eval()


def lenet(dataset: str = "mnist", *, epochs: int | None = None, cache: bool = True) -> FeatureNet:
    """The LeNet of ``dataset`` (trained on its train split), from the cache or trained now.

    The cache file ``lenet_<dataset>_v<version>_e<epochs>.pt`` lives in
    :func:`vmonf.datasets.image_data.cache_dir` and is written atomically;
    ``cache=False`` neither reads nor writes it.
    """
    check_choice(dataset, "dataset", image_data.IMAGE_DATASETS)
    epochs = DEFAULT_EPOCHS[dataset] if epochs is None else check_positive_int(epochs, "epochs")
    n_levels = image_data.n_levels(dataset)
    shape = image_data.image_shape(dataset)
    path = image_data.cache_dir() / f"lenet_{dataset}_v{LENET_VERSION}_e{epochs}.pt"
    kind = "LeNet"
    if cache and path.is_file():
        try:
            payload = load_checkpoint(path, kind)
            model = LeNet(int(payload["n_classes"])).float()
            model.load_state_dict(payload["model"])
            return FeatureNet(
                model.eval(), dataset, n_levels, shape, int(payload["n_classes"]),
                _weights_hash(model), float(payload["test_accuracy"]),
            )  # fmt: skip
        except (CheckpointError, KeyError, RuntimeError):
            pass  # unreadable or stale: train again and overwrite
    X, y = image_data.images(dataset, "train")
    model = train_lenet(X, y, n_levels, epochs=epochs)
    net = FeatureNet(
        model, dataset, n_levels, shape, model.fc3.out_features, _weights_hash(model), 0.0
    )
    X_test, y_test = image_data.images(dataset, "test")
    net.test_accuracy = float(np.mean(net.predict(X_test) == y_test))
    if cache:
        payload = {
            "model": model.state_dict(),
            "n_classes": net.n_classes,
            "test_accuracy": net.test_accuracy,
            "epochs": epochs,
        }
        save_checkpoint(payload, path, kind)
    return net


def _mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: object, features_b: object) -> float:
    r"""Fréchet distance between Gaussians fitted to two feature sets (N_a, F), (N_b, F).

    :math:`\|\mu_a - \mu_b\|^2 + \mathrm{tr}(C_a + C_b - 2 (C_a^{1/2} C_b C_a^{1/2})^{1/2})`,
    computed with symmetric eigendecompositions (no complex round-off). Squared
    feature units; 0 for identical statistics.
    """
    a = check_array(features_a, "features_a", min_samples=2)
    b = check_array(features_b, "features_b", n_features=a.shape[1], min_samples=2)
    mu_a, cov_a = _mean_cov(a)
    mu_b, cov_b = _mean_cov(b)
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross)
    return max(value, 0.0)


@dataclass(frozen=True)
class FrechetResult:
    """A Fréchet LeNet distance with its provenance (``feature_hash`` = the LeNet's SHA-256)."""

    distance: float
    feature_hash: str
    dataset: str
    n_a: int
    n_b: int

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly copy."""
        return {
            "distance": self.distance,
            "feature_hash": self.feature_hash,
            "dataset": self.dataset,
            "n_a": self.n_a,
            "n_b": self.n_b,
        }


def frechet_lenet_distance(images_a: object, images_b: object, net: FeatureNet) -> FrechetResult:
    """Fréchet distance between two image sets in ``net``'s feature space (lower = closer).

    Images are (N, H, W) pixel levels of ``net``'s data set (e.g. model samples
    and real test images).
    """
    fa, fb = net.features(images_a), net.features(images_b)
    return FrechetResult(
        frechet_distance(fa, fb), net.sha256, net.dataset, fa.shape[0], fb.shape[0]
    )


def label_histogram(images: object, net: FeatureNet) -> np.ndarray:
    """How many of ``images`` the LeNet puts in each class, (n_classes,) int64."""
    return np.bincount(net.predict(images), minlength=net.n_classes).astype(np.int64)
