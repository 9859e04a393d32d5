"""The two reference models of the engine benchmark, built deterministically and cached.

    .venv/bin/python -m bench.reference_models [DIR]      # default bench/out/models

The same two sizes in each format, trained on the same rows (30 synthetic features with 5%
missing values in 5 of them, a binary label): 300 trees of depth 6 and 1,000 of depth 8, as
XGBoost ``binary:logistic`` (``ref_300x6.json``), LightGBM ``binary`` (``ref_300x6.lgb.txt``,
max_depth and 2**depth leaves) and scikit-learn ``HistGradientBoostingClassifier``
(``ref_300x6.skops``; scikit-learn's ensemble that takes missing values and scales to these
sizes). A model is rebuilt only when its file is missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from bench.engine import synthetic_rows

REFERENCE = {"ref_300x6": (300, 6), "ref_1000x8": (1000, 8)}
TRAIN_ROWS = 20_000
SEED = 20240604
DEFAULT_DIR = Path(__file__).resolve().parent / "out" / "models"


def _labels(x: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    z = np.nan_to_num(x, nan=0.0)
    logit = (
        1.2 * z[:, 0]
        - 0.8 * z[:, 1] * z[:, 2]
        + np.sin(2.0 * z[:, 3])
        + 0.6 * np.abs(z[:, 4])
        + 0.4 * z[:, 5:15].sum(axis=1) / 3.0
        - 0.3 * (z[:, 15] > 0.5) * z[:, 16]
        + np.where(np.isnan(x[:, 0]), 0.7, 0.0)
    )
    labels: NDArray[np.float32] = (logit + rng.logistic(size=len(x)) > 0).astype(np.float32)
    return labels


FORMATS = ("xgboost", "lightgbm", "sklearn")
_SUFFIX = {"xgboost": ".json", "lightgbm": ".lgb.txt", "sklearn": ".skops"}


def build(
    out_dir: Path = DEFAULT_DIR,
    names: Collection[str] = tuple(REFERENCE),
    formats: Collection[str] = FORMATS,
) -> dict[str, Path]:
    """Train (if not cached) and save the reference models `names` in each of `formats`;
    returns "name.format" -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    x = synthetic_rows(TRAIN_ROWS, seed=SEED)
    y = _labels(x, np.random.default_rng(SEED + 1))
    train = {"xgboost": _xgboost, "lightgbm": _lightgbm, "sklearn": _sklearn}
    for name in names:
        trees, depth = REFERENCE[name]
        for framework in formats:
            path = out_dir / f"{name}{_SUFFIX[framework]}"
            paths[f"{name}.{framework}"] = path
            if path.exists():
                continue
            t0 = time.perf_counter()
            # Written aside, then renamed: an interrupted run leaves no half model behind.
            tmp = path.with_name(f".tmp-{path.name}")
            train[framework](x, y, trees, depth, tmp)
            tmp.replace(path)
            took = time.perf_counter() - t0
            print(f"trained {path.name} in {took:.1f}s -> {path}", file=sys.stderr)
    return paths


def _xgboost(
    x: NDArray[np.float32], y: NDArray[np.float32], trees: int, depth: int, path: Path
) -> None:
    import xgboost as xgb

    params = {
        "objective": "binary:logistic",
        "max_depth": depth,
        "eta": 0.05,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "tree_method": "hist",
        "seed": SEED,
        "nthread": 1,
    }
    booster = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=trees)
    booster.save_model(str(path))  # JSON: xgboost picks the format by the extension


def _lightgbm(
    x: NDArray[np.float32], y: NDArray[np.float32], trees: int, depth: int, path: Path
) -> None:
    import lightgbm as lgb

    params = {
        "objective": "binary",
        "max_depth": depth,
        "num_leaves": 2**depth,
        "learning_rate": 0.05,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "feature_fraction": 0.8,
        "min_data_in_leaf": 5,
        "seed": SEED,
        "num_threads": 1,
        "verbose": -1,
    }
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=trees)
    booster.save_model(str(path))


def _sklearn(
    x: NDArray[np.float32], y: NDArray[np.float32], trees: int, depth: int, path: Path
) -> None:
    import skops.io
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_iter=trees,
        max_depth=depth,
        max_leaf_nodes=2**depth,
        learning_rate=0.05,
        early_stopping=False,
        random_state=SEED,
    )
    model.fit(x, y)
    skops.io.dump(model, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    for path in build(args.out_dir).values():
        print(path)


if __name__ == "__main__":
    main()
