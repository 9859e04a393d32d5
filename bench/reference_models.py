"""The two reference models of the engine benchmark, built deterministically and cached.

    .venv/bin/python bench/reference_models.py [DIR]      # default bench/out/models

Both are binary:logistic on 30 synthetic features with 5% missing values in 5 of them:
``ref_300x6.json`` (300 trees, depth 6) and ``ref_1000x8.json`` (1,000 trees, depth 8).
A model is rebuilt only when its file is missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from service.benchmarks.engine import synthetic_rows

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


def build(
    out_dir: Path = DEFAULT_DIR, names: Collection[str] = tuple(REFERENCE)
) -> dict[str, Path]:
    """Train (if not cached) and save the reference models `names`; returns name -> path."""
    import xgboost as xgb

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    x = synthetic_rows(TRAIN_ROWS, seed=SEED)
    y = _labels(x, np.random.default_rng(SEED + 1))
    for name in names:
        trees, depth = REFERENCE[name]
        path = out_dir / f"{name}.json"
        paths[name] = path
        if path.exists():
            continue
        t0 = time.perf_counter()
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
        tmp = path.with_suffix(".tmp.json")
        booster.save_model(str(tmp))
        tmp.replace(path)
        print(f"trained {name} in {time.perf_counter() - t0:.1f}s -> {path}", file=sys.stderr)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    for path in build(args.out_dir).values():
        print(path)


if __name__ == "__main__":
    main()
