"""The native margin predictor against xgboost's own inplace_predict, bit for bit."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from service.core.engine.fast import FastPredictor
from service.core.formats import xgboost as xgboost_format
from service.core.formats.base import Forest, InvalidModel, UnsupportedModel
from service.core.formats.xgboost import forest_from_json
from service.core.registry import LoadedModel
from service.core.schema import DecisionRule, Feature, FeatureType, ModelSchema, Task
from tests.api_client import MODELS, german_rows

DEMO_DIR = MODELS / "german-credit"
REGISTRY_LOGGER = "service.core.registry"

_LOGISTIC = ("binary:logistic", "reg:logistic")
_LOG_LINK = ("count:poisson", "reg:gamma", "reg:tweedie")
_MULTICLASS = ("multi:softprob", "multi:softmax")
OBJECTIVES = (
    *_LOGISTIC,
    *_LOG_LINK,
    *_MULTICLASS,
    "binary:logitraw",
    "reg:squarederror",
    "reg:absoluteerror",
    "reg:pseudohubererror",
)


def xgb_margins(booster: xgb.Booster, x: NDArray[np.float32]) -> NDArray[np.float32]:
    margins = booster.inplace_predict(
        x, predict_type="margin", strict_shape=True, validate_features=False
    )
    return np.asarray(margins, dtype=np.float32).reshape(len(x), -1)


def forest_of(booster: xgb.Booster) -> Forest:
    return forest_from_json(json.loads(bytes(booster.save_raw("json"))))


def framework_margins(model: LoadedModel, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """xgboost's own margins (float32 values) through the model's format."""
    return model.framework.predict_margins(x).astype(np.float32)


def assert_bitwise_equal(ours: NDArray[np.float64], theirs: NDArray[np.float32]) -> None:
    assert ours.dtype == np.float64
    ours32 = ours.astype(np.float32)
    np.testing.assert_array_equal(ours32.astype(np.float64), ours)  # float32 values
    assert ours32.shape == theirs.shape
    # Same bits (tells -0.0 from 0.0 and NaN payloads apart), and equal as numbers.
    assert np.array_equal(ours32.view(np.uint32), theirs.view(np.uint32))
    assert np.array_equal(ours32, theirs, equal_nan=True)


# ----------------------------------------------------------------- random models


@dataclass(frozen=True)
class Case:
    objective: str
    n_classes: int
    depth: int
    trees: int
    n_features: int
    n_rows: int
    missing: float
    n_cat: int
    n_categories: int
    onehot: int
    eta: float
    base_score: float | None
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    objective = draw(st.sampled_from(OBJECTIVES))
    n_features = draw(st.integers(1, 7))
    base_score: float | None = None
    if draw(st.booleans()):
        if objective in _LOGISTIC:  # a probability, the edges clipped by xgboost
            unit = st.floats(0.0, 1.0, allow_subnormal=False)
            base_score = draw(st.one_of(st.sampled_from([0.0, 1e-9, 0.5, 1.0 - 1e-9, 1.0]), unit))
        elif objective in _LOG_LINK:
            base_score = draw(st.floats(1e-3, 100.0))
        else:
            base_score = draw(st.floats(-20.0, 20.0, allow_subnormal=False))
    return Case(
        objective=objective,
        n_classes=draw(st.sampled_from([3, 4, 10])) if objective in _MULTICLASS else 1,
        depth=draw(st.integers(1, 10)),
        trees=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 9, 13])),
        n_features=n_features,
        n_rows=draw(st.integers(20, 200)),
        missing=draw(st.sampled_from([0.0, 0.05, 0.3])),
        n_cat=draw(st.integers(0, min(2, n_features))),
        n_categories=draw(st.integers(2, 40)),
        onehot=draw(st.sampled_from([1, 4, 64])),
        eta=draw(st.sampled_from([0.1, 0.3, 0.8])),
        base_score=base_score,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _data(case: Case, rng: np.random.Generator, n: int) -> NDArray[np.float32]:
    x = rng.normal(size=(n, case.n_features)).astype(np.float32)
    for j in range(case.n_cat):
        x[:, j] = rng.integers(0, case.n_categories, n)
    x[rng.random(x.shape) < case.missing] = np.nan
    return x


def _labels(case: Case, x: NDArray[np.float32], rng: np.random.Generator) -> NDArray[Any]:
    z = np.nan_to_num(x, nan=0.5)
    signal = z @ rng.normal(size=case.n_features) / 2 + np.sin(3 * z[:, -1])
    if case.objective in _MULTICLASS:
        cuts = np.quantile(signal, np.linspace(0, 1, case.n_classes + 1)[1:-1])
        y = np.digitize(signal, cuts)
        y[: case.n_classes] = np.arange(case.n_classes)  # every class present
        return y
    if case.objective in ("binary:logistic", "binary:logitraw"):
        return (signal + rng.normal(size=len(x)) > 0).astype(np.float32)
    if case.objective == "reg:logistic":
        return 1.0 / (1.0 + np.exp(-signal))
    if case.objective in _LOG_LINK:
        return np.exp(signal / 2) + 0.01
    return signal + 0.3 * rng.normal(size=len(x))


def _train(case: Case) -> tuple[xgb.Booster, NDArray[np.float32]]:
    rng = np.random.default_rng(case.seed)
    x = _data(case, rng, case.n_rows)
    types = ["c" if j < case.n_cat else "q" for j in range(case.n_features)]
    params: dict[str, Any] = {
        "objective": case.objective,
        "max_depth": case.depth,
        "min_child_weight": 0.0,
        "max_cat_to_onehot": case.onehot,
        "eta": case.eta,
        "nthread": 1,
        "seed": case.seed % 10_000,
    }
    if case.objective in _MULTICLASS:
        params["num_class"] = case.n_classes
    if case.base_score is not None:
        params["base_score"] = case.base_score
    dtrain = xgb.DMatrix(
        x, label=_labels(case, x, rng), feature_types=types, enable_categorical=True
    )
    trained = xgb.train(params, dtrain, num_boost_round=case.trees)
    # As the registry loads it: from the saved bytes, one thread.
    booster = xgb.Booster(model_file=bytearray(trained.save_raw("json")))
    booster.set_param({"nthread": 1})
    probe = _data(case, rng, 80)
    for j in range(case.n_cat):  # unseen, invalid and fractional categories
        k = case.n_categories
        for start, value in enumerate([k, k + 3, 40, -1, 2.5, 1e7, 2.0**24, np.inf, -0.0]):
            probe[start::9, j] = value
    probe[5::13, case.n_cat :] = np.inf
    probe[6::13, case.n_cat :] = -np.inf
    probe[7::17, :] = np.nan
    return booster, np.ascontiguousarray(np.vstack([x, probe]))


def _on_the_splits(native: FastPredictor, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Rows whose numerical values sit exactly on, just below and just above a split."""
    rows = np.repeat(x[:1], 3 * 8, axis=0)
    for j in range(x.shape[1]):
        splits = native.split_values(j)[:8].astype(np.float32)  # xgboost's are float32
        if len(splits) == 0:
            continue
        below = np.nextafter(splits, np.float32(-np.inf))
        above = np.nextafter(splits, np.float32(np.inf))
        column = np.concatenate([splits, below, above])
        rows[: len(column), j] = column
    return rows


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(case=cases())
def test_margins_are_bitwise_equal_to_inplace_predict(case: Case) -> None:
    booster, x = _train(case)
    native = FastPredictor(forest_of(booster))
    assert native.n_outputs == case.n_classes
    x = np.vstack([x, _on_the_splits(native, x)])
    expected = xgb_margins(booster, x)
    assert_bitwise_equal(native.predict_margins(x), expected)
    # Row blocks and single rows give the same bits.
    for i in (0, 1, 63, 64, len(x) - 1):
        assert_bitwise_equal(native.predict_margins(x[i : i + 1]), expected[i : i + 1])
    assert native.mismatch(expected.astype(np.float64), x) is None


def test_intercept_is_xgboosts_margin() -> None:
    x = np.zeros((2, 2), dtype=np.float32)
    y = np.array([0.0, 1.0], dtype=np.float32)
    for objective, scores in (
        ("binary:logistic", [0.0, 1e-7, 0.1, 0.3, 0.5, 0.77, 1.0 - 1e-7, 1.0]),
        ("count:poisson", [1e-3, 0.3, 1.0, 2.5, 1e4]),
        ("reg:squarederror", [-3.25, 0.0, 7.1]),
        ("binary:logitraw", [0.3, 2.0]),
    ):
        for score in scores:
            params = {"objective": objective, "base_score": score, "nthread": 1}
            booster = xgb.train(params, xgb.DMatrix(x, y), 0)
            forest = forest_of(booster)
            native = FastPredictor(forest)
            assert_bitwise_equal(native.predict_margins(x), xgb_margins(booster, x))
            assert_bitwise_equal(forest.base[None, :], xgb_margins(booster, x)[:1])


def test_unfitted_intercept_is_not_linked() -> None:
    # No trees and no base_score given: xgboost keeps its 0.5 placeholder unlinked.
    x = np.zeros((1, 1), dtype=np.float32)
    booster = xgb.train({"objective": "count:poisson"}, xgb.DMatrix(x, [1.0]), 0)
    native = FastPredictor(forest_of(booster))
    assert_bitwise_equal(native.predict_margins(x), np.array([[0.5]], dtype=np.float32))
    assert_bitwise_equal(native.predict_margins(x), xgb_margins(booster, x))


def test_input_layouts() -> None:
    case = Case("multi:softprob", 3, 4, 9, 5, 150, 0.1, 1, 6, 1, 0.3, None, 11)
    booster, x = _train(case)
    native = FastPredictor(forest_of(booster))
    expected = xgb_margins(booster, x)
    assert_bitwise_equal(native.predict_margins(np.asfortranarray(x)), expected)
    assert_bitwise_equal(native.predict_margins(x[::2]), expected[::2])
    assert native.predict_margins(x[:0]).shape == (0, 3)
    with pytest.raises(TypeError):
        native.predict_margins(x.astype(np.float64))
    with pytest.raises(TypeError):
        native.predict_margins(x[:, :4].copy())
    with pytest.raises(TypeError):
        native.predict_margins(x[0])


# ----------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return LoadedModel.from_directory(DEMO_DIR)


def test_demo_model_every_row(demo: LoadedModel) -> None:
    assert demo.native is not None
    rows = german_rows()
    x = demo.encode_many(rows)
    assert len(x) == 1000
    expected = framework_margins(demo, x)
    assert_bitwise_equal(demo.predict_margins(x), expected)
    for i in range(len(x)):
        one = demo.encode(rows[i]).reshape(1, -1)
        assert_bitwise_equal(demo.predict_margins(one), expected[i : i + 1])


def test_demo_model_with_nulls(demo: LoadedModel) -> None:
    rng = np.random.default_rng(3)
    nullable = [f.name for f in demo.schema.features if f.nullable]
    assert nullable
    rows = german_rows()
    for row in rows:
        for name in nullable:
            if rng.random() < 0.3:
                row[name] = None
    x = demo.encode_many(rows)
    assert np.isnan(x).any()
    assert_bitwise_equal(demo.predict_margins(x), framework_margins(demo, x))


def test_other_dtypes_go_to_xgboost(demo: LoadedModel) -> None:
    x = demo.encode_many(german_rows(50))
    expected = framework_margins(demo, x)
    assert_bitwise_equal(demo.predict_margins(x.astype(np.float64)), expected)
    assert_bitwise_equal(demo.predict_margins(np.asfortranarray(x)), expected)


# ----------------------------------------------------------------- fallback


def _small_booster(params: dict[str, Any], rounds: int = 3) -> xgb.Booster:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3)).astype(np.float32)
    y: NDArray[Any] = (x[:, 0] + rng.normal(size=80) > 0).astype(np.float32)
    if params.get("multi_strategy"):
        y = np.column_stack([y, 1 - y])
    return xgb.train({"nthread": 1, **params}, xgb.DMatrix(x, y), rounds)


@pytest.mark.parametrize(
    "params",
    [
        {"booster": "gblinear", "objective": "binary:logistic"},
        {"booster": "dart", "rate_drop": 0.3, "max_depth": 3, "objective": "binary:logistic"},
        {"multi_strategy": "multi_output_tree", "tree_method": "hist", "max_depth": 3},
        {"multi_strategy": "one_output_per_tree", "max_depth": 3},
        {"objective": "binary:hinge"},
    ],
    ids=["gblinear", "dart", "multi_output_tree", "multi_target", "hinge"],
)
def test_unsupported_models_raise(params: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModel):
        FastPredictor(forest_of(_small_booster(params)))


def test_rejects_garbage() -> None:
    with pytest.raises(UnsupportedModel):
        forest_from_json({"learner": []})


def _binary_schema(n_features: int) -> ModelSchema:
    features = tuple(Feature(name=f"f{i}", type=FeatureType.NUMERIC) for i in range(n_features))
    return ModelSchema(name="m", task=Task.BINARY, features=features, decision=DecisionRule())


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"booster": "dart", "rate_drop": 0.3, "max_depth": 3}, "dart"),
        ({"booster": "gblinear"}, "gblinear"),  # xgboost has no inplace_predict for it either
    ],
    ids=["dart", "gblinear"],
)
def test_registry_falls_back_for_unsupported_boosters(
    params: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    booster = _small_booster({"objective": "binary:logistic", **params}, rounds=6)
    if reason == "gblinear":
        # Refused at load: xgboost cannot score it in place, so no request could be served.
        with pytest.raises(InvalidModel, match="Inplace predict is not supported"):
            LoadedModel(_binary_schema(3), bytes(booster.save_raw("json")))
        return
    with caplog.at_level(logging.INFO, logger=REGISTRY_LOGGER):
        model = LoadedModel(_binary_schema(3), bytes(booster.save_raw("json")))
    assert model.native is None
    notes = [r for r in caplog.records if r.name == REGISTRY_LOGGER]
    assert len(notes) == 1
    assert notes[0].levelno == logging.WARNING
    assert reason in notes[0].getMessage()
    x = np.random.default_rng(1).normal(size=(30, 3)).astype(np.float32)
    x[::4, 1] = np.nan
    margins = model.predict_margins(x)
    assert margins.dtype == np.float64
    assert margins.shape == (30, 1)
    assert_bitwise_equal(margins, framework_margins(model, x))
    assert_bitwise_equal(model.predict_margins(x[:1]), framework_margins(model, x[:1]))


def test_registry_falls_back_when_bits_differ(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A wrong intercept link makes every margin differ: the load-time check must notice.
    monkeypatch.setattr(
        xgboost_format, "intercept_margin", lambda objective, score: float(np.float32(score))
    )
    with caplog.at_level(logging.INFO, logger=REGISTRY_LOGGER):
        model = LoadedModel.from_directory(DEMO_DIR)
    assert model.native is None
    notes = [r.getMessage() for r in caplog.records if r.name == REGISTRY_LOGGER]
    assert len(notes) == 1
    assert "differ" in notes[0]
    x = model.encode_many(german_rows(20))
    assert_bitwise_equal(model.predict_margins(x), framework_margins(model, x))


def test_registry_logs_the_native_path_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=REGISTRY_LOGGER):
        model = LoadedModel.from_directory(DEMO_DIR)
        model.predict_margins(model.encode_many(german_rows(5)))
    assert model.native is not None
    notes = [r.getMessage() for r in caplog.records if r.name == REGISTRY_LOGGER]
    assert len(notes) == 1
    assert "native" in notes[0]


def test_probe_covers_every_category(demo: LoadedModel) -> None:
    from service.core.registry import _probe_rows

    assert demo.native is not None
    x = _probe_rows(demo.schema, demo.native)
    assert 300 <= len(x) <= 4096
    assert np.isnan(x).any()
    for j, feature in enumerate(demo.schema.features):
        if feature.type is FeatureType.CATEGORICAL:
            codes = set(np.unique(x[:, j][~np.isnan(x[:, j])]).tolist())
            assert set(range(len(feature.categories))) <= codes
            assert len(feature.categories) in codes  # an unseen one too
        else:  # split conditions (a few masked by the NaNs)
            splits = set(demo.native.split_values(j).tolist())
            assert len(splits & set(x[:, j].tolist())) >= 0.8 * len(splits)
