"""A real XGBoost model and decision events for the worker tests (unit and integration)."""

import random
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from service.core.records import DecisionEvent, DecisionRecord, ModelRef
from service.core.registry import LoadedModel
from service.core.schema import DecisionRule, Feature, FeatureType, ModelSchema, Task
from service.tools.model_init import write_model_dir

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "german-credit"
# Attributions are stored as float32: well within this of xgboost's float32 output.
TOLERANCE = 1e-5


def train_small_model(dest: Path) -> LoadedModel:
    """A small binary model with a categorical feature, for when the demo model is absent."""
    rng = np.random.default_rng(7)
    rows = 600
    purposes = ("car", "education", "furniture")
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, rows).astype(np.float32),
            "amount": rng.uniform(100, 20_000, rows).astype(np.float32),
            "purpose": pd.Categorical(rng.choice(purposes, rows), categories=list(purposes)),
        }
    )
    risk = (frame["amount"] / 20_000) - (frame["age"] - 18) / 120 + rng.normal(0, 0.2, rows)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 4, "nthread": 1, "seed": 1},
        xgb.DMatrix(frame, label=(risk > 0.2).astype(int), enable_categorical=True),
        num_boost_round=60,
    )
    schema = ModelSchema(
        name="worker-test",
        task=Task.BINARY,
        features=(
            Feature(name="age", type=FeatureType.NUMERIC, minimum=18, maximum=100),
            Feature(name="amount", type=FeatureType.NUMERIC, minimum=0, maximum=100_000),
            Feature(name="purpose", type=FeatureType.CATEGORICAL, categories=purposes),
        ),
        decision=DecisionRule(),
    )
    return write_model_dir(bytes(booster.save_raw("json")), schema, dest)


def demo_or_small_model(tmp_dir: Path) -> LoadedModel:
    """The shipped demo model if present, else a freshly trained small one."""
    if DEMO_MODEL.is_dir():
        return LoadedModel.from_directory(DEMO_MODEL)
    return train_small_model(tmp_dir)


def _features(model: LoadedModel, rng: random.Random) -> dict[str, float | str | None]:
    features: dict[str, float | str | None] = {}
    for feature in model.schema.features:
        if feature.type is FeatureType.CATEGORICAL:
            features[feature.name] = rng.choice(feature.categories)
        else:
            low = int(feature.minimum) if feature.minimum is not None else 0
            high = int(feature.maximum) if feature.maximum is not None else low + 100
            features[feature.name] = float(rng.randint(low, min(high, low + 1000)))
    return features


def make_events(model: LoadedModel, count: int, prefix: str) -> list[DecisionEvent]:
    """`count` decisions scored by `model`, ids `{prefix}-00000`..., reproducible per prefix."""
    rng = random.Random(prefix)
    events = []
    for n in range(count):
        features = _features(model, rng)
        events.append(
            DecisionEvent(
                transaction_id=f"{prefix}-{n:05d}",
                model=ModelRef(name=model.name, version=model.version),
                features=features,
                prediction=model.predict(features),
                decided_at=datetime.now(UTC),
            )
        )
    return events


def assert_exact(model: LoadedModel, event: DecisionEvent, record: DecisionRecord) -> None:
    """The stored explanation equals xgboost's own TreeSHAP (`pred_contribs`) of the event."""
    expected = model.framework.reference_engine().contributions(
        model.encode_many([event.features])
    )[0]
    assert record.transaction_id == event.transaction_id
    assert record.model == event.model
    assert record.features == event.features
    np.testing.assert_allclose(record.attributions, expected[:, :-1], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(record.base_value, expected[:, -1], rtol=0, atol=TOLERANCE)
