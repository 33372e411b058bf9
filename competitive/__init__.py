"""Competitive (hard-assignment) training of mixtures of generative models.

Locatello et al. (2018), Algorithm 1, on vmonf's batched flows, with VAE and
k-means generators, exact or discriminator (density-ratio) assignment, the
paper's baselines (bagging, one larger model), and the comparison of the
discriminators' likelihood estimates with the exact ones (:mod:`competitive.compare`;
``vmonf report`` runs the studies, :mod:`competitive.report`).
"""

from __future__ import annotations

from competitive.baselines import bagging, single_model
from competitive.compare import (
    RoundTracker,
    compare_log_ratios,
    compare_with_exact,
    component_log_prob,
    discriminator_estimate,
    exact_log_ratios,
)
from competitive.discriminators import Discriminators
from competitive.estimator import CompetitiveMixture
from competitive.generators import (
    FlowGenerators,
    Generators,
    KMeansGenerators,
    NoExactLikelihoodError,
    VAEGenerators,
)

__all__ = [
    "CompetitiveMixture",
    "Discriminators",
    "FlowGenerators",
    "Generators",
    "KMeansGenerators",
    "NoExactLikelihoodError",
    "RoundTracker",
    "VAEGenerators",
    "bagging",
    "compare_log_ratios",
    "compare_with_exact",
    "component_log_prob",
    "discriminator_estimate",
    "exact_log_ratios",
    "single_model",
]
