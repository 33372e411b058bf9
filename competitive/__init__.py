"""Competitive (hard-assignment) training of mixtures of generative models.

Locatello et al. (2018), Algorithm 1, on vmonf's batched flows, with VAE and
k-means generators, exact or discriminator (density-ratio) assignment, and the
paper's baselines (bagging, one larger model).
"""

from __future__ import annotations

from competitive.baselines import bagging, single_model
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
    "VAEGenerators",
    "bagging",
    "single_model",
]
