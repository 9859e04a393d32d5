"""Explaining batches: exact TreeSHAP of the deciding version, failures kept per event."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import xgboost as xgb

from service.core.engine.base import Engine
from service.core.explain import DeadLetterReason, explain_batch, group_by_version
from service.core.records import BinaryPrediction, DecisionEvent, ModelRef
from service.core.registry import LoadedModel
from tests.api_client import booster_of

ROOT = Path(__file__).resolve().parents[2]
DECIDED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
EXPLAINED = datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel.from_directory(ROOT / "models" / "german-credit")


@pytest.fixture(scope="module")
def engine(model: LoadedModel) -> Engine:
    return model.framework.reference_engine()


@pytest.fixture(scope="module")
def frame(model: LoadedModel) -> pd.DataFrame:
    data = pd.read_csv(ROOT / "data" / "german_credit.csv").drop(columns="creditability")
    for feature in model.schema.features:
        if feature.categories:
            data[feature.name] = pd.Categorical(data[feature.name], categories=feature.categories)
    return data


def rows_of(frame: pd.DataFrame) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = orjson.loads(frame.astype(object).to_json(orient="records"))
    return records


def decide(model: LoadedModel, rows: list[dict[str, Any]]) -> list[DecisionEvent]:
    """Events as the gateway publishes them."""
    return [
        DecisionEvent(
            transaction_id=f"txn-{i}",
            model=ModelRef(name=model.name, version=model.version),
            features=row,
            prediction=model.predict(row),
            decided_at=DECIDED,
        )
        for i, row in enumerate(rows)
    ]


def reference(model: LoadedModel, frame: pd.DataFrame) -> np.ndarray[Any, Any]:
    """xgboost's own TreeSHAP from the DataFrame, the way data scientists call it."""
    matrix = xgb.DMatrix(frame, enable_categorical=True)
    values: np.ndarray[Any, Any] = booster_of(model).predict(matrix, pred_contribs=True)
    return values


def test_batch_equals_pred_contribs_on_the_dataframe(
    model: LoadedModel, engine: Engine, frame: pd.DataFrame
) -> None:
    rows = frame.iloc[:200]
    result = explain_batch(model, engine, decide(model, rows_of(rows)), EXPLAINED)
    assert result.failures == []
    expected = reference(model, rows)
    got = np.array([r.attributions[0] + r.base_value for r in result.records])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    for record, event in zip(result.records, decide(model, rows_of(rows)), strict=True):
        assert record.transaction_id == event.transaction_id
        assert record.prediction == event.prediction
        assert record.additivity_error < 1e-5
        assert record.engine == "pred_contribs"
        # The framework, and its version that wrote models/german-credit/model.json.
        assert (record.model_format, record.framework_version) == ("xgboost", "3.2.0")
        assert (record.decided_at, record.explained_at) == (DECIDED, EXPLAINED)
    # The base value is the bias column, the same for every row.
    assert len({r.base_value[0] for r in result.records}) == 1


def test_missing_values_are_explained_exactly(
    model: LoadedModel, engine: Engine, frame: pd.DataFrame
) -> None:
    rows = frame.iloc[200:300].copy()
    rng = np.random.default_rng(7)
    # Required features are never missing (a request without one is refused).
    nullable = np.array([f.nullable for f in model.schema.features])
    holes = (rng.random(rows.shape) < 0.25) & nullable
    requests = rows_of(rows)
    for i, j in zip(*np.nonzero(holes), strict=True):
        requests[i][rows.columns[j]] = None
    rows = rows.mask(pd.DataFrame(holes, index=rows.index, columns=rows.columns))
    result = explain_batch(model, engine, decide(model, requests), EXPLAINED)
    assert result.failures == []
    got = np.array([r.attributions[0] + r.base_value for r in result.records])
    np.testing.assert_allclose(got, reference(model, rows), atol=1e-5, rtol=0)
    assert max(r.additivity_error for r in result.records) < 1e-5


def test_bad_events_fail_alone(model: LoadedModel, engine: Engine, frame: pd.DataFrame) -> None:
    events = decide(model, rows_of(frame.iloc[:6]))
    broken = events[1].features | {"housing": "castle", "age_in_years": "old"}
    events[1] = events[1].model_copy(update={"features": broken})
    assert isinstance(events[2].prediction, BinaryPrediction)
    lied = events[2].prediction.model_copy(update={"margin": events[2].prediction.margin + 0.5})
    events[2] = events[2].model_copy(update={"prediction": lied})
    other = ModelRef(name=model.name, version="f" * 64)
    events[4] = events[4].model_copy(update={"model": other})
    result = explain_batch(model, engine, events, EXPLAINED)
    assert [r.transaction_id for r in result.records] == ["txn-0", "txn-3", "txn-5"]
    reasons = {f.transaction_id: f.reason for f in result.failures}
    assert reasons == {
        "txn-1": DeadLetterReason.INVALID_FEATURES,
        "txn-2": DeadLetterReason.ADDITIVITY_ERROR,
        "txn-4": DeadLetterReason.MODEL_VERSION_MISMATCH,
    }
    details = {f.transaction_id: f.detail for f in result.failures}
    assert "housing: unknown category" in details["txn-1"]
    assert "age_in_years: must be a number" in details["txn-1"]
    assert details["txn-2"].startswith("additivity error 0.5")
    assert "f" * 64 in details["txn-4"]


def test_a_batch_of_only_bad_events_calls_no_engine(
    model: LoadedModel, frame: pd.DataFrame
) -> None:
    class Refuses:
        name = "refuses"

        def contributions(self, x: Any) -> Any:
            raise AssertionError("no valid row, no engine call")

    event = decide(model, rows_of(frame.iloc[:1]))[0]
    event = event.model_copy(update={"features": {}})
    result = explain_batch(model, Refuses(), [event], EXPLAINED)
    assert result.records == []
    assert [f.transaction_id for f in result.failures] == ["txn-0"]
    assert explain_batch(model, Refuses(), [], EXPLAINED).failures == []


def test_group_by_version_keeps_arrival_order(model: LoadedModel, frame: pd.DataFrame) -> None:
    events = decide(model, rows_of(frame.iloc[:5]))
    other = ModelRef(name=model.name, version="a" * 64)
    events[1] = events[1].model_copy(update={"model": other})
    events[3] = events[3].model_copy(update={"model": other})
    groups = group_by_version(events)
    assert list(groups) == [model.version, "a" * 64]
    assert [e.transaction_id for e in groups[model.version]] == ["txn-0", "txn-2", "txn-4"]
    assert [e.transaction_id for e in groups["a" * 64]] == ["txn-1", "txn-3"]


def test_engine_output_shape(model: LoadedModel, engine: Engine, frame: pd.DataFrame) -> None:
    x = model.encode_many(rows_of(frame.iloc[:3]))
    values = engine.contributions(x)
    assert values.dtype == np.float64
    assert values.shape == (3, 1, 21)
