"""A minimal data frame for the feature-name tests (pandas is not a dependency)."""

from __future__ import annotations

import numpy as np


class Frame:
    """Named columns over an array, as scikit-learn reads a data frame's."""

    def __init__(self, data: np.ndarray, columns: list[str]) -> None:
        self.values, self.columns = data, columns

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)

    def reorder(self, order: list[int]) -> Frame:
        return Frame(self.values[:, order], [self.columns[i] for i in order])
