"""vmonf: mixtures of normalizing flows, trained softly (VMoNF) or competitively."""

from __future__ import annotations

from vmonf import datasets

__all__ = ["datasets"]
__version__ = "0.1.0"
