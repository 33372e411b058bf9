"""vmonf: mixtures of normalizing flows, trained softly (VMoNF) or competitively."""

from __future__ import annotations

from vmonf import datasets
from vmonf.estimator import VMoNF
from vmonf.flows import ComponentFlows
from vmonf.mixture import MixtureOfFlows
from vmonf.model import VariationalMixture
from vmonf.posterior import PosteriorNet

__all__ = [
    "ComponentFlows",
    "MixtureOfFlows",
    "PosteriorNet",
    "VMoNF",
    "VariationalMixture",
    "datasets",
]
__version__ = "0.1.0"
