"""The Gaussian log-density in one place (nats): torch for models, numpy for toys."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["LOG_2PI", "diagonal_normal_log_prob", "log_normal"]

LOG_2PI = math.log(2.0 * math.pi)


def diagonal_normal_log_prob(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, diag exp(log_var)) summed over the last axis (broadcasting), nats."""
    return -0.5 * ((x - mean) ** 2 * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


def log_normal(x: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
    """Elementwise log N(x; mean, std^2) in nats (numpy, broadcasting)."""
    z = (x - mean) / std
    return -0.5 * z**2 - np.log(std) - 0.5 * LOG_2PI
