"""The shipped LightGBM demo model: reproducible, the XGBoost demo's schema, and explained
by the native engine as LightGBM explains it."""

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from service.core.engine.fast import FastTreeShap
from service.core.population.reference import REFERENCE_FILE
from service.core.registry import LoadedModel
from service.core.schema import SCHEMA_FILE
from service.tools import demo, demo_lightgbm

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "german-credit-lightgbm"
XGBOOST_DEMO = ROOT / "models" / "german-credit"
CSV = ROOT / "data" / "german_credit.csv"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel.from_directory(SHIPPED)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "german-credit-lightgbm"
    return demo_lightgbm.train_demo_lightgbm(CSV, out)


def test_training_reproduces_the_shipped_files(model: LoadedModel, retrained: Path) -> None:
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["model.txt", REFERENCE_FILE, SCHEMA_FILE]
    for name in ("model.txt", SCHEMA_FILE, REFERENCE_FILE):
        assert (retrained / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    assert LoadedModel.from_directory(retrained).version == model.version
    assert model.format == "lightgbm"


def test_schema_is_the_xgboost_demos(model: LoadedModel) -> None:
    """Same features, types, categories, ranges, reason families, protected and required
    features: only the name, the model file and the description differ."""
    xgboost = LoadedModel.from_directory(XGBOOST_DEMO).schema
    ours = model.schema
    assert (ours.name, ours.model_file) == ("german-credit-lightgbm", "model.txt")
    differing = {"name", "model_file", "description"}
    assert ours.model_dump(exclude=differing) == xgboost.model_dump(exclude=differing)
    assert (
        ours.description.replace("LightGBM", "XGBoost").split("held-out AUC")[0]
        == (xgboost.description.split("held-out AUC")[0])
    )


def test_held_out_auc(model: LoadedModel) -> None:
    frame, y = demo.read_german_credit(CSV)
    _, test = demo.holdout_split(y)
    booster = lgb.Booster(model_file=SHIPPED / "model.txt")
    scores = booster.predict(frame.iloc[test], num_threads=1)
    auc = roc_auc_score(y[test], scores)
    assert auc > 0.74
    assert f"held-out AUC {auc:.3f}" in model.schema.description
    # The served probabilities are LightGBM's own.
    x = model.encode_many(
        frame.iloc[test].astype(object).where(frame.iloc[test].notna(), None).to_dict("records")
    )
    margins = model.predict_margins(x)[:, 0]
    np.testing.assert_allclose(1 / (1 + np.exp(-margins)), scores, rtol=1e-12)


def test_risk_never_falls_as_a_constrained_feature_grows(model: LoadedModel) -> None:
    frame, _ = demo.read_german_credit(CSV)
    base = model.encode_many(
        frame.iloc[:50].astype(object).where(frame.iloc[:50].notna(), None).to_dict("records")
    )
    constrained = [f for f in model.schema.features if f.monotone]
    assert {f.name for f in constrained} == {
        "duration_in_month",
        "credit_amount",
        "installment_rate_in_percentage_of_disposable_income",
    }
    for feature in constrained:
        assert feature.minimum is not None
        assert feature.maximum is not None
        column = model.schema.feature_names.index(feature.name)
        grid = np.linspace(feature.minimum, feature.maximum, 40, dtype=np.float32)
        sweep = np.repeat(base, len(grid), axis=0)
        sweep[:, column] = np.tile(grid, len(base))
        margins = model.predict_margins(sweep).reshape(len(base), len(grid))
        assert (np.diff(margins, axis=1) >= 0).all(), feature.name


def test_native_engines_reproduce_lightgbm(model: LoadedModel) -> None:
    frame, _ = demo.read_german_credit(CSV)
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    x = model.encode_many(rows)
    x[::7, 5] = np.nan  # savings not provided
    assert model.native is not None  # bit-exact with LightGBM, checked at load
    np.testing.assert_array_equal(
        model.native.predict_margins(x), model.framework.predict_margins(x)
    )
    theirs = model.framework.reference_engine().contributions(x)
    np.testing.assert_allclose(FastTreeShap(model.forest()).contributions(x), theirs, atol=1e-5)
