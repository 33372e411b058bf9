"""Name -> toy class registry and the ``toy(name, **params)`` factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from vmonf.datasets.base import ToyDistribution
from vmonf.datasets.circles import Rings, TwoCircles
from vmonf.datasets.gaussians import EightGaussians, SkewedGMM
from vmonf.datasets.moons import Moons
from vmonf.datasets.pinwheel import Pinwheel

__all__ = ["TOYS", "available_toys", "toy"]

TOYS: dict[str, type[ToyDistribution]] = {
    cls.name: cls for cls in (Pinwheel, TwoCircles, Rings, Moons, EightGaussians, SkewedGMM)
}


def available_toys() -> list[str]:
    """Names accepted by ``toy``, sorted."""
    return sorted(TOYS)


def toy(name: str | None = None, /, **params: object) -> ToyDistribution:
    """Build the toy distribution ``name`` with keyword ``params`` (defaults otherwise).

    ``name`` may also be given by keyword (``toy(name="moons")``). Raises ``ValueError``
    for an unknown name and ``TypeError`` for an unknown parameter.
    """
    chosen: object = name
    if name is None:  # toy(name=...); toy("moons", name=...) reports name as unknown
        if "name" not in params:
            raise TypeError(f"toy() needs a toy name; available: {', '.join(available_toys())}")
        chosen = params.pop("name")
    if not isinstance(chosen, str):
        raise TypeError(f"toy name must be a string, got {type(chosen).__name__}")
    name = chosen
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; available toys: {', '.join(available_toys())}")
    cls = TOYS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(
            f"toy {name!r} got unknown parameter(s) {', '.join(unknown)}; "
            f"valid parameters: {', '.join(valid)}"
        )
    # Each toy's own keyword parameters (checked above), not the base class's.
    build: Callable[..., ToyDistribution] = cls
    return build(**params)
