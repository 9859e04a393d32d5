"""The one interface every TreeSHAP engine offers."""

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

FloatMatrix = NDArray[np.float32]
Contributions = NDArray[np.float64]


class Engine(Protocol):
    """Exact path-dependent TreeSHAP of one model version."""

    name: str

    def contributions(self, x: FloatMatrix) -> Contributions:
        """Attributions in margin space, shape (rows, outputs, features + 1), bias last.

        `x` is C-contiguous float32 (rows, features): NaN is missing, a categorical
        feature holds its category code. `outputs` is 1 except for multiclass models.
        """
        ...
