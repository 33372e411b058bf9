"""Locatello et al.'s baselines for competitive training, as configured estimators.

* :func:`bagging` — K generators, each trained on its own bootstrap sample of
  N/K points, mixed with equal weights ("bag" in the paper's Table 1);
* :func:`single_model` — one larger generator trained on all points ("VAE-150").

Both are :class:`~competitive.estimator.CompetitiveMixture` with no competitive
round (``max_rounds=0``), so they share its training loop, sampling and checkpoints.
Give them as many epochs (``pretrain_epochs``) as the competitive run's total.
"""

from __future__ import annotations

from typing import Any

from competitive.estimator import CompetitiveMixture

__all__ = ["bagging", "single_model"]


def _no_rounds(params: dict[str, Any]) -> dict[str, Any]:
    """No competitive round: VAEs need no exact assignment (there is no assignment at all)."""
    if "max_rounds" in params:
        raise TypeError("bagging and single_model train no competitive round: drop max_rounds")
    if params.get("generator") == "vae":
        params.setdefault("assignment", "discriminator")
    return {**params, "max_rounds": 0}


def bagging(n_components: int, *, epochs: int = 100, **params: Any) -> CompetitiveMixture:
    """K generators on bootstraps of N/K points, equal weights; ``epochs`` passes over N."""
    return CompetitiveMixture(
        n_components, init="bootstrap", pretrain_epochs=epochs, **_no_rounds(params)
    )


def single_model(
    *, hidden_features: int = 150, epochs: int = 100, **params: Any
) -> CompetitiveMixture:
    """One generator of width ``hidden_features`` trained on all points for ``epochs`` epochs."""
    return CompetitiveMixture(
        1,
        init="uniform",
        hidden_features=hidden_features,
        pretrain_epochs=epochs,
        **_no_rounds(params),
    )
