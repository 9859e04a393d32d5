"""The model registry: versions, artifacts, validation, encoding and scoring."""

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import xgboost as xgb
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_diabetes

from service.core.formats.base import InvalidModel
from service.core.records import BinaryPrediction, ModelArtifact, RegressionPrediction
from service.core.registry import (
    FieldError,
    InvalidFeatures,
    LoadedModel,
    ModelRegistry,
    NoDefaultModel,
    UnknownModel,
)
from service.core.schema import SCHEMA_FILE, DecisionRule, Feature, FeatureType, ModelSchema, Task
from service.settings import Settings
from tests.api_client import booster_of

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "models" / "german-credit"
CSV = ROOT / "data" / "german_credit.csv"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel.from_directory(DEMO_DIR)


@pytest.fixture(scope="module")
def frame(model: LoadedModel) -> pd.DataFrame:
    """The CSV with the schema's categories, as the booster was trained."""
    data = pd.read_csv(CSV).drop(columns="creditability")
    for feature in model.schema.features:
        if feature.categories:
            data[feature.name] = pd.Categorical(data[feature.name], categories=feature.categories)
    return data


def rows_of(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Request bodies as a client would send them (JSON types)."""
    records: list[dict[str, Any]] = orjson.loads(frame.astype(object).to_json(orient="records"))
    return records


def field_errors(exc: pytest.ExceptionInfo[InvalidFeatures]) -> dict[str, str]:
    return {e.field: e.reason for e in exc.value.errors}


def copy_demo(dest: Path) -> Path:
    shutil.copytree(DEMO_DIR, dest)
    return dest


# --- versions and artifacts ---------------------------------------------------------------


def test_version_is_a_stable_content_hash(model: LoadedModel, tmp_path: Path) -> None:
    copy = copy_demo(tmp_path / "m")
    # Reformatting the schema keeps its content, so the version stays.
    schema = orjson.loads((copy / SCHEMA_FILE).read_bytes())
    (copy / SCHEMA_FILE).write_bytes(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    assert LoadedModel.from_directory(copy).version == model.version
    assert len(model.version) == 64
    assert int(model.version, 16) >= 0


def test_version_changes_with_the_schema(model: LoadedModel, tmp_path: Path) -> None:
    copy = copy_demo(tmp_path / "m")
    schema = orjson.loads((copy / SCHEMA_FILE).read_bytes())
    schema["decision"]["deny_at_or_above"] = 0.6
    (copy / SCHEMA_FILE).write_bytes(orjson.dumps(schema))
    assert LoadedModel.from_directory(copy).version != model.version


def test_version_changes_with_the_model_file(model: LoadedModel, tmp_path: Path) -> None:
    copy = copy_demo(tmp_path / "m")
    booster = xgb.Booster(model_file=str(copy / "model.json"))
    booster.set_attr(note="retrained")
    booster.save_model(str(copy / "model.json"))
    assert LoadedModel.from_directory(copy).version != model.version


def test_artifact_round_trips(model: LoadedModel, frame: pd.DataFrame) -> None:
    artifact = ModelArtifact.model_validate_json(model.artifact().model_dump_json())
    again = LoadedModel.from_artifact(artifact)
    assert (again.name, again.version, again.schema) == (model.name, model.version, model.schema)
    x = model.encode_many(rows_of(frame.head(20)))
    np.testing.assert_array_equal(again.predict_margins(x), model.predict_margins(x))


def test_tampered_artifacts_are_refused(model: LoadedModel) -> None:
    artifact = model.artifact()
    schema = orjson.loads(artifact.schema_bytes)
    schema["decision"]["deny_at_or_above"] = 0.99
    forged_schema = artifact.model_copy(update={"schema_bytes": orjson.dumps(schema)})
    booster = xgb.Booster(model_file=bytearray(artifact.model_bytes))
    booster.set_attr(note="changed")
    forged_model = artifact.model_copy(update={"model_bytes": bytes(booster.save_raw("json"))})
    renamed = artifact.model_copy(update={"name": "other"})
    for forged in (forged_schema, forged_model, renamed):
        with pytest.raises(InvalidModel, match="tampered"):
            LoadedModel.from_artifact(forged)


# --- encoding and validation --------------------------------------------------------------


def test_encode_gives_codes_in_schema_order(model: LoadedModel, frame: pd.DataFrame) -> None:
    row = rows_of(frame.head(1))[0]
    x = model.encode(row)
    assert x.dtype == np.float32
    assert x.shape == (len(model.schema.features),)
    for i, feature in enumerate(model.schema.features):
        expected = (
            feature.categories.index(row[feature.name]) if feature.categories else row[feature.name]
        )
        assert x[i] == np.float32(expected)


def test_encode_many_is_c_contiguous_float32(model: LoadedModel, frame: pd.DataFrame) -> None:
    x = model.encode_many(rows_of(frame.head(7)))
    assert x.dtype == np.float32
    assert x.shape == (7, 20)
    assert x.flags.c_contiguous
    assert model.encode_many([]).shape == (0, 20)


def test_every_bad_field_is_named(model: LoadedModel, frame: pd.DataFrame) -> None:
    row: dict[str, Any] = rows_of(frame.head(1))[0]
    del row["purpose"]
    row["no_such_feature"] = 1
    row["duration_in_month"] = "12"
    row["credit_amount"] = True
    row["housing"] = "castle"
    row["age_in_years"] = 130
    row["installment_rate_in_percentage_of_disposable_income"] = float("nan")
    row["present_residence_since"] = float("inf")
    row["number_of_existing_credits_at_this_bank"] = 10**400
    row["job"] = 3
    with pytest.raises(InvalidFeatures) as exc:
        model.encode(row)
    assert field_errors(exc) == {
        "purpose": "missing",
        "no_such_feature": "unknown feature",
        "duration_in_month": "must be a number",
        "credit_amount": "must be a number",
        "housing": "unknown category; expected one of: for free, own, rent",
        "age_in_years": "must be <= 100",
        "installment_rate_in_percentage_of_disposable_income": "must be a finite number",
        "present_residence_since": "must be a finite number",
        "number_of_existing_credits_at_this_bank": "must be a finite number",
        "job": "unknown category; expected one of: "
        + ", ".join(model.schema.features[16].categories),
    }


def test_below_minimum_and_float32_overflow(model: LoadedModel, frame: pd.DataFrame) -> None:
    row: dict[str, Any] = rows_of(frame.head(1))[0]
    row["duration_in_month"] = 0
    row["credit_amount"] = 1e39
    with pytest.raises(InvalidFeatures) as exc:
        model.encode(row)
    assert field_errors(exc) == {
        "duration_in_month": "must be >= 1",
        "credit_amount": "must be a finite number",
    }


def test_null_is_missing_only_where_nullable(model: LoadedModel, frame: pd.DataFrame) -> None:
    row: dict[str, Any] = rows_of(frame.head(1))[0]
    row["status_of_existing_checking_account"] = None
    row["savings_account_and_bonds"] = None
    x = model.encode(row)
    assert math.isnan(x[0])
    assert math.isnan(x[5])
    strict = strict_copy(
        model, {"status_of_existing_checking_account", "savings_account_and_bonds"}
    )
    with pytest.raises(InvalidFeatures) as exc:
        strict.encode(row)
    assert field_errors(exc) == {
        "status_of_existing_checking_account": "must not be null",
        "savings_account_and_bonds": "must not be null",
    }


def test_an_application_without_a_required_feature_is_refused(
    model: LoadedModel, frame: pd.DataFrame
) -> None:
    """Not a decision: the demo model's required features name themselves when null."""
    required = {f.name for f in model.schema.features if not f.nullable}
    assert "credit_amount" in required
    row: dict[str, Any] = rows_of(frame.head(1))[0]
    with pytest.raises(InvalidFeatures) as exc:
        model.encode({**row, "credit_amount": None})
    assert field_errors(exc) == {"credit_amount": "must not be null"}
    # Every feature null: refused, naming exactly the required ones.
    with pytest.raises(InvalidFeatures) as exc:
        model.encode(dict.fromkeys(row))
    assert set(field_errors(exc)) == required
    batch = model.encode_batch([row, {**row, "purpose": None}])
    assert batch.rows == [0]
    assert batch.errors[1] == [FieldError("purpose", "must not be null", 1)]


def strict_copy(model: LoadedModel, not_null: set[str]) -> LoadedModel:
    features = tuple(
        f.model_copy(update={"nullable": f.name not in not_null}) for f in model.schema.features
    )
    schema = model.schema.model_copy(update={"features": features})
    return LoadedModel(schema, model.model_bytes)


def test_batch_errors_carry_their_row(model: LoadedModel, frame: pd.DataFrame) -> None:
    rows = rows_of(frame.head(4))
    rows[1]["housing"] = "castle"
    rows[3]["age_in_years"] = -1
    batch = model.encode_batch(rows)
    assert batch.rows == [0, 2]
    assert batch.x.shape == (2, 20)
    np.testing.assert_array_equal(batch.x, model.encode_many([rows[0], rows[2]]))
    assert batch.errors[1] == [FieldError("housing", batch.errors[1][0].reason, 1)]
    assert batch.errors[3] == [FieldError("age_in_years", "must be >= 18", 3)]
    with pytest.raises(InvalidFeatures) as exc:
        model.encode_many(rows)
    assert [(e.row, e.field) for e in exc.value.errors] == [(1, "housing"), (3, "age_in_years")]


# --- scoring ------------------------------------------------------------------------------


def test_margins_equal_the_booster_on_every_row(model: LoadedModel, frame: pd.DataFrame) -> None:
    x = model.encode_many(rows_of(frame))
    expected = booster_of(model).predict(
        xgb.DMatrix(frame, enable_categorical=True), output_margin=True
    )
    np.testing.assert_array_equal(model.predict_margins(x)[:, 0], expected)


def test_binary_prediction_follows_the_decision_rule(model: LoadedModel) -> None:
    assert model.schema.decision is not None
    threshold = model.schema.decision.deny_at_or_above
    cut = math.log(threshold / (1 - threshold))
    low, high = model.prediction([cut - 1e-6]), model.prediction([cut + 1e-6])
    assert isinstance(low, BinaryPrediction)
    assert isinstance(high, BinaryPrediction)
    assert (low.decision, high.decision) == ("approve", "deny")
    assert high.probability == pytest.approx(threshold)
    extreme = model.prediction([-800.0])
    assert isinstance(extreme, BinaryPrediction)
    assert extreme.probability == 0.0


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_missing_values_score_like_the_dataframe(
    model: LoadedModel, frame: pd.DataFrame, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(frame) - 1))
    optional = [f.name for f in model.schema.features if f.nullable]
    nulls = data.draw(st.sets(st.sampled_from(optional)))
    row = rows_of(frame.iloc[[index]])[0]
    with_nan = frame.iloc[[index]].copy()
    for name in nulls:
        row[name] = None
        with_nan[name] = with_nan[name].where(pd.Series([False], index=with_nan.index))
    expected = booster_of(model).predict(
        xgb.DMatrix(with_nan, enable_categorical=True), output_margin=True
    )
    assert model.predict_margins(model.encode(row).reshape(1, -1))[0, 0] == expected[0]


# --- objectives ---------------------------------------------------------------------------


def numeric_schema(name: str, task: Task, columns: list[str]) -> ModelSchema:
    features = tuple(Feature(name=c, type=FeatureType.NUMERIC) for c in columns)
    decision = DecisionRule() if task is Task.BINARY else None
    return ModelSchema(name=name, task=task, features=features, decision=decision)


@pytest.mark.parametrize(
    ("objective", "target"),
    [
        ("reg:squarederror", "raw"),
        ("reg:absoluteerror", "raw"),
        ("reg:pseudohubererror", "raw"),
        ("count:poisson", "positive"),
        ("reg:gamma", "positive"),
        ("reg:tweedie", "positive"),
        ("reg:logistic", "unit"),
    ],
)
def test_regression_value_uses_the_objectives_link(objective: str, target: str) -> None:
    data = load_diabetes(as_frame=True)
    x, y = data.data.to_numpy(np.float32), data.target.to_numpy()
    label = {"raw": y, "positive": y / 100, "unit": (y - y.min()) / (y.max() - y.min())}[target]
    booster = xgb.train(
        {"objective": objective, "max_depth": 3, "nthread": 1}, xgb.DMatrix(x, label), 10
    )
    schema = numeric_schema("diabetes", Task.REGRESSION, [f"f{i}" for i in range(x.shape[1])])
    model = LoadedModel(schema, bytes(booster.save_raw("json")))
    expected = booster.predict(xgb.DMatrix(x[:50]))
    for margins, value in zip(model.predict_margins(x[:50]), expected, strict=True):
        prediction = model.prediction(margins)
        assert isinstance(prediction, RegressionPrediction)
        assert prediction.value == pytest.approx(float(value), rel=1e-5)


@pytest.mark.parametrize(
    ("params", "task"),
    [
        ({"objective": "binary:hinge"}, Task.BINARY),
        ({"objective": "rank:pairwise"}, Task.REGRESSION),
        ({"objective": "binary:logistic"}, Task.REGRESSION),
        ({"objective": "reg:squarederror", "num_target": 2}, Task.REGRESSION),
    ],
)
def test_unsupported_objectives_are_refused(params: Mapping[str, Any], task: Task) -> None:
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    if params.get("num_target") == 2:
        y = np.hstack([y, y])
    booster = xgb.train({**params, "nthread": 1}, xgb.DMatrix(x, y), 2)
    schema = numeric_schema("m", task, ["f0", "f1", "f2"])
    with pytest.raises(InvalidModel):
        LoadedModel(schema, bytes(booster.save_raw("json")))


def test_schema_must_match_the_booster(model: LoadedModel) -> None:
    features = list(model.schema.features)
    swapped = [features[1], features[0], *features[2:]]
    reordered = features[0].model_copy(update={"categories": features[0].categories[::-1]})
    as_numeric = Feature(name=features[0].name, type=FeatureType.NUMERIC)
    for changed in (
        features[:-1],
        swapped,
        [reordered, *features[1:]],
        [as_numeric, *features[1:]],
    ):
        schema = model.schema.model_copy(update={"features": tuple(changed)})
        with pytest.raises(InvalidModel):
            LoadedModel(schema, model.model_bytes)


def test_a_directory_with_a_broken_model_file_is_refused(tmp_path: Path) -> None:
    copy = copy_demo(tmp_path / "m")
    (copy / "model.json").write_text("{not a model")
    with pytest.raises(InvalidModel):
        LoadedModel.from_directory(copy)


# --- the registry -------------------------------------------------------------------------


def older_version(model: LoadedModel) -> LoadedModel:
    """Another version of the same model: a different decision threshold."""
    assert model.schema.decision is not None
    decision = model.schema.decision.model_copy(update={"deny_at_or_above": 0.7})
    return LoadedModel(model.schema.model_copy(update={"decision": decision}), model.model_bytes)


def test_scan_serves_each_models_active_version(model: LoadedModel, tmp_path: Path) -> None:
    copy_demo(tmp_path / "german-credit")
    (tmp_path / "not-a-model").mkdir()
    registry = ModelRegistry.scan(tmp_path)
    assert registry.default_name == "german-credit"
    assert registry.active().version == model.version
    assert registry.active("german-credit") is registry.active()
    assert [m.name for m in registry.models()] == ["german-credit"]
    with pytest.raises(UnknownModel):
        registry.active("nope")
    with pytest.raises(UnknownModel):
        ModelRegistry.scan(tmp_path, default_model="nope")
    with pytest.raises(UnknownModel):
        ModelRegistry([]).active()


def test_two_models_with_one_name_are_refused(model: LoadedModel) -> None:
    with pytest.raises(InvalidModel):
        ModelRegistry([model, older_version(model)])


def renamed(model: LoadedModel, name: str) -> LoadedModel:
    return LoadedModel(model.schema.model_copy(update={"name": name}), model.model_bytes)


def add_model_dir(models: Path, name: str) -> Path:
    """A copy of the demo named `name`, as a directory of `models`."""
    copy = copy_demo(models / name)
    schema = orjson.loads((copy / SCHEMA_FILE).read_bytes())
    schema["name"] = name
    (copy / SCHEMA_FILE).write_bytes(orjson.dumps(schema))
    return copy


def test_adding_a_model_never_moves_the_default(model: LoadedModel, tmp_path: Path) -> None:
    """The default was the first directory by name: adding `breast-cancer` took every request
    that names no model. Now one model is the default; with more, the default is named."""
    copy_demo(tmp_path / "german-credit")
    assert ModelRegistry.scan(tmp_path).default_name == "german-credit"
    add_model_dir(tmp_path, "breast-cancer")
    with pytest.raises(NoDefaultModel) as refused:
        ModelRegistry.scan(tmp_path)
    said = str(refused.value)
    assert "SHAPSTREAM_DEFAULT_MODEL" in said
    assert "breast-cancer, german-credit" in said
    named = ModelRegistry.scan(tmp_path, default_model="german-credit")
    assert named.default_name == "german-credit"
    assert named.active().name == "german-credit"
    with pytest.raises(UnknownModel, match="the default model 'credit'"):
        ModelRegistry.scan(tmp_path, default_model="credit")
    # Or named in the models directory, where the models are; the setting wins over it.
    (tmp_path / "default-model").write_text("breast-cancer\n")
    assert ModelRegistry.scan(tmp_path).default_name == "breast-cancer"
    assert ModelRegistry.scan(tmp_path, default_model="german-credit").default_name == (
        "german-credit"
    )
    assert (
        ModelRegistry([renamed(model, "b"), renamed(model, "a")], default_model="b")
        .active(None)
        .name
        == "b"
    )
    assert ModelRegistry([]).default_name is None


def test_one_broken_directory_stops_the_whole_registry(tmp_path: Path) -> None:
    """Serving the others would answer the broken model's callers "unknown model"."""
    copy_demo(tmp_path / "german-credit")
    broken = add_model_dir(tmp_path, "other")
    (broken / "model.json").write_bytes(b"")
    settings = Settings(models_dir=tmp_path, default_model="german-credit")
    with pytest.raises(InvalidModel) as refused:
        ModelRegistry.from_settings(settings)
    assert str(refused.value) == (
        f"{broken / 'model.json'} is empty (0 bytes), not an XGBoost model"
    )
    # A schema that does not parse is named on one line too.
    (broken / SCHEMA_FILE).write_text('{"name": "other"}')
    with pytest.raises(InvalidModel) as refused:
        ModelRegistry.from_settings(settings)
    said = str(refused.value)
    assert said.startswith(f"{broken / SCHEMA_FILE}: not a valid schema: task: Field required")
    assert "\n" not in said


class Store:
    """The stored artifacts, and how often a worker asked for one."""

    def __init__(self, *models: LoadedModel) -> None:
        self.artifacts = {m.version: m.artifact() for m in models}
        self.calls: list[str] = []

    async def get_model(self, version: str) -> ModelArtifact | None:
        self.calls.append(version)
        return self.artifacts.get(version)


async def test_get_version_loads_older_versions_on_demand(model: LoadedModel) -> None:
    old = older_version(model)
    store = Store(model, old)
    registry = ModelRegistry([model], cache_size=1)
    assert await registry.get_version(model.version, store.get_model) is model
    assert store.calls == []
    loaded = await registry.get_version(old.version, store.get_model)
    assert (loaded.version, loaded.schema) == (old.version, old.schema)
    assert await registry.get_version(old.version, store.get_model) is loaded
    assert store.calls == [old.version]


async def test_version_cache_is_lru_bounded(model: LoadedModel) -> None:
    first = older_version(model)
    second = LoadedModel(model.schema.model_copy(update={"description": "v2"}), model.model_bytes)
    store = Store(first, second)
    registry = ModelRegistry([model], cache_size=1)
    await registry.get_version(first.version, store.get_model)
    await registry.get_version(second.version, store.get_model)
    await registry.get_version(first.version, store.get_model)
    assert store.calls == [first.version, second.version, first.version]


async def test_unknown_or_mismatched_versions_fail(model: LoadedModel) -> None:
    old = older_version(model)
    registry = ModelRegistry([model])
    with pytest.raises(UnknownModel):
        await registry.get_version("0" * 64, Store().get_model)

    async def wrong(version: str) -> ModelArtifact | None:
        return old.artifact().model_copy(update={"version": version})

    with pytest.raises(InvalidModel, match="tampered"):
        await registry.get_version("1" * 64, wrong)
