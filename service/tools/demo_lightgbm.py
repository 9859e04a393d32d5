"""The shipped LightGBM demo: `demo.py`'s credit-risk model, trained with LightGBM.

Same data, holdout, schema features, monotone constraints, reason families, protected
attributes and required features as the XGBoost demo (all taken from `demo.py`); only the
trainer differs, so the two can be compared decision by decision.
"""

from pathlib import Path

import lightgbm as lgb
import numpy as np

from service.tools import demo
from service.tools.model_init import write_model_dir

DEMO_NAME = "german-credit-lightgbm"

# The XGBoost demo's shape (depth 4, learning rate 0.05, 80% rows and columns per tree);
# one thread, deterministic histograms and a fixed seed make training reproduce byte for byte.
PARAMS: dict[str, object] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "max_depth": 4,
    "min_data_in_leaf": 10,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "seed": demo.SEED,
    "verbose": -1,
}
ROUNDS = 200


def train_demo_lightgbm(csv_path: Path, out_dir: Path) -> Path:
    """Train the LightGBM demo model on `csv_path` and write its model directory to `out_dir`."""
    frame, y = demo.read_german_credit(csv_path)
    train, test = demo.holdout_split(y)
    params = {**PARAMS, "monotone_constraints": list(demo.monotone_constraints(frame.columns))}
    # From the DataFrame: its category columns are split as categories, and their categories
    # are stored in the model (pandas_categorical), which the schema's must equal.
    booster = lgb.train(params, lgb.Dataset(frame.iloc[train], y[train]), num_boost_round=ROUNDS)
    scores = np.asarray(booster.predict(frame.iloc[test], num_threads=1), dtype=np.float64)
    schema = demo.demo_schema(
        frame, demo.auc(y[test], scores), name=DEMO_NAME, framework="lightgbm"
    )
    write_model_dir(booster.model_to_string().encode("utf-8"), schema, out_dir)
    demo.write_holdout_reference(csv_path, test, out_dir)
    return out_dir
