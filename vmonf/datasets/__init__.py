"""Data: 2-D toy distributions with their true densities, and offline image data sets.

``toy(name, **params)`` builds one (see ``available_toys()``); every toy offers
``sample``, ``log_prob`` (nats), ``log_joint``, ``predict`` and ``entropy``.
``images(name, split, classes)`` loads ``digits``, ``mnist`` or ``fashion_mnist``
as uint8 (N, H, W) arrays with their labels.
"""

from __future__ import annotations

from vmonf.datasets.base import ToyDistribution
from vmonf.datasets.image_data import (
    IMAGE_DATASETS,
    DatasetUnavailableError,
    image_shape,
    images,
    n_levels,
)
from vmonf.datasets.registry import TOYS, available_toys, toy

__all__ = [
    "IMAGE_DATASETS",
    "TOYS",
    "DatasetUnavailableError",
    "ToyDistribution",
    "available_toys",
    "image_shape",
    "images",
    "n_levels",
    "toy",
]
