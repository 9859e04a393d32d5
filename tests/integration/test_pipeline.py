"""The whole pipeline over real HTTP: gateway and worker processes, real Kafka and Cassandra.

N predictions give N stored explanations, each equal to the framework's own exact SHAP of the
served model (xgboost's `pred_contribs` computed here through pandas categoricals, an encoding
path independent of the service's; LightGBM's `pred_contrib`; for scikit-learn, served from a
forest file without scikit-learn, the float64 TreeSHAP its format serves with, which the unit
tests check against shap), for German credit rows in both shipped formats, rows with missing
values, and bring-your-own regression and multiclass models of each format made into model
directories with `shapstream model init`.
"""

import asyncio
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import skops.io
import xgboost as xgb
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier

from service.adapters.cassandra_store import build_cluster
from service.core.registry import LoadedModel
from service.core.schema import FeatureType, Task
from service.settings import CassandraSettings
from tests.api_client import MODELS, bearer, booster_of, create_key, german_rows, problem_fields
from tests.decision_checks import assert_adverse_action

SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))
TOLERANCE = 1e-5
# xgboost's own contributions are float32: beyond 1e-5 absolute, allow two float32 ulps of the
# value (a regression target near 300 has an ulp of 3e-5, finer than float32 can say).
FLOAT32_RTOL = 2.5e-7
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Stack:
    url: str
    models_dir: Path
    keyspace: str
    # Holds every scope; from `shapstream keys create`, as an operator would make it.
    key: str
    env: dict[str, str]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _train_byo_models(models_dir: Path, work: Path) -> None:
    """A regression and a multiclass model in each format: XGBoost (JSON, UBJ), LightGBM (text,
    regression) and scikit-learn (a .skops random forest, multiclass)."""
    diabetes = load_diabetes(as_frame=True)
    reg = xgb.train(
        {"objective": "reg:squarederror", "max_depth": 4, "nthread": 1, "seed": 0},
        xgb.DMatrix(diabetes.data, label=diabetes.target),
        num_boost_round=40,
    )
    reg.save_model(work / "diabetes.json")
    iris = load_iris(as_frame=True)
    clf = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1, "seed": 0},
        xgb.DMatrix(iris.data, label=iris.target),
        num_boost_round=30,
    )
    clf.save_model(work / "iris.ubj")
    lgb.train(
        {"objective": "regression", "max_depth": 4, "num_threads": 1, "seed": 0, "verbose": -1},
        lgb.Dataset(diabetes.data, label=diabetes.target),
        num_boost_round=40,
    ).save_model(work / "diabetes.txt")
    forest = RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0, n_jobs=1)
    # scikit-learn keeps the class labels it was fitted with: model init takes them.
    labels = iris.target_names[iris.target]
    skops.io.dump(forest.fit(iris.data, labels), work / "iris.skops")
    for name, source, extra in (
        ("diabetes", "diabetes.json", []),
        ("iris", "iris.ubj", ["--classes", "setosa,versicolor,virginica"]),
        ("diabetes-lightgbm", "diabetes.txt", []),
        ("iris-sklearn", "iris.skops", []),
    ):
        command = [SHAPSTREAM, "model", "init", str(work / source), str(models_dir / name)]
        subprocess.run(
            [*command, "--name", name, *extra],
            check=True,
            capture_output=True,
        )


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    import time

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"{proc.args!r} exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"gateway not ready in {START_TIMEOUT_S} s:\n{logs[0].read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    kafka_bootstrap: str,
    cassandra_contact: list[tuple[str, int]],
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("pipeline")
    models_dir = work / "models"
    for shipped in ("german-credit", "german-credit-lightgbm"):
        shutil.copytree(MODELS / shipped, models_dir / shipped)
    _train_byo_models(models_dir, work)
    run = uuid.uuid4().hex[:10]
    keyspace = f"pipeline_{run}"
    port = _free_port()
    env = {
        **os.environ,
        "SHAPSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "SHAPSTREAM_CASSANDRA_HOSTS": ",".join(f"{h}:{p}" for h, p in cassandra_contact),
        "SHAPSTREAM_MODELS_DIR": str(models_dir),
        "SHAPSTREAM_DEFAULT_MODEL": "german-credit",
        "SHAPSTREAM_KAFKA_TOPIC": f"pipeline-{run}",
        "SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC": f"pipeline-{run}-dlq",
        "SHAPSTREAM_KAFKA_GROUP_ID": f"pipeline-{run}",
        "SHAPSTREAM_CASSANDRA_KEYSPACE": keyspace,
        # A gateway's own spool: another run's (or another checkout's) must not be shared.
        "SHAPSTREAM_SPOOL_DIR": str(work / "spool"),
    }
    logs = [work / "gateway.log", work / "worker.log"]
    commands = [[SHAPSTREAM, "serve", "--port", str(port)], [SHAPSTREAM, "worker"]]
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, procs, logs)
        key = create_key(f"pipeline-{run}", "predict,explanations:read,audit:export", env)
        yield Stack(url, models_dir, keyspace, key, env)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        hosts = ",".join(f"{h}:{p}" for h, p in cassandra_contact)
        cluster = build_cluster(CassandraSettings(hosts=hosts, keyspace=keyspace))
        try:
            cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        finally:
            cluster.shutdown()


def reference_contribs(model: LoadedModel, rows: list[dict[str, Any]]) -> np.ndarray:
    """The framework's own exact SHAP, (rows, outputs, F+1); xgboost's `pred_contribs` via a
    frame of categorical dtypes."""
    if model.format != "xgboost":
        return model.framework.reference_engine().contributions(model.encode_many(rows))
    columns: dict[str, Any] = {}
    for feature in model.schema.features:
        values = [row[feature.name] for row in rows]
        if feature.type is FeatureType.CATEGORICAL:
            columns[feature.name] = pd.Categorical(values, categories=list(feature.categories))
        else:
            columns[feature.name] = pd.array(values, dtype="Float64").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
    frame = pd.DataFrame(columns)
    matrix = xgb.DMatrix(frame, enable_categorical=True, nthread=1)
    contribs = booster_of(model).predict(matrix, pred_contribs=True, strict_shape=True)
    return np.asarray(contribs, dtype=np.float64)


def _as_array(explanation: dict[str, Any], model: LoadedModel) -> np.ndarray:
    names = model.schema.feature_names
    if model.schema.task is Task.MULTICLASS:
        per_class = [
            [explanation["attributions"][c][n] for n in names] + [explanation["base_value"][c]]
            for c in model.schema.classes
        ]
        return np.array(per_class)
    return np.array([[explanation["attributions"][n] for n in names] + [explanation["base_value"]]])


async def _decide_and_explain(
    stack: Stack, rows: list[dict[str, Any]], model: str | None
) -> list[dict[str, Any]]:
    limits = asyncio.Semaphore(16)
    async with httpx.AsyncClient(
        base_url=stack.url, headers=bearer(stack.key), timeout=30
    ) as client:

        async def one(features: dict[str, Any]) -> dict[str, Any]:
            async with limits:
                body: dict[str, Any] = {"features": features}
                if model is not None:
                    body["model"] = model
                decided = await client.post("/v1/predictions", json=body)
                assert decided.status_code == 200, decided.text
                txn = decided.json()["transaction_id"]
                found = await client.get(f"/v1/explanations/{txn}", params={"wait": 10})
                assert found.status_code == 200, found.text
                explanation: dict[str, Any] = found.json()
                assert explanation["prediction"] == decided.json()["prediction"]
                return explanation

        return await asyncio.gather(*(one(r) for r in rows))


def _with_missing(
    rows: list[dict[str, Any]], seed: int, model: LoadedModel | None = None
) -> list[dict[str, Any]]:
    """Rows with 1 to 4 features null: of those `model` lets be null (required ones never)."""
    rng = random.Random(seed)
    required = {f.name for f in model.schema.features if not f.nullable} if model else set()
    out = []
    for row in rows:
        holes = rng.sample(sorted(set(row) - required), k=rng.randint(1, 4))
        out.append({k: (None if k in holes else v) for k, v in row.items()})
    return out


def _check_exact(
    model: LoadedModel, rows: list[dict[str, Any]], found: list[dict[str, Any]]
) -> None:
    reference = reference_contribs(model, rows)
    ours = np.stack([_as_array(e, model) for e in found])
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=FLOAT32_RTOL, atol=TOLERANCE)
    assert all(e["model"]["version"] == model.version for e in found)
    for e in found:
        margins = e["prediction"].get("margins") or {"": e["prediction"]["margin"]}
        # float32 sums: the error scales with the margin's size.
        bound = TOLERANCE * max(1.0, *(abs(m) for m in margins.values()))
        assert e["additivity_error"] <= bound


@pytest.mark.parametrize("name", ["german-credit", "german-credit-lightgbm"])
async def test_german_credit_decisions_are_explained_exactly(stack: Stack, name: str) -> None:
    model = LoadedModel.from_directory(stack.models_dir / name)
    plain = german_rows(120)
    rows = plain[:80] + _with_missing(plain[80:], seed=1, model=model)
    # The default model is the XGBoost demo: it is asked for by omitting `model`.
    found = await _decide_and_explain(stack, rows, None if name == "german-credit" else name)
    assert {(e["model_format"], e["model"]["name"]) for e in found} == {(model.format, name)}
    assert len({e["transaction_id"] for e in found}) == len(rows)
    _check_exact(model, rows, found)
    denied = [e for e in found if e["prediction"]["decision"] == "deny"]
    assert denied
    for explanation in denied:
        assert_adverse_action(explanation, model.schema)
    assert all(e["reasons"] == [] for e in found if e["prediction"]["decision"] == "approve")


@pytest.mark.parametrize("name", ["diabetes", "iris", "diabetes-lightgbm", "iris-sklearn"])
async def test_bring_your_own_models(stack: Stack, name: str) -> None:
    model = LoadedModel.from_directory(stack.models_dir / name)
    data = (load_diabetes if name.startswith("diabetes") else load_iris)(as_frame=True).data
    data.columns = model.schema.feature_names
    rows = [{k: float(v) for k, v in r.items()} for r in data.head(40).to_dict("records")]
    rows[-5:] = _with_missing(rows[-5:], seed=2)
    found = await _decide_and_explain(stack, rows, name)
    _check_exact(model, rows, found)
    assert {e["model_format"] for e in found} == {model.format}
    if name.startswith("iris"):
        assert found[0]["prediction"]["class"] in {"setosa", "versicolor", "virginica"}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"features": {"duration_in_month": 12}}, 422, "features.credit_amount"),
        ({"features": {**german_rows(1)[0], "zodiac": "leo"}}, 422, "features.zodiac"),
        ({"features": {**german_rows(1)[0], "age_in_years": "old"}}, 422, "features.age_in_years"),
        ({"features": {**german_rows(1)[0], "purpose": "moon trip"}}, 422, "features.purpose"),
        ({"features": german_rows(1)[0], "model": "nope"}, 422, "model"),
    ],
)
def test_bad_input_over_http(stack: Stack, body: dict[str, Any], status: int, field: str) -> None:
    answer = httpx.post(
        f"{stack.url}/v1/predictions", json=body, headers=bearer(stack.key), timeout=10
    )
    assert answer.status_code == status
    assert field in problem_fields(answer)


def test_malformed_and_oversized_over_http(stack: Stack) -> None:
    headers = {"content-type": "application/json", **bearer(stack.key)}
    malformed = httpx.post(f"{stack.url}/v1/predictions", content=b"{", headers=headers)
    assert malformed.status_code == 400
    assert problem_fields(malformed) == {"body"}
    huge = httpx.post(f"{stack.url}/v1/predictions", content=b"0" * 200_000, headers=headers)
    assert huge.status_code == 413
    problem_fields(huge)


async def test_access_control_and_access_log_over_http(stack: Stack) -> None:
    # One explanation read by a key of its own, to find in the log (Cassandra, kafka mode).
    reader = create_key(f"reader-{uuid.uuid4().hex[:8]}", "predict,explanations:read", stack.env)
    found = await _decide_and_explain(replace(stack, key=reader), german_rows(1), None)
    txn = found[0]["transaction_id"]
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        anonymous = await client.post("/v1/predictions", json={"features": german_rows(1)[0]})
        assert anonymous.status_code == 401
        problem_fields(anonymous)
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        refused = await client.get("/v1/audit/access-log", headers=bearer(reader))
        assert refused.status_code == 403
        assert refused.json()["missing_scope"] == "audit:export"
        assert (await client.get("/healthz")).status_code == 200

        listed = await client.get("/v1/audit/access-log", headers=bearer(stack.key))
        assert listed.status_code == 200, listed.text
        reads = [e for e in listed.json()["entries"] if e["target"] == txn]
        assert [(e["action"], e["key_name"].startswith("reader-")) for e in reads] == [
            ("explanation.read", True)
        ]
