"""The shipped demo model: reproducible, sound, and honest about protected attributes."""

from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from service.cli.model import model_app
from service.core.population.reference import REFERENCE_FILE
from service.core.registry import LoadedModel
from service.core.schema import SCHEMA_FILE, FeatureType, Task
from service.tools import demo
from tests.api_client import booster_of

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "german-credit"
CSV = ROOT / "data" / "german_credit.csv"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel.from_directory(SHIPPED)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.train_demo(CSV, tmp_path_factory.mktemp("demo") / "german-credit")


def test_train_demo_reproduces_the_shipped_files(model: LoadedModel, retrained: Path) -> None:
    for name in ("model.json", SCHEMA_FILE, REFERENCE_FILE):
        assert (retrained / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    assert LoadedModel.from_directory(retrained).version == model.version


def test_the_cli_trains_the_same_model(model: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "gc"
    result = CliRunner().invoke(model_app, ["train-demo", "--data", str(CSV), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"version {model.version}" in result.output
    assert "held-out AUC" in result.output


def test_schema_marks_protected_attributes_and_constrains_none(model: LoadedModel) -> None:
    schema = model.schema
    assert {f.name for f in schema.features if f.protected} == {
        "personal_status_and_sex",
        "age_in_years",
        "foreign_worker",
    }
    assert all(f.monotone == 0 for f in schema.features if f.protected)
    assert {f.name for f in schema.features if f.monotone} == {
        "duration_in_month",
        "credit_amount",
        "installment_rate_in_percentage_of_disposable_income",
    }
    assert all(f.description for f in schema.features)
    for feature in schema.features:
        if feature.type is FeatureType.NUMERIC:
            assert feature.minimum is not None
            assert feature.maximum is not None
        else:
            assert list(feature.categories) == sorted(feature.categories)
    assert schema.task is Task.BINARY
    assert schema.decision is not None
    assert (schema.decision.positive_class, schema.decision.negative_class) == ("bad", "good")


def test_numeric_ranges_cover_the_data(model: LoadedModel) -> None:
    frame, _ = demo.read_german_credit(CSV)
    for feature in model.schema.features:
        if feature.type is FeatureType.NUMERIC:
            assert feature.minimum is not None
            assert feature.maximum is not None
            assert feature.minimum <= frame[feature.name].min()
            assert frame[feature.name].max() <= feature.maximum
        else:
            assert set(frame[feature.name].dropna()) == set(feature.categories)


def test_held_out_auc(model: LoadedModel) -> None:
    frame, y = demo.read_german_credit(CSV)
    train, test = demo.holdout_split(y)
    assert not set(train) & set(test)
    assert len(test) == 200
    assert y[test].mean() == pytest.approx(0.3)
    scores = booster_of(model).predict(xgb.DMatrix(frame.iloc[test], enable_categorical=True))
    auc = roc_auc_score(y[test], scores)
    assert demo.auc(y[test], scores) == pytest.approx(auc)
    assert auc > 0.74
    assert f"held-out AUC {auc:.3f}" in model.schema.description


def test_risk_never_falls_as_a_constrained_feature_grows(model: LoadedModel) -> None:
    frame, _ = demo.read_german_credit(CSV)
    base = model.encode_many(
        frame.iloc[:50].astype(object).where(frame.iloc[:50].notna(), None).to_dict("records")
    )
    for feature in model.schema.features:
        if not feature.monotone:
            continue
        assert feature.minimum is not None
        assert feature.maximum is not None
        column = model.schema.feature_names.index(feature.name)
        grid = np.linspace(feature.minimum, feature.maximum, 40, dtype=np.float32)
        sweep = np.repeat(base, len(grid), axis=0)
        sweep[:, column] = np.tile(grid, len(base))
        margins = model.predict_margins(sweep).reshape(len(base), len(grid))
        assert (np.diff(margins, axis=1) >= 0).all(), feature.name


def test_data_attribution_is_kept() -> None:
    readme = (ROOT / "data" / "README.md").read_text()
    for credit in ("Statlog", "144", "Hans Hofmann", "University of Hamburg", "CC BY 4.0"):
        assert credit in readme


def test_required_features_are_what_a_lender_decides_on(model: LoadedModel) -> None:
    """The credit applied for, its affordability and the credit record; never a protected one."""
    required = {f.name for f in model.schema.features if not f.nullable}
    assert (
        required
        == demo.REQUIRED
        == {
            "credit_amount",
            "duration_in_month",
            "purpose",
            "installment_rate_in_percentage_of_disposable_income",
            "credit_history",
            "number_of_existing_credits_at_this_bank",
        }
    )
    assert not any(f.protected and not f.nullable for f in model.schema.features)
    assert "Required (not nullable)" in model.schema.description


# The demo's version until its schema marked required features: stored with every decision it
# made, so the same model file and schema must hash to it for as long as they are kept.
VERSION_BEFORE_REQUIRED = "54d11a2d364d5bf9ec85c64ed9348a83e1eab0418f283da85e67436b7c51c332"


def test_versions_stored_before_missing_reasons_existed_keep_their_hash(
    model: LoadedModel,
) -> None:
    schema = model.schema
    description = schema.description.split(" Required (not nullable)")[0]
    before = schema.model_copy(
        update={
            "features": tuple(f.model_copy(update={"nullable": True}) for f in schema.features),
            "families": tuple(
                f.model_copy(update={"missing_reason": None}) for f in schema.families
            ),
            "description": description,
        }
    )
    artifact = LoadedModel(before, model.model_bytes).artifact()
    assert b"missing_reason" not in artifact.schema_bytes
    assert artifact.version == VERSION_BEFORE_REQUIRED
    assert LoadedModel.from_artifact(artifact).version == VERSION_BEFORE_REQUIRED
