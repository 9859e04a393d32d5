"""XGBoost's own TreeSHAP (`pred_contribs`): the correctness reference for every engine."""

import numpy as np
import xgboost as xgb

from service.core.engine.base import Contributions, FloatMatrix


class PredContribs:
    """Exact TreeSHAP through `Booster.predict(..., pred_contribs=True)`, one thread."""

    name = "pred_contribs"

    def __init__(self, booster: xgb.Booster) -> None:
        self._booster = booster
        self._names = booster.feature_names
        self._types = booster.feature_types
        self._categorical = self._types is not None and "c" in self._types

    def contributions(self, x: FloatMatrix) -> Contributions:
        """Attributions, shape (rows, outputs, features + 1), bias last."""
        # nthread=1: a DMatrix built with the default oversubscribes OpenMP in a busy process.
        matrix = xgb.DMatrix(
            x,
            feature_names=self._names,
            feature_types=self._types,
            enable_categorical=self._categorical,
            nthread=1,
        )
        values = self._booster.predict(matrix, pred_contribs=True, strict_shape=True)
        return np.asarray(values, dtype=np.float64)
