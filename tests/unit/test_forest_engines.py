"""The native engines on any Forest, against tests/forest_reference.py.

Margins bit for bit and TreeSHAP within 1e-9, on hand-made and generated forests: every
NodeFlag combination, categorical sets, NaN / zero / negative / huge inputs, float32 and
float64 accumulation, divisors, several outputs, children in any order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from service.core.engine.fast import FastPredictor, FastTreeShap
from service.core.formats.base import Accumulation, Forest, NodeFlag, UnsupportedModel
from service.core.formats.xgboost import forest_from_json
from tests import forest_reference as reference

SHAP_TOLERANCE = 1e-9
F32_MAX = float(np.finfo(np.float32).max)
INF = float("inf")
CATEGORICAL = int(NodeFlag.CATEGORICAL)

# Thresholds a format may hand over: float32 values, doubles between float32 values, zeros,
# the ZERO_MISSING bound, subnormals, values past float32's range, infinities, NaN.
THRESHOLDS = (
    0.0,
    -0.0,
    0.5,
    -1.5,
    2.0,
    0.1,
    float(np.float32(0.1)),
    1e-35,
    -1e-35,
    1e-45,
    5e-324,
    31.5,
    1e300,
    -1e300,
    INF,
    -INF,
    F32_MAX,
    -F32_MAX,
    float(np.nextafter(F32_MAX, INF)),
    float("nan"),
)
# Inputs every test row mixes in: NaN, signed zeros, both sides of 1e-35, subnormals, category
# codes (in, past and across 32-bit words), invalid codes, fractions, huge values.
SPECIAL_INPUTS = np.array(
    [
        np.nan,
        0.0,
        -0.0,
        1e-35,
        -1e-35,
        np.nextafter(np.float32(1e-35), np.float32(1)),
        np.nextafter(np.float32(1e-35), np.float32(0)),
        -np.nextafter(np.float32(1e-35), np.float32(1)),
        1e-45,
        -1e-45,
        1.0,
        2.0,
        5.0,
        31.0,
        32.0,
        33.0,
        63.0,
        64.0,
        95.0,
        96.0,
        1000.0,
        2.0**24 - 1,
        2.0**24,
        2.0**24 + 2,
        -1.0,
        -0.5,
        0.5,
        2.5,
        31.99,
        np.inf,
        -np.inf,
        F32_MAX,
        -F32_MAX,
        1e30,
        -3.0,
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Node:
    """One node of a hand-made tree; children are indices within the tree, -1 for a leaf."""

    left: int = -1
    right: int = -1
    feature: int = 0
    threshold: float = 0.0
    flags: int = 0
    words: tuple[int, ...] = ()
    value: float = 0.0
    cover: float = 1.0


def make_forest(
    trees: Sequence[Sequence[Node]],
    *,
    n_features: int,
    n_outputs: int = 1,
    outputs: Sequence[int] | None = None,
    base: Sequence[float] | None = None,
    accumulation: Accumulation = Accumulation.FLOAT64,
    divisor: float = 1.0,
) -> Forest:
    nodes = [node for tree in trees for node in tree]
    words = [node.words if node.flags & CATEGORICAL else () for node in nodes]
    return Forest(
        n_features=n_features,
        n_outputs=n_outputs,
        tree_ptr=np.cumsum([0, *(len(t) for t in trees)]).astype(np.int64),
        tree_output=np.array(outputs if outputs is not None else [0] * len(trees), np.int32),
        left=np.array([n.left for n in nodes], np.int32),
        right=np.array([n.right for n in nodes], np.int32),
        feature=np.array([n.feature for n in nodes], np.int32),
        threshold=np.array([n.threshold for n in nodes], np.float64),
        flags=np.array([n.flags for n in nodes], np.uint8),
        cat_ptr=np.cumsum([0, *(len(w) for w in words)]).astype(np.int64),
        cat_words=np.array([w for ws in words for w in ws], np.uint32),
        value=np.array([n.value for n in nodes], np.float64),
        cover=np.array([n.cover for n in nodes], np.float64),
        base=np.array(base if base is not None else [0.0] * n_outputs, np.float64),
        accumulation=accumulation,
        divisor=divisor,
    )


def expected_shap(forest: Forest, x: NDArray[np.float32]) -> NDArray[np.float64]:
    """forest_reference.shap: its attributions sum to the documented margin,
    (base + leaves) / divisor."""
    return reference.shap(forest, x)


def assert_same_bits(ours: NDArray[np.float64], theirs: NDArray[np.float64]) -> None:
    assert ours.dtype == theirs.dtype == np.float64
    assert ours.shape == theirs.shape
    differ = np.argwhere(ours.view(np.uint64) != theirs.view(np.uint64))
    assert len(differ) == 0, f"{len(differ)} differ, first at {differ[0]}: " + (
        f"{ours[tuple(differ[0])]!r} != {theirs[tuple(differ[0])]!r}"
    )


def check(forest: Forest, x: NDArray[np.float32], shap_rows: int = 6) -> None:
    """Margins bit for bit, then TreeSHAP (tables, some direct leaves, all direct)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    predictor = FastPredictor(forest)
    theirs = reference.margins(forest, x)
    assert_same_bits(predictor.predict_margins(x), theirs)
    assert predictor.mismatch(theirs, x) is None
    rows = x[:shap_rows]
    expected = expected_shap(forest, rows)
    for dmax in (12, 2, 0):
        got = FastTreeShap(forest, dmax=dmax).contributions(rows)
        np.testing.assert_allclose(got, expected, rtol=0, atol=SHAP_TOLERANCE)
    if forest.accumulation is Accumulation.FLOAT64:  # attributions add up to the margin
        scale = 1.0 + np.abs(theirs[:shap_rows])
        np.testing.assert_array_less(np.abs(got.sum(axis=2) - theirs[:shap_rows]), 1e-9 * scale)


def input_pool(forest: Forest) -> NDArray[np.float32]:
    """The special inputs plus every threshold's float32 rounding and neighbours."""
    with np.errstate(over="ignore", under="ignore"):  # past float32's range, subnormals
        t = np.unique(forest.threshold[np.isfinite(forest.threshold)].astype(np.float32))
        near = [t, np.nextafter(t, np.float32(-np.inf)), np.nextafter(t, np.float32(np.inf))]
    return np.concatenate([SPECIAL_INPUTS, *near])


# ----------------------------------------------------------------- every flag combination


def _stump(flags: int, threshold: float, left: float, right: float) -> list[Node]:
    # The set {0, 2, 5, 31, 33, 64}, three words: codes past 95 are past the bit field.
    words = ((1 << 0) | (1 << 2) | (1 << 5) | (1 << 31), 1 << 1, 1)
    return [
        Node(1, 2, 0, threshold, flags, words, cover=4.0),
        Node(value=left, cover=1.0),
        Node(value=right, cover=3.0),
    ]


@pytest.mark.parametrize("accumulation", list(Accumulation))
def test_every_flag_combination_routes_as_the_reference(accumulation: Accumulation) -> None:
    thresholds = [t for t in THRESHOLDS if t != 31.5]
    x = input_pool(make_forest([_stump(0, t, 0, 0) for t in thresholds], n_features=1))
    x = x[:, None]
    for flags in range(128):
        trees = [_stump(flags, t, 1.0, 2.0) for t in thresholds]
        forest = make_forest(
            trees,
            n_features=1,
            n_outputs=len(trees),
            outputs=range(len(trees)),
            accumulation=accumulation,
        )
        try:
            check(forest, x, shap_rows=len(x))
        except AssertionError as exc:
            raise AssertionError(f"flags {NodeFlag(flags)!r}: {exc}") from None


def test_zero_missing_bound_and_nan_as_zero() -> None:
    below = np.nextafter(np.float32(1e-35), np.float32(0))
    above = np.nextafter(np.float32(1e-35), np.float32(1))
    x = np.array([[0.0], [-0.0], [below], [-below], [above], [-above], [np.nan]], np.float32)
    zero_missing = NodeFlag.ZERO_MISSING | NodeFlag.DEFAULT_LEFT | NodeFlag.LESS_EQUAL
    forest = make_forest([_stump(zero_missing, -5.0, 1.0, 2.0)], n_features=1)
    # |x| <= 1e-35 (and NaN) take the default (left); the rest compare with -5 (right).
    assert FastPredictor(forest).predict_margins(x)[:, 0].tolist() == [1, 1, 1, 1, 2, 2, 1]
    nan_as_zero = NodeFlag.NAN_AS_ZERO | NodeFlag.LESS_EQUAL  # NaN goes where 0.0 goes
    for threshold, nan_goes in ((0.0, 1.0), (-0.5, 2.0)):
        forest = make_forest([_stump(nan_as_zero, threshold, 1.0, 2.0)], n_features=1)
        assert FastPredictor(forest).predict_margins(x)[-1, 0] == nan_goes
        check(forest, x)


def test_categorical_rules() -> None:
    codes = np.array([[c] for c in (0, 1, 2, 5, 31, 33, 64, 95, 96, 500, -1, 2.0**24, 2.5)])
    x = codes.astype(np.float32)
    in_set = [1, 0, 1, 1, 1, 1, 1, 0, None, None, None, None, 1]  # None: not a valid code here
    cases = {
        NodeFlag.CATEGORICAL | NodeFlag.CAT_OTHER_LEFT: ("right", "left"),  # xgboost
        NodeFlag.CATEGORICAL | NodeFlag.CAT_IN_SET_LEFT: ("left", "right"),  # LightGBM, sklearn
    }
    for flags, (members, others) in cases.items():
        forest = make_forest([_stump(flags, 0.0, 1.0, 2.0)], n_features=1)
        got = FastPredictor(forest).predict_margins(x)[:, 0]
        for value, member, margin in zip(codes[:, 0], in_set, got, strict=True):
            side = members if member == 1 else others
            assert margin == (1.0 if side == "left" else 2.0), (flags, value)
        check(forest, x)


def test_codes_from_two_to_the_24_are_never_in_a_set() -> None:
    # A bit field long enough to hold code 2**24 (every bit set) still treats it as invalid.
    words = (0xFFFFFFFF,) * ((1 << 24) // 32 + 1)
    x = np.array([[2.0**24 - 1], [2.0**24], [2.0**24 + 2]], np.float32)
    for flags, valid, invalid in (
        (NodeFlag.CATEGORICAL | NodeFlag.CAT_OTHER_LEFT, 2.0, 1.0),
        (NodeFlag.CATEGORICAL | NodeFlag.CAT_IN_SET_LEFT, 1.0, 2.0),
    ):
        forest = replace(
            make_forest([_stump(flags, 0.0, 1.0, 2.0)], n_features=1),
            cat_ptr=np.array([0, len(words), len(words), len(words)], np.int64),
            cat_words=np.array(words, np.uint32),
        )
        np.testing.assert_array_equal(
            FastPredictor(forest).predict_margins(x)[:, 0], [valid, invalid, invalid]
        )
        check(forest, x)


def test_children_in_any_order_and_zero_covers() -> None:
    # Root 0 splits to 3 (left) and 1 (right); node 3 splits to 2 and 4. Node 3 has no cover.
    tree = [
        Node(3, 1, 0, 0.5, NodeFlag.DEFAULT_LEFT, cover=2.0),
        Node(value=-1.0, cover=2.0),
        Node(value=4.0, cover=0.0),
        Node(2, 4, 1, 0.1, NodeFlag.LESS_EQUAL, cover=0.0),
        Node(value=8.0, cover=0.0),
    ]
    x = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [np.nan, np.nan], [-1, 0.1]], np.float32)
    forest = make_forest([tree, tree], n_features=2, base=[0.25])
    # float32(0.1) is above the double 0.1: `x <= 0.1` sends it right, like NaN at node 3.
    expected = [8.25, 16.25, -1.75, 16.25, 16.25]
    np.testing.assert_array_equal(FastPredictor(forest).predict_margins(x)[:, 0], expected)
    check(forest, x)


@pytest.mark.parametrize("accumulation", list(Accumulation))
@pytest.mark.parametrize("divisor", [1.0, 3.0, 0.1])
def test_accumulation_base_and_divisor(accumulation: Accumulation, divisor: float) -> None:
    # Leaves and bases that float32 cannot hold: the two accumulations differ in their bits.
    trees = [
        [Node(1, 2, t % 2, 0.3 * t, 0, cover=3.0), Node(value=0.1 * t + 1 / 3), Node(value=-t / 7)]
        for t in range(11)
    ]
    forest = make_forest(
        trees,
        n_features=2,
        n_outputs=3,
        outputs=[t % 3 for t in range(11)],
        base=[0.1, -1 / 3, 2.0],
        accumulation=accumulation,
        divisor=divisor,
    )
    x = np.random.default_rng(0).normal(size=(70, 2)).astype(np.float32) * 2
    check(forest, x)
    margins = FastPredictor(forest).predict_margins(x)
    if accumulation is Accumulation.FLOAT32 and divisor == 1.0:  # float32 values
        np.testing.assert_array_equal(margins.astype(np.float32).astype(np.float64), margins)


# ----------------------------------------------------------------- generated forests


@st.composite
def trees(draw: st.DrawFn, n_features: int) -> list[Node]:
    """A random tree in a random node order (root first), random flags and thresholds."""
    budget = draw(st.integers(1, 15))
    children: dict[int, tuple[int, int]] = {}
    frontier, count = [0], 1
    while frontier:
        node = frontier.pop(draw(st.integers(0, len(frontier) - 1)))
        if count + 2 <= budget and draw(st.booleans()):
            children[node] = (count, count + 1)
            frontier += [count, count + 1]
            count += 2
    order = [0, *draw(st.permutations(range(1, count)))]  # order[new position] = node
    where = {node: position for position, node in enumerate(order)}
    # Covers as frameworks store them (a split's is its children's sum), or drawn freely.
    free = draw(st.booleans())
    drawn = st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0] if free else [0.0, 1e-15, 0.5, 1.0, 10.0])
    cover: dict[int, float] = {}

    def cover_of(node: int) -> float:
        """Draws the covers of `node`'s subtree; returns the node's."""
        below = [cover_of(child) for child in children.get(node, ())]
        cover[node] = sum(below) if below and not free else draw(drawn)
        return cover[node]

    cover_of(0)
    nodes = []
    for node in order:
        if node not in children:
            value = draw(
                st.one_of(
                    st.floats(-8, 8, allow_subnormal=False),
                    st.sampled_from([0.0, -0.0, 0.1, 1 / 3, 1e-8, 2.5]),
                )
            )
            nodes.append(Node(value=value, cover=cover[node]))
            continue
        left, right = children[node]
        word = st.one_of(
            st.sampled_from([0, 1, 0xFFFFFFFF, 0x80000001, 0x24]), st.integers(0, 2**32 - 1)
        )
        nodes.append(
            Node(
                left=where[left],
                right=where[right],
                feature=draw(st.integers(0, n_features - 1)),
                threshold=draw(st.one_of(st.sampled_from(THRESHOLDS), st.floats(-3, 3))),
                flags=draw(st.integers(0, 127)),
                words=tuple(draw(st.lists(word, max_size=3))),
                cover=cover[node],
            )
        )
    return nodes


@st.composite
def forests(draw: st.DrawFn) -> tuple[Forest, NDArray[np.float32]]:
    n_features = draw(st.integers(1, 4))
    n_outputs = draw(st.integers(1, 3))
    n_trees = draw(st.integers(1, 6))
    forest = make_forest(
        [draw(trees(n_features)) for _ in range(n_trees)],
        n_features=n_features,
        n_outputs=n_outputs,
        outputs=[draw(st.integers(0, n_outputs - 1)) for _ in range(n_trees)],
        base=[draw(st.floats(-4, 4)) for _ in range(n_outputs)],
        accumulation=draw(st.sampled_from(list(Accumulation))),
        divisor=draw(st.sampled_from([1.0, 1.0, 3.0, 7.5, 100.0])),
    )
    pool = input_pool(forest)
    n_rows = draw(st.integers(1, 24))
    cells = draw(
        st.lists(
            st.integers(0, len(pool) - 1),
            min_size=n_rows * n_features,
            max_size=n_rows * n_features,
        )
    )
    x = pool[np.array(cells)].reshape(n_rows, n_features)
    return forest, x


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(case=forests())
def test_generated_forests_match_the_reference(case: tuple[Forest, NDArray[np.float32]]) -> None:
    forest, x = case
    check(forest, x, shap_rows=4)


# ----------------------------------------------------------------- batches and kernels


def random_forest(
    seed: int,
    *,
    n_features: int = 6,
    n_trees: int = 41,
    depth: int = 5,
    n_outputs: int = 1,
    accumulation: Accumulation = Accumulation.FLOAT64,
    divisor: float = 1.0,
) -> Forest:
    """A full binary tree per tree, random flags, thresholds, category sets, values, covers."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_trees):
        size = 2 ** (depth + 1) - 1
        nodes = []
        for i in range(size):
            if 2 * i + 1 >= size:
                nodes.append(Node(value=float(rng.normal()), cover=float(rng.integers(0, 5))))
                continue
            nodes.append(
                Node(
                    2 * i + 1,
                    2 * i + 2,
                    int(rng.integers(n_features)),
                    float(rng.choice([rng.normal(), *THRESHOLDS[:6]])),
                    int(rng.integers(128)),
                    tuple(int(w) for w in rng.integers(0, 2**32, int(rng.integers(0, 3)))),
                    cover=float(rng.integers(0, 9)),
                )
            )
        out.append(nodes)
    return make_forest(
        out,
        n_features=n_features,
        n_outputs=n_outputs,
        outputs=[int(g) for g in rng.integers(0, n_outputs, n_trees)],
        base=list(rng.normal(size=n_outputs)),
        accumulation=accumulation,
        divisor=divisor,
    )


def random_rows(forest: Forest, n: int, seed: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    pool = input_pool(forest)
    x = rng.normal(size=(n, forest.n_features)).astype(np.float32) * 2
    mask = rng.random(x.shape) < 0.5
    x[mask] = rng.choice(pool, int(mask.sum()))
    return x


@pytest.mark.parametrize("n_outputs", [1, 3, 10])
@pytest.mark.parametrize("accumulation", list(Accumulation))
def test_batches_rows_and_output_chunks(n_outputs: int, accumulation: Accumulation) -> None:
    forest = random_forest(n_outputs, n_outputs=n_outputs, accumulation=accumulation, divisor=3.0)
    x = random_rows(forest, 150, seed=n_outputs)
    predictor = FastPredictor(forest)
    whole = predictor.predict_margins(x)
    assert_same_bits(whole, reference.margins(forest, x))
    for i in (0, 63, 64, 149):
        assert_same_bits(predictor.predict_margins(x[i : i + 1]), whole[i : i + 1])


def test_vector_and_scalar_shap_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    forest = random_forest(7, n_features=9, n_outputs=2, divisor=7.0)
    x = random_rows(forest, 301, seed=3)
    for dmax in (12, 3):
        engine = FastTreeShap(forest, dmax=dmax)
        vector = engine.contributions(x)
        monkeypatch.setenv("SHAPSTREAM_NO_SIMD", "1")
        scalar = engine.contributions(x)
        monkeypatch.delenv("SHAPSTREAM_NO_SIMD")
        np.testing.assert_array_equal(vector, scalar)
        margins = FastPredictor(forest).predict_margins(x)
        np.testing.assert_allclose(vector.sum(axis=2), margins, rtol=1e-12, atol=1e-12)


def test_an_xgboost_forest_matches_the_reference() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    x[:, 1] = rng.integers(0, 40, 300)
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (np.nan_to_num(x[:, 0]) + (np.nan_to_num(x[:, 1]) % 3 == 0) > 0.5).astype(np.float32)
    dtrain = xgb.DMatrix(x, y, feature_types=["q", "c", "q", "q"], enable_categorical=True)
    params = {"objective": "binary:logistic", "max_depth": 4, "max_cat_to_onehot": 1}
    booster = xgb.train({**params, "nthread": 1}, dtrain, 8)
    forest = forest_from_json(json.loads(bytes(booster.save_raw("json"))))
    probe = np.vstack([x[:40], SPECIAL_INPUTS[:, None].repeat(4, axis=1)])
    check(forest, probe)


def test_split_values_are_numerical_thresholds() -> None:
    forest = make_forest(
        [
            [
                Node(1, 2, 0, 0.1, 0),
                Node(3, 4, 1, 2.0, CATEGORICAL, (5,)),
                Node(value=9.0),
                Node(value=1.0),
                Node(value=2.0),
            ],
            [Node(1, 2, 0, 0.1, NodeFlag.LESS_EQUAL), Node(value=1.0), Node(value=0.5)],
            [Node(1, 2, 0, -3.0, 0), Node(value=1.0), Node(value=0.5)],
        ],
        n_features=3,
    )
    predictor = FastPredictor(forest)
    np.testing.assert_array_equal(predictor.split_values(0), [-3.0, 0.1])
    assert predictor.split_values(0).dtype == np.float64
    assert len(predictor.split_values(1)) == 0  # categorical only
    assert len(predictor.split_values(2)) == 0


def test_mismatch_compares_at_the_accumulation_precision() -> None:
    x = np.array([[0.0], [1.0]], np.float32)
    tree = [Node(1, 2, 0, 0.5, 0), Node(value=0.1), Node(value=0.2)]
    wide = FastPredictor(make_forest([tree], n_features=1))
    margins = wide.predict_margins(x)
    assert wide.mismatch(margins, x) is None
    assert wide.mismatch(margins.reshape(-1), x) is None
    off = margins.copy()
    off[1, 0] = np.nextafter(off[1, 0], 1.0)
    assert "1 of 2 margins differ (row 1, output 0" in str(wide.mismatch(off, x))
    assert "shape" in str(wide.mismatch(margins[:1], x))
    narrow = FastPredictor(make_forest([tree], n_features=1, accumulation=Accumulation.FLOAT32))
    theirs = narrow.predict_margins(x)
    assert narrow.mismatch(off.astype(np.float32).astype(np.float64), x) is None
    assert narrow.mismatch(theirs + 1e-12, x) is None  # the same float32
    theirs[0, 0] = np.nextafter(np.float32(theirs[0, 0]), np.float32(1))
    assert "row 0, output 0" in str(narrow.mismatch(theirs, x))


# ----------------------------------------------------------------- malformed forests


def _valid() -> Forest:
    return make_forest(
        [
            [Node(1, 2, 0, 0.5, CATEGORICAL, (3,)), Node(value=1.0), Node(value=2.0)],
            [Node(1, 2, 1, 0.5, 0), Node(value=1.0), Node(value=2.0)],
        ],
        n_features=2,
        n_outputs=2,
        outputs=[0, 1],
    )


def _set(array: NDArray[Any], index: int, value: Any) -> NDArray[Any]:
    changed = array.copy()
    changed[index] = value
    return changed


def _broken() -> dict[str, Forest]:
    f = _valid()
    return {
        "child out of range": replace(f, left=_set(f.left, 3, 3)),
        "negative right child": replace(f, right=_set(f.right, 0, -1)),
        "node reached twice": replace(f, right=_set(f.right, 0, 1)),
        "cycle to the root": replace(f, right=_set(f.right, 3, 0)),
        "feature out of range": replace(f, feature=_set(f.feature, 3, 2)),
        "negative feature": replace(f, feature=_set(f.feature, 0, -1)),
        "unknown flag": replace(f, flags=_set(f.flags, 3, 128)),
        "set past the words": replace(f, cat_ptr=_set(f.cat_ptr, 1, 2)),
        "empty tree": replace(
            f, tree_ptr=np.array([0, 3, 3, 6]), tree_output=np.zeros(3, np.int32)
        ),
        "tree output out of range": replace(f, tree_output=np.array([0, 2], np.int32)),
        "short thresholds": replace(f, threshold=f.threshold[:-1]),
        "short base": replace(f, base=f.base[:1]),
        "no outputs": replace(f, n_outputs=0, base=f.base[:0]),
        "zero divisor": replace(f, divisor=0.0),
        "infinite divisor": replace(f, divisor=INF),
        "NaN divisor": replace(f, divisor=float("nan")),
    }


@pytest.mark.parametrize("name", list(_broken()))
def test_malformed_forests_are_unsupported(name: str) -> None:
    forest = _broken()[name]
    with pytest.raises(UnsupportedModel):
        FastPredictor(forest)
    with pytest.raises(UnsupportedModel):
        FastTreeShap(forest)


def test_the_valid_forest_is_accepted() -> None:
    x = np.array([[3.0, 0.0], [4.0, 1.0], [np.nan, np.nan]], np.float32)
    check(_valid(), x)
