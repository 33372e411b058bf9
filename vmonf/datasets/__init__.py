"""Ground-truth data: 2-D toy distributions with their true densities.

``toy(name, **params)`` builds one (see ``available_toys()``); every toy offers
``sample``, ``log_prob`` (nats), ``log_joint``, ``predict`` and ``entropy``.
Image loaders will live beside the toys in this package.
"""

from __future__ import annotations

from vmonf.datasets.base import ToyDistribution
from vmonf.datasets.registry import TOYS, available_toys, toy

__all__ = ["TOYS", "ToyDistribution", "available_toys", "toy"]
