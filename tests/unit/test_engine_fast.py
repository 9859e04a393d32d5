"""shapstream's FastTreeShap against xgboost's own exact TreeSHAP (pred_contribs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from service.core.engine.base import Engine
from service.core.engine.fast import FastTreeShap
from service.core.formats.base import Forest, UnsupportedModel
from service.core.formats.xgboost import forest_from_json

TOLERANCE = 1e-5
GERMAN_CREDIT = Path(__file__).resolve().parents[2] / "data" / "german_credit.csv"


@dataclass(frozen=True)
class Case:
    objective: str
    n_classes: int
    depth: int
    trees: int
    n_features: int
    n_rows: int
    missing: float
    cat_features: tuple[int, ...]
    n_categories: int
    onehot: int
    min_child_weight: float
    dmax: int
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    objective = draw(
        st.sampled_from(
            ["binary:logistic", "binary:logitraw", "reg:squarederror", "multi:softprob"]
        )
    )
    n_features = draw(st.integers(1, 8))
    n_cat = draw(st.integers(0, min(2, n_features)))
    return Case(
        objective=objective,
        n_classes=draw(st.integers(3, 4)) if objective == "multi:softprob" else 1,
        depth=draw(st.integers(1, 10)),
        trees=draw(st.integers(1, 6)),
        n_features=n_features,
        n_rows=draw(st.integers(20, 160)),
        missing=draw(st.sampled_from([0.0, 0.05, 0.3])),
        cat_features=tuple(range(n_cat)),
        n_categories=draw(st.integers(2, 12)),
        onehot=draw(st.sampled_from([1, 4, 16])),
        min_child_weight=draw(st.sampled_from([0.0, 0.5, 1.0])),
        dmax=draw(st.sampled_from([12, 12, 3, 0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _data(case: Case, rng: np.random.Generator, n: int) -> NDArray[np.float32]:
    x = rng.normal(size=(n, case.n_features)).astype(np.float32)
    for j in case.cat_features:
        x[:, j] = rng.integers(0, case.n_categories, n)
    x[rng.random(x.shape) < case.missing] = np.nan
    return x


def _train(case: Case) -> tuple[xgb.Booster, list[str], NDArray[np.float32]]:
    rng = np.random.default_rng(case.seed)
    x = _data(case, rng, case.n_rows)
    z = np.nan_to_num(x, nan=0.5)
    signal = z @ rng.normal(size=case.n_features) + np.sin(3 * z[:, 0])
    y: NDArray[Any]
    if case.objective.startswith("binary:"):
        y = (signal + rng.normal(size=case.n_rows) > 0).astype(np.float32)
    elif case.objective == "multi:softprob":
        y = np.digitize(signal, np.quantile(signal, np.linspace(0, 1, case.n_classes + 1)[1:-1]))
        y[: case.n_classes] = np.arange(case.n_classes)  # every class present
    else:
        y = signal + 0.3 * rng.normal(size=case.n_rows)
    types = ["c" if j in case.cat_features else "q" for j in range(case.n_features)]
    params: dict[str, Any] = {
        "objective": case.objective,
        "max_depth": case.depth,
        "min_child_weight": case.min_child_weight,
        "max_cat_to_onehot": case.onehot,
        "eta": 0.3,
        "nthread": 1,
        "seed": case.seed % 10_000,
    }
    if case.objective == "multi:softprob":
        params["num_class"] = case.n_classes
    dtrain = xgb.DMatrix(x, label=y, feature_types=types, enable_categorical=True)
    booster = xgb.train(params, dtrain, num_boost_round=case.trees)
    probe = _data(case, rng, 60)
    for j in case.cat_features:  # unseen categories too
        probe[::7, j] = case.n_categories + 3
        probe[3::11, j] = 40.0
    return booster, types, np.ascontiguousarray(np.vstack([x, probe]))


def _forest(booster: xgb.Booster) -> Forest:
    return forest_from_json(json.loads(bytes(booster.save_raw("json"))))


def _engine(booster: xgb.Booster, dmax: int = 12) -> FastTreeShap:
    return FastTreeShap(_forest(booster), dmax=dmax)


def _pred_contribs(
    booster: xgb.Booster, x: NDArray[np.float32], types: list[str] | None
) -> NDArray[np.float64]:
    dm = xgb.DMatrix(x, missing=np.nan, feature_types=types, enable_categorical=True)
    phi = booster.predict(dm, pred_contribs=True, validate_features=False)
    return np.asarray(phi, dtype=np.float64).reshape(len(x), -1, x.shape[1] + 1)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(case=cases())
def test_matches_pred_contribs(case: Case) -> None:
    booster, types, x = _train(case)
    engine = _engine(booster, dmax=case.dmax)
    ours = engine.contributions(x)
    theirs = _pred_contribs(booster, x, types)
    assert ours.shape == theirs.shape == (len(x), case.n_classes, case.n_features + 1)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


def test_is_an_engine_and_batches_are_independent() -> None:
    case = Case("binary:logistic", 1, 6, 20, 6, 300, 0.1, (1,), 5, 1, 1.0, 12, 7)
    booster, _, x = _train(case)
    engine: Engine = _engine(booster)
    assert engine.name == "shapstream"
    whole = engine.contributions(x)
    one_by_one = np.concatenate([engine.contributions(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(whole, one_by_one)
    assert engine.contributions(x[:0]).shape == (0, 1, 7)
    strided = np.asfortranarray(x)
    np.testing.assert_array_equal(engine.contributions(strided), whole)


def test_expected_value_and_additivity() -> None:
    case = Case("multi:softprob", 3, 4, 5, 5, 150, 0.1, (), 2, 1, 1.0, 12, 3)
    booster, _, x = _train(case)
    engine = _engine(booster)
    phi = engine.contributions(x)
    np.testing.assert_allclose(phi[:, :, -1], np.broadcast_to(engine.expected_value, (len(x), 3)))
    margin = booster.predict(xgb.DMatrix(x, missing=np.nan), output_margin=True)
    np.testing.assert_allclose(phi.sum(axis=2), margin, atol=TOLERANCE)
    assert engine.stats.leaves > 0
    assert engine.stats.memory_bytes > 0


def test_rejects_wrong_width() -> None:
    case = Case("reg:squarederror", 1, 3, 2, 4, 50, 0.0, (), 2, 1, 1.0, 12, 1)
    booster, _, _ = _train(case)
    engine = _engine(booster)
    with pytest.raises(ValueError, match="shape"):
        engine.contributions(np.zeros((3, 5), dtype=np.float32))


@pytest.mark.parametrize(
    "params",
    [
        {"booster": "gblinear"},
        {"booster": "dart", "rate_drop": 0.1, "max_depth": 3},
        {"multi_strategy": "multi_output_tree", "max_depth": 3, "num_target": 2},
    ],
    ids=["gblinear", "dart", "multi_output_tree"],
)
def test_unsupported_models_raise(params: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3)).astype(np.float32)
    y: NDArray[np.float64] = x[:, 0] + rng.normal(size=80)
    if "num_target" in params:
        params = {k: v for k, v in params.items() if k != "num_target"}
        y = np.column_stack([y, -y])
    booster = xgb.train({"nthread": 1, **params}, xgb.DMatrix(x, y), 3)
    with pytest.raises(UnsupportedModel):
        _engine(booster)


def test_rejects_garbage() -> None:
    with pytest.raises(UnsupportedModel):
        forest_from_json({"learner": []})


# ----------------------------------------------------------------- German credit data


def _german() -> tuple[Any, NDArray[np.float32], list[str], NDArray[np.float32]]:
    frame = pd.read_csv(GERMAN_CREDIT)
    y = (frame.pop("creditability") == "good").to_numpy(dtype=np.float32)
    rng = np.random.default_rng(42)
    for col in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[col]):
            frame[col] = frame[col].astype("category")  # pandas 3 reads text as str
        else:
            frame[col] = frame[col].astype("float32")
        frame.loc[rng.random(len(frame)) < 0.05, col] = np.nan  # injected missing values
    types = ["c" if isinstance(frame[c].dtype, pd.CategoricalDtype) else "q" for c in frame]
    assert types.count("c") == 13
    columns = []
    for col in frame.columns:
        if isinstance(frame[col].dtype, pd.CategoricalDtype):
            codes = frame[col].cat.codes.to_numpy().astype(np.float32)
            codes[codes < 0] = np.nan
            columns.append(codes)
        else:
            columns.append(frame[col].to_numpy(dtype=np.float32))
    x = np.ascontiguousarray(np.column_stack(columns), dtype=np.float32)
    return frame, x, types, y


@pytest.mark.parametrize(
    ("depth", "trees", "onehot"), [(3, 60, 1), (6, 40, 4), (8, 25, 64)], ids=str
)
def test_german_credit(depth: int, trees: int, onehot: int) -> None:
    frame, x, types, y = _german()
    params = {
        "objective": "binary:logistic",
        "max_depth": depth,
        "max_cat_to_onehot": onehot,
        "nthread": 1,
        "eta": 0.1,
    }
    booster = xgb.train(params, xgb.DMatrix(frame, label=y, enable_categorical=True), trees)
    engine = _engine(booster)
    ours = engine.contributions(x)
    theirs = _pred_contribs(booster, x, types)
    assert ours.shape == (len(x), 1, 21)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    # the same attributions as explaining the categorical frame itself
    direct = booster.predict(xgb.DMatrix(frame, enable_categorical=True), pred_contribs=True)
    np.testing.assert_allclose(ours[:, 0, :], direct, rtol=0, atol=TOLERANCE)
    assert np.isnan(x).any()


# ------------------------------------------- brute force on hand-edited trees (zero covers)


def _brute_force(model: dict[str, Any], x: NDArray[np.float32]) -> NDArray[np.float64]:
    """Shapley values of the path-dependent conditional expectation, by enumeration."""
    from itertools import combinations
    from math import factorial

    trees = model["learner"]["gradient_booster"]["model"]["trees"]
    n = x.shape[1]

    def expect(t: dict[str, Any], row: NDArray[np.float32], subset: set[int], node: int) -> float:
        left, right = int(t["left_children"][node]), int(t["right_children"][node])
        if left < 0:
            return float(np.float32(t["split_conditions"][node]))
        f = t["split_indices"][node]
        if f in subset:
            v = row[f]
            if np.isnan(v):
                go_left = bool(t["default_left"][node])
            else:
                go_left = bool(v < np.float32(t["split_conditions"][node]))
            return expect(t, row, subset, left if go_left else right)
        cover = [float(c) for c in t["sum_hessian"]]
        return (
            cover[left] * expect(t, row, subset, left)
            + cover[right] * expect(t, row, subset, right)
        ) / cover[node]

    out = np.zeros((len(x), n + 1))
    for r, row in enumerate(x):
        for t in trees:
            out[r, n] += expect(t, row, set(), 0)
            for i in range(n):
                others = [j for j in range(n) if j != i]
                for k in range(n):
                    w = factorial(k) * factorial(n - k - 1) / factorial(n)
                    for s in combinations(others, k):
                        subset = set(s)
                        gain = expect(t, row, subset | {i}, 0) - expect(t, row, subset, 0)
                        out[r, i] += w * gain
    return out


def test_zero_and_tiny_covers_match_brute_force() -> None:
    case = Case("reg:squarederror", 1, 4, 2, 4, 200, 0.1, (), 2, 1, 1.0, 12, 11)
    booster, _, x = _train(case)
    model = json.loads(bytes(booster.save_raw("json")))
    for t in model["learner"]["gradient_booster"]["model"]["trees"]:
        leaves = [i for i, c in enumerate(t["left_children"]) if c < 0]
        t["sum_hessian"][leaves[0]] = 0.0  # an empty leaf: zero fraction 0
        t["sum_hessian"][leaves[-1]] = 1e-15  # and a nearly empty one
    rows = x[:12]
    expected = _brute_force(model, rows) + np.array([0.0] * 4 + [_base(model)])
    for dmax in (12, 0):
        got = FastTreeShap(forest_from_json(model), dmax=dmax).contributions(rows)[:, 0, :]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def _base(model: dict[str, Any]) -> float:
    """The intercept as xgboost adds it: the stored base_score in float32."""
    text = str(model["learner"]["learner_model_param"]["base_score"])
    return float(np.float32(text.strip("[]")))


def test_deep_trees_with_many_features() -> None:
    case = Case("reg:squarederror", 1, 10, 3, 12, 3000, 0.05, (3,), 9, 1, 0.0, 12, 5)
    booster, types, x = _train(case)
    for dmax in (12, 5):
        engine = _engine(booster, dmax=dmax)
        assert engine.stats.leaves > 300
        theirs = _pred_contribs(booster, x, types)
        np.testing.assert_allclose(engine.contributions(x), theirs, rtol=0, atol=TOLERANCE)


def test_vector_and_scalar_kernels_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    case = Case("multi:softprob", 3, 7, 6, 9, 400, 0.1, (0, 4), 11, 4, 0.0, 12, 21)
    booster, _, x = _train(case)
    for dmax in (12, 2):
        engine = _engine(booster, dmax=dmax)
        vector = engine.contributions(x)
        monkeypatch.setenv("SHAPSTREAM_NO_SIMD", "1")
        scalar = engine.contributions(x)
        monkeypatch.delenv("SHAPSTREAM_NO_SIMD")
        np.testing.assert_array_equal(vector, scalar)
