"""Bring your own model: any XGBoost file becomes a servable, explainable directory."""

import pickle
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from sklearn.datasets import load_diabetes, load_wine
from typer.testing import CliRunner

from service.cli.model import model_app
from service.core.explain import explain_batch
from service.core.formats.base import InvalidModel
from service.core.records import (
    BinaryPrediction,
    DecisionEvent,
    ModelRef,
    MulticlassPrediction,
    RegressionPrediction,
)
from service.core.registry import LoadedModel
from service.core.schema import FeatureType, Task
from service.tools.model_init import init_model_dir

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def events_for(model: LoadedModel, rows: list[dict[str, Any]]) -> list[DecisionEvent]:
    ref = ModelRef(name=model.name, version=model.version)
    return [
        DecisionEvent(
            transaction_id=str(i),
            model=ref,
            features=row,
            prediction=model.predict(row),
            decided_at=NOW,
        )
        for i, row in enumerate(rows)
    ]


def explained(model: LoadedModel, rows: list[dict[str, Any]]) -> np.ndarray[Any, Any]:
    """(rows, outputs, features + 1) from explain_batch, bias last."""
    result = explain_batch(model, model.framework.reference_engine(), events_for(model, rows), NOW)
    assert result.failures == []
    assert max(r.additivity_error for r in result.records) < 1e-4
    return np.array(
        [
            [[*a, b] for a, b in zip(r.attributions, r.base_value, strict=True)]
            for r in result.records
        ]
    )


def test_regression_model_from_ubj(tmp_path: Path) -> None:
    data = load_diabetes(as_frame=True)
    x, y = data.data, data.target
    booster = xgb.train(
        {"objective": "reg:squarederror", "max_depth": 4, "nthread": 1}, xgb.DMatrix(x, y), 60
    )
    booster.save_model(tmp_path / "diabetes.ubj")
    schema = init_model_dir(tmp_path / "diabetes.ubj", tmp_path / "diabetes")
    assert (schema.name, schema.task) == ("diabetes", Task.REGRESSION)
    assert schema.feature_names == list(x.columns)
    model = LoadedModel.from_directory(tmp_path / "diabetes")
    rows: list[dict[str, Any]] = x.iloc[:80].to_dict(orient="records")
    expected = booster.predict(xgb.DMatrix(x.iloc[:80]))
    for row, value in zip(rows, expected, strict=True):
        prediction = model.predict(row)
        assert isinstance(prediction, RegressionPrediction)
        assert prediction.value == pytest.approx(float(value), rel=1e-6)
    reference = booster.predict(xgb.DMatrix(x.iloc[:80]), pred_contribs=True)
    np.testing.assert_allclose(explained(model, rows)[:, 0], reference, atol=1e-4, rtol=1e-6)


def test_multiclass_model_with_labels(tmp_path: Path) -> None:
    x, y = load_wine(return_X_y=True)
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1},
        xgb.DMatrix(x, y),
        30,
    )
    booster.save_model(tmp_path / "wine.json")
    labels = ["barolo", "grignolino", "barbera"]
    schema = init_model_dir(tmp_path / "wine.json", tmp_path / "wine", classes=labels)
    assert schema.task is Task.MULTICLASS
    assert schema.classes == tuple(labels)
    assert schema.feature_names == [f"f{i}" for i in range(13)]
    model = LoadedModel.from_directory(tmp_path / "wine")
    rows = [dict(zip(schema.feature_names, map(float, r), strict=True)) for r in x[::3]]
    probabilities = booster.predict(xgb.DMatrix(x[::3]))
    for row, expected in zip(rows, probabilities, strict=True):
        prediction = model.predict(row)
        assert isinstance(prediction, MulticlassPrediction)
        assert list(prediction.probabilities) == labels
        np.testing.assert_allclose(list(prediction.probabilities.values()), expected, rtol=1e-5)
        assert prediction.label == labels[int(np.argmax(expected))]
    reference = booster.predict(xgb.DMatrix(x[::3]), pred_contribs=True)
    np.testing.assert_allclose(explained(model, rows), reference, atol=1e-5, rtol=0)


def test_multiclass_labels_default_to_class_numbers(tmp_path: Path) -> None:
    x, y = load_wine(return_X_y=True)
    booster = xgb.train(
        {"nthread": 1, "objective": "multi:softmax", "num_class": 3}, xgb.DMatrix(x, y), 2
    )
    booster.save_model(tmp_path / "wine.json")
    schema = init_model_dir(tmp_path / "wine.json", tmp_path / "wine")
    assert schema.classes == ("0", "1", "2")
    with pytest.raises(InvalidModel):
        init_model_dir(tmp_path / "wine.json", tmp_path / "four", classes=["a", "b", "c", "d"])


def categorical_frame() -> tuple[pd.DataFrame, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(3)
    colour = rng.choice(["red", "green", "blue"], size=300)
    size = rng.normal(size=300)
    frame = pd.DataFrame(
        {"colour": pd.Categorical(colour, categories=["red", "green", "blue"]), "size": size}
    )
    y = ((colour == "green") ^ (size > 0.5)).astype(int)
    return frame, y


def test_binary_categories_come_from_the_model_file(tmp_path: Path) -> None:
    frame, y = categorical_frame()
    booster = xgb.train(
        {"objective": "binary:logistic", "nthread": 1},
        xgb.DMatrix(frame, y, enable_categorical=True),
        20,
    )
    booster.save_model(tmp_path / "m.json")
    schema = init_model_dir(tmp_path / "m.json", tmp_path / "shapes", protected=["size"])
    colour, size = schema.features
    assert colour.type is FeatureType.CATEGORICAL
    assert colour.categories == ("red", "green", "blue")
    assert (size.type, size.protected, colour.protected) == (FeatureType.NUMERIC, True, False)
    assert schema.decision is not None
    assert schema.decision.deny_at_or_above == 0.5
    model = LoadedModel.from_directory(tmp_path / "shapes")
    rows: list[dict[str, Any]] = frame.astype(object).to_dict(orient="records")
    expected = booster.predict(xgb.DMatrix(frame, enable_categorical=True))
    for row, probability in zip(rows[:50], expected[:50], strict=True):
        prediction = model.predict(row)
        assert isinstance(prediction, BinaryPrediction)
        assert prediction.probability == pytest.approx(float(probability), rel=1e-6)
    reference = booster.predict(xgb.DMatrix(frame, enable_categorical=True), pred_contribs=True)
    np.testing.assert_allclose(explained(model, rows)[:, 0], reference, atol=1e-5, rtol=0)


def test_categories_the_model_lacks_must_be_given(tmp_path: Path) -> None:
    frame, y = categorical_frame()
    codes = np.column_stack([frame["colour"].cat.codes, frame["size"]]).astype(np.float32)
    booster = xgb.train(
        {"objective": "binary:logistic", "nthread": 1},
        xgb.DMatrix(codes, y, feature_types=["c", "q"], enable_categorical=True),
        5,
    )
    booster.save_model(tmp_path / "codes.json")
    with pytest.raises(InvalidModel, match="does not carry its categories"):
        init_model_dir(tmp_path / "codes.json", tmp_path / "codes")
    schema = init_model_dir(
        tmp_path / "codes.json", tmp_path / "codes", categories={"f0": ["red", "green", "blue"]}
    )
    assert schema.features[0].categories == ("red", "green", "blue")
    model = LoadedModel.from_directory(tmp_path / "codes")
    assert model.encode({"f0": "blue", "f1": 0.0})[0] == 2.0


def test_refusals(tmp_path: Path) -> None:
    frame, y = categorical_frame()
    booster = xgb.train(
        {"nthread": 1, "objective": "rank:pairwise"},
        xgb.DMatrix(frame, y, enable_categorical=True),
        2,
    )
    booster.save_model(tmp_path / "rank.json")
    with pytest.raises(InvalidModel, match="not supported"):
        init_model_dir(tmp_path / "rank.json", tmp_path / "rank")
    (tmp_path / "junk.json").write_text("[]")
    with pytest.raises(InvalidModel, match="not an XGBoost model"):
        init_model_dir(tmp_path / "junk.json", tmp_path / "junk")
    booster = xgb.train(
        {"nthread": 1, "objective": "binary:logistic"},
        xgb.DMatrix(frame, y, enable_categorical=True),
        2,
    )
    booster.save_model(tmp_path / "ok.json")
    with pytest.raises(InvalidModel, match="valid model name"):
        init_model_dir(tmp_path / "ok.json", tmp_path / "ok", name="no spaces")
    with pytest.raises(InvalidModel, match="categories given"):
        init_model_dir(tmp_path / "ok.json", tmp_path / "ok", categories={"colour": ["a", "b"]})
    with pytest.raises(InvalidModel, match="no features named"):
        init_model_dir(tmp_path / "ok.json", tmp_path / "ok", protected=["age"])
    init_model_dir(tmp_path / "ok.json", tmp_path / "ok")
    with pytest.raises(InvalidModel, match="already holds a model"):
        init_model_dir(tmp_path / "ok.json", tmp_path / "ok")


def test_cli_init_prints_the_version(tmp_path: Path) -> None:
    frame, y = categorical_frame()
    booster = xgb.train(
        {"nthread": 1, "objective": "binary:logistic"},
        xgb.DMatrix(frame, y, enable_categorical=True),
        2,
    )
    booster.save_model(tmp_path / "m.ubj")
    runner = CliRunner()
    result = runner.invoke(
        model_app, ["init", str(tmp_path / "m.ubj"), str(tmp_path / "d"), "--name", "shapes"]
    )
    assert result.exit_code == 0, result.output
    version = LoadedModel.from_directory(tmp_path / "d").version
    assert f"model shapes (binary), version {version}" in result.output
    assert f"format xgboost (written by xgboost {xgb.__version__})" in result.output
    again = runner.invoke(model_app, ["init", str(tmp_path / "m.ubj"), str(tmp_path / "d")])
    assert again.exit_code == 1
    assert "already holds a model" in again.output


def test_cli_init_takes_categories_from_a_file(tmp_path: Path) -> None:
    frame, y = categorical_frame()
    codes = np.column_stack([frame["colour"].cat.codes, frame["size"]]).astype(np.float32)
    booster = xgb.train(
        {"nthread": 1, "objective": "binary:logistic"},
        xgb.DMatrix(codes, y, feature_types=["c", "q"], enable_categorical=True),
        2,
    )
    booster.save_model(tmp_path / "codes.json")
    (tmp_path / "cats.json").write_text('{"f0": ["red", "green", "blue"]}')
    runner = CliRunner()
    args = ["init", str(tmp_path / "codes.json"), str(tmp_path / "codes")]
    missing = runner.invoke(model_app, args)
    assert missing.exit_code == 1
    assert "--categories" in missing.output
    given = runner.invoke(model_app, [*args, "--categories", str(tmp_path / "cats.json")])
    assert given.exit_code == 0, given.output
    schema = LoadedModel.from_directory(tmp_path / "codes").schema
    assert schema.features[0].categories == ("red", "green", "blue")


def test_cli_init_names_a_file_that_is_no_model(tmp_path: Path) -> None:
    """An empty file made xgboost abort `model init` (exit 134); now one line, exit 1."""
    shapstream = str(Path(sys.executable).with_name("shapstream"))
    cases = {
        "empty.json": (b"", "is empty (0 bytes), not an XGBoost model"),
        "model.pkl": (pickle.dumps([1, 2]), "is a Python pickle"),
        "garbage.ubj": (b"{L\x00\x00\x00\x05learn", "is truncated UBJSON"),
    }
    for name, (content, said) in cases.items():
        (tmp_path / name).write_bytes(content)
        done = subprocess.run(
            [shapstream, "model", "init", str(tmp_path / name), str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, (name, done.returncode, done.stderr)
        assert done.stderr.startswith(f"error: {tmp_path / name} {said}"), done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert not (tmp_path / "out").exists()


def test_cli_init_says_a_second_model_needs_a_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame, y = categorical_frame()
    booster = xgb.train(
        {"nthread": 1, "objective": "binary:logistic"},
        xgb.DMatrix(frame, y, enable_categorical=True),
        2,
    )
    booster.save_model(tmp_path / "m.json")
    monkeypatch.delenv("SHAPSTREAM_DEFAULT_MODEL", raising=False)
    runner = CliRunner()
    models = tmp_path / "models"
    first = runner.invoke(model_app, ["init", str(tmp_path / "m.json"), str(models / "a")])
    assert first.exit_code == 0, first.output
    assert "SHAPSTREAM_DEFAULT_MODEL" not in first.output
    second = runner.invoke(model_app, ["init", str(tmp_path / "m.json"), str(models / "b")])
    assert second.exit_code == 0, second.output
    assert f"note: {models} now holds 2 models" in second.output
    assert "SHAPSTREAM_DEFAULT_MODEL" in second.output
