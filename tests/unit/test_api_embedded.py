"""The embedded mode (SQLite store, in-process bus and worker) answers the same API."""

from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import lightgbm
import numpy as np
import pytest
import skops.io
import xgboost as xgb
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier

from service.core.registry import LoadedModel
from service.tools.model_init import init_model_dir
from tests.api_client import (
    MODELS,
    booster_of,
    embedded_client,
    german_rows,
    problem_fields,
)
from tests.decision_checks import assert_adverse_action

ROWS = german_rows(40)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with embedded_client(tmp_path) as c:
        yield c


def pred_contribs(features: dict[str, Any]) -> np.ndarray:
    """xgboost's own attributions for one request, the correctness reference."""
    model = LoadedModel.from_directory(MODELS / "german-credit")
    matrix = xgb.DMatrix(
        model.encode_many([features]),
        feature_names=model.schema.feature_names,
        feature_types=booster_of(model).feature_types,
        enable_categorical=True,
        nthread=1,
    )
    contribs: np.ndarray = booster_of(model).predict(matrix, pred_contribs=True)[0]
    return contribs


async def test_prediction_is_explained_exactly(client: httpx.AsyncClient) -> None:
    features = {**ROWS[3], "savings_account_and_bonds": None, "job": None}
    answer = await client.post("/v1/predictions", json={"features": features})
    assert answer.status_code == 200, answer.text
    decision = answer.json()
    assert decision["prediction"]["decision"] in {"approve", "deny"}

    found = await client.get(f"/v1/explanations/{decision['transaction_id']}", params={"wait": 10})
    assert found.status_code == 200, found.text
    explanation = found.json()
    reference = pred_contribs(features)
    names = list(explanation["attributions"])
    assert names == list(features)
    ours = np.array([explanation["attributions"][n] for n in names] + [explanation["base_value"]])
    assert np.max(np.abs(ours - reference)) <= 1e-5
    assert explanation["additivity_error"] <= 1e-4
    assert explanation["prediction"] == decision["prediction"]
    assert explanation["model"] == decision["model"]
    # Which framework's model decided: the demo model, written by xgboost 3.2.0.
    assert (explanation["model_format"], explanation["framework_version"]) == ("xgboost", "3.2.0")


async def test_the_lightgbm_twin_is_explained_exactly_beside_it(
    client: httpx.AsyncClient,
) -> None:
    """The second shipped model, a LightGBM one, served beside the XGBoost demo: its
    explanation equals LightGBM's own pred_contrib, and its record says which framework."""
    model = LoadedModel.from_directory(MODELS / "german-credit-lightgbm")
    features = {**ROWS[5], "savings_account_and_bonds": None}
    body = {"features": features, "model": model.name}
    answer = await client.post("/v1/predictions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": model.name, "version": model.version}
    found = await client.get(f"/v1/explanations/{answer.json()['transaction_id']}?wait=10")
    assert found.status_code == 200, found.text
    explanation = found.json()
    reference = model.framework.reference_engine().contributions(model.encode_many([features]))
    names = model.schema.feature_names
    ours = np.array([explanation["attributions"][n] for n in names] + [explanation["base_value"]])
    assert np.max(np.abs(ours - reference[0, 0])) <= 1e-5
    assert explanation["engine"] == "shapstream"
    assert explanation["model_format"] == "lightgbm"
    assert explanation["framework_version"] == lightgbm.__version__


async def test_a_denial_carries_its_reasons(client: httpx.AsyncClient) -> None:
    # Applicant 1 of the data set: a 48-month credit the demo model denies.
    answer = await client.post("/v1/predictions", json={"features": ROWS[1]})
    assert answer.json()["prediction"]["decision"] == "deny", answer.text
    found = await client.get(f"/v1/explanations/{answer.json()['transaction_id']}?wait=10")
    assert found.status_code == 200, found.text
    schema = LoadedModel.from_directory(MODELS / "german-credit").schema
    assert_adverse_action(found.json(), schema)


async def test_repeated_transaction_id_gives_the_same_answer(client: httpx.AsyncClient) -> None:
    body = {"features": ROWS[0], "transaction_id": "loan-0001"}
    first = await client.post("/v1/predictions", json=body)
    again = await client.post("/v1/predictions", json=body)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()

    changed = {**body, "features": {**ROWS[0], "duration_in_month": 60}}
    conflict = await client.post("/v1/predictions", json=changed)
    assert conflict.status_code == 409
    assert problem_fields(conflict) == {"transaction_id"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"drop": "duration_in_month"}, "features.duration_in_month"),
        ({"set": {"favourite_colour": "blue"}}, "features.favourite_colour"),
        ({"set": {"credit_amount": "a lot"}}, "features.credit_amount"),
        ({"set": {"credit_amount": True}}, "features.credit_amount"),
        ({"set": {"purpose": "yacht"}}, "features.purpose"),
        ({"set": {"purpose": 3}}, "features.purpose"),
    ],
)
async def test_bad_features_are_named(
    client: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    features = dict(ROWS[1])
    features.pop(change.get("drop", ""), None)
    features.update(change.get("set", {}))
    answer = await client.post("/v1/predictions", json={"features": features})
    assert answer.status_code == 422
    assert problem_fields(answer) == {field}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"features": {', 400, "body"),
        (b"[1, 2]", 422, "body"),
        (b'{"features": {}, "surprise": 1}', 422, "surprise"),
        (b'{"features": {}, "transaction_id": "has space"}', 422, "transaction_id"),
        (b'{"features": {}, "model": "no-such-model"}', 422, "model"),
    ],
)
async def test_malformed_requests(
    client: httpx.AsyncClient, body: bytes, status: int, field: str
) -> None:
    answer = await client.post(
        "/v1/predictions", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == status, answer.text
    assert field in problem_fields(answer)


async def test_oversized_bodies_are_refused(client: httpx.AsyncClient) -> None:
    announced = await client.post("/v1/predictions", content=b" " * 70_000)
    assert announced.status_code == 413
    problem_fields(announced)

    async def chunks() -> AsyncIterable[bytes]:
        for _ in range(70):
            yield b" " * 1_000

    # Declared as JSON: a body that is not is refused (415) before it is read.
    json = {"content-type": "application/json"}
    streamed = await client.post("/v1/predictions", content=chunks(), headers=json)
    assert streamed.status_code == 413
    problem_fields(streamed)


async def test_unknown_explanation_is_404(client: httpx.AsyncClient) -> None:
    answer = await client.get("/v1/explanations/never-seen", params={"wait": 0.05})
    assert answer.status_code == 404
    problem_fields(answer)
    too_long = await client.get("/v1/explanations/x", params={"wait": 11})
    assert too_long.status_code == 422
    assert problem_fields(too_long) == {"wait"}


async def test_models_health_and_metrics(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()["models"]
    # The shipped models directory: the XGBoost demo (the default) and its LightGBM twin.
    assert [(m["name"], m["default"]) for m in models] == [
        ("german-credit", True),
        ("german-credit-lightgbm", False),
    ]
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert (ready["status"], ready["spooling"], ready["store"]) == ("ready", False, "up")
    await client.post("/v1/predictions", json={"features": ROWS[2]})
    exposition = (await client.get("/metrics")).text
    assert 'shapstream_http_requests_total{method="POST",route="/v1/predictions",status="200"}' in (
        exposition
    )
    assert "shapstream_events_published_total" in exposition
    missing = await client.get("/no/such/route")
    assert missing.status_code == 404
    problem_fields(missing)


def _byo_models(root: Path) -> Path:
    """Bring-your-own models of the two other formats, through `model init` as a user would:
    a LightGBM regression (text file) and a scikit-learn random forest (.skops file)."""
    diabetes = load_diabetes(as_frame=True)
    lightgbm.train(
        {"objective": "regression", "max_depth": 3, "num_threads": 1, "verbose": -1},
        lightgbm.Dataset(diabetes.data, label=diabetes.target),
        num_boost_round=10,
    ).save_model(root / "diabetes.txt")
    iris = load_iris(as_frame=True)
    forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0, n_jobs=1)
    skops.io.dump(forest.fit(iris.data, iris.target_names[iris.target]), root / "iris.skops")
    models = root / "models"
    init_model_dir(root / "diabetes.txt", models / "diabetes")
    init_model_dir(root / "iris.skops", models / "iris")
    (models / "default-model").write_text("iris\n")
    return models


async def test_bring_your_own_lightgbm_and_sklearn_models(tmp_path: Path) -> None:
    models = _byo_models(tmp_path)
    async with embedded_client(tmp_path / "data", models_dir=models) as client:
        for name, data in (("diabetes", load_diabetes), ("iris", load_iris)):
            model = LoadedModel.from_directory(models / name)
            row = {k: float(v) for k, v in data(as_frame=True).data.iloc[7].items()}
            answer = await client.post("/v1/predictions", json={"features": row, "model": name})
            assert answer.status_code == 200, answer.text
            txn = answer.json()["transaction_id"]
            explanation = (await client.get(f"/v1/explanations/{txn}?wait=10")).json()
            assert explanation["model_format"] == model.format
            reference = model.framework.reference_engine().contributions(model.encode_many([row]))
            outputs = model.schema.classes or (None,)
            for k, output in enumerate(outputs):
                values = explanation["attributions"]
                values = values[output] if output is not None else values
                base = explanation["base_value"]
                base = base[output] if output is not None else base
                ours = [values[n] for n in model.schema.feature_names] + [base]
                assert np.max(np.abs(np.array(ours) - reference[0, k])) <= 1e-5
