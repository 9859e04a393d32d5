"""scikit-learn tree ensembles, served from a neutral forest file that `model init` writes.

A pickle (or joblib) file runs code when it is read, so a scikit-learn model is never served
from one. `model init` takes a `.skops` file instead: every type the file names is checked
against an explicit allow-list (the eight tree ensembles and the scikit-learn and numpy
internals they hold) before skops builds anything, the trees are checked for what
scikit-learn indexes without bounds checks, and the model is converted to shapstream's own
forest file (JSON: the `Forest` arrays and what the model decides). The conversion is refused
unless the forest's margins are bit-identical to scikit-learn's own raw predictions on probe
rows that take every split's threshold and its float32 neighbours. The service then serves
that file with neither scikit-learn nor skops installed: `from_skops` is the only code here
that imports them.

Routing as scikit-learn predicts: `x <= threshold` (the float32 input widened to double)
goes left, NaN follows `missing_go_to_left`; a HistGradientBoosting categorical split sends
the codes in its set left, and NaN, negative and unknown codes the way of missing values.
Margins: GradientBoosting adds `learning_rate * leaf` (one double product, folded into the
leaf) to its init estimator's raw prediction, tree by tree; HistGradientBoosting adds its
leaves (shrinkage already in them) to its baseline; random forests and extra trees sum their
trees' class probabilities or values and divide by the number of trees (`Forest.divisor`).
"""

import copy
import hashlib
import importlib
import io
import math
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
from numpy.typing import NDArray

from service.core.engine.base import Contributions, FloatMatrix
from service.core.formats.base import (
    Accumulation,
    Forest,
    InvalidModel,
    Link,
    ModelDescription,
    NodeFlag,
)
from service.core.schema import FeatureType, ModelSchema, Task

NAME: Final = "sklearn"
FILE_FORMAT: Final = "shapstream-forest"
FILE_VERSION: Final = 1
FRAMEWORK: Final = "scikit-learn"

# Category codes past this are read as "other" (xgboost's limit, shared by every Forest).
_MAX_CODE: Final = 1 << 24
_ZERO: Final = 1e-35
# Flags a scikit-learn conversion sets; a file with others was not written by it.
_SKLEARN_FLAGS: Final = int(
    NodeFlag.DEFAULT_LEFT
    | NodeFlag.CATEGORICAL
    | NodeFlag.LESS_EQUAL
    | NodeFlag.CAT_IN_SET_LEFT
    | NodeFlag.CAT_OTHER_LEFT
)
# HistGradientBoosting bitsets: 8 words of 32 bits (categories are below max_bins <= 255).
_HGB_WORDS: Final = 8
# Row x tree cells routed at once when scoring (bounds the memory of a batch).
_CELLS: Final = 1 << 20
_RECOGNISE = re.compile(rb'\A\s*\{\s*"format"\s*:\s*"' + FILE_FORMAT.encode() + rb'"')


# --- the neutral forest file (no scikit-learn needed) ---------------------------------------


@dataclass(frozen=True, eq=False)
class ForestFile:
    """The neutral file's content: the Forest and what the model decides."""

    estimator: str
    objective: str
    task: Task
    link: Link
    framework_version: str
    feature_names: tuple[str, ...] | None
    # Per feature, its categories in code order (None: numerical).
    categories: tuple[tuple[str, ...] | None, ...]
    classes: tuple[str, ...]
    missing_values: bool
    forest: Forest
    source_sha256: str = ""
    verified_rows: int = 0

    def to_bytes(self) -> bytes:
        """The file as written by `model init` (deterministic: the same model, the same bytes)."""
        forest = self.forest
        document = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "framework": FRAMEWORK,
            "framework_version": self.framework_version,
            "estimator": self.estimator,
            "objective": self.objective,
            "task": self.task.value,
            "link": self.link.value,
            "classes": list(self.classes),
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "categories": [None if c is None else list(c) for c in self.categories],
            "missing_values": self.missing_values,
            "source_sha256": self.source_sha256,
            "verified_rows": self.verified_rows,
            "forest": {
                "n_features": forest.n_features,
                "n_outputs": forest.n_outputs,
                "accumulation": forest.accumulation.value,
                "divisor": forest.divisor,
                "base": forest.base.tolist(),
                "tree_ptr": forest.tree_ptr.tolist(),
                "tree_output": forest.tree_output.tolist(),
                "left": forest.left.tolist(),
                "right": forest.right.tolist(),
                "feature": forest.feature.tolist(),
                # JSON has no infinity; scikit-learn's "all non-missing values go left"
                # splits have threshold +inf.
                "threshold": [_json_float(v) for v in forest.threshold.tolist()],
                "flags": forest.flags.tolist(),
                "cat_ptr": forest.cat_ptr.tolist(),
                "cat_words": forest.cat_words.tolist(),
                "value": forest.value.tolist(),
                "cover": forest.cover.tolist(),
            },
        }
        return orjson.dumps(document) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> "ForestFile":
        """Parse and check a forest file; raises InvalidModel with one line."""
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _corrupt(f"not JSON ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
            raise _corrupt(f'"format" is not "{FILE_FORMAT}"')
        if document.get("version") != FILE_VERSION:
            raise InvalidModel(
                f"is a {FILE_FORMAT} file of version {document.get('version')!r}; this "
                f"shapstream reads version {FILE_VERSION}"
            )
        if document.get("framework") != FRAMEWORK:
            raise _corrupt(f"framework {document.get('framework')!r} is not {FRAMEWORK!r}")
        try:
            return _parse(document)
        except InvalidModel:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise _corrupt(f"unexpected content ({exc!r})") from None


def _json_float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        raise InvalidModel("a threshold is NaN")
    return "inf" if value > 0 else "-inf"


def _corrupt(detail: str) -> InvalidModel:
    return InvalidModel(f"is a corrupt {FILE_FORMAT} file: {detail}")


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _corrupt(f"{what} is not a list of strings")
    return tuple(value)


def _array(forest: dict[str, Any], key: str, dtype: type[np.generic], size: int) -> NDArray[Any]:
    values = forest[key]
    if not isinstance(values, list):
        raise _corrupt(f"forest.{key} is not a list")
    if key == "threshold" and any(isinstance(v, str) for v in values):
        values = [_THRESHOLDS.get(v, v) if isinstance(v, str) else v for v in values]
    array = np.array(values) if values else np.zeros(0)
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        raise _corrupt(f"forest.{key} holds something other than numbers")
    if size >= 0 and len(array) != size:
        raise _corrupt(f"forest.{key} has {len(array)} entries, expected {size}")
    if dtype is np.float64:
        return array.astype(np.float64)
    info = np.iinfo(dtype)  # type: ignore[type-var]
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise _corrupt(f"forest.{key} holds fractions")
    if len(array) and (array.min() < info.min or array.max() > info.max):
        raise _corrupt(f"forest.{key} holds values out of range")
    return array.astype(dtype)


_THRESHOLDS: Final = {"inf": math.inf, "-inf": -math.inf}


def _parse(document: dict[str, Any]) -> ForestFile:
    task = Task(document["task"])
    link = Link(document["link"])
    names = document["feature_names"]
    feature_names = None if names is None else _strings(names, "feature_names")
    raw_categories = document["categories"]
    if not isinstance(raw_categories, list):
        raise _corrupt("categories is not a list")
    categories = tuple(
        None if c is None else _strings(c, "a feature's categories") for c in raw_categories
    )
    classes = _strings(document["classes"], "classes")
    forest = _forest_of(document["forest"])
    parsed = ForestFile(
        estimator=str(document["estimator"]),
        objective=str(document["objective"]),
        task=task,
        link=link,
        framework_version=str(document["framework_version"]),
        feature_names=feature_names,
        categories=categories,
        classes=classes,
        missing_values=bool(document["missing_values"]),
        forest=forest,
        source_sha256=str(document.get("source_sha256", "")),
        verified_rows=int(document.get("verified_rows", 0)),
    )
    _check_consistent(parsed)
    return parsed


def _forest_of(raw: dict[str, Any]) -> Forest:
    if not isinstance(raw, dict):
        raise _corrupt("forest is not an object")
    n_features = int(raw["n_features"])
    n_outputs = int(raw["n_outputs"])
    if n_features <= 0 or n_outputs <= 0:
        raise _corrupt("the forest has no features or no outputs")
    tree_ptr = _array(raw, "tree_ptr", np.int64, -1)
    if len(tree_ptr) < 1:
        raise _corrupt("forest.tree_ptr is empty")
    n_trees = len(tree_ptr) - 1
    n_nodes = int(tree_ptr[-1])
    forest = Forest(
        n_features=n_features,
        n_outputs=n_outputs,
        tree_ptr=tree_ptr,
        tree_output=_array(raw, "tree_output", np.int32, n_trees),
        left=_array(raw, "left", np.int32, n_nodes),
        right=_array(raw, "right", np.int32, n_nodes),
        feature=_array(raw, "feature", np.int32, n_nodes),
        threshold=_array(raw, "threshold", np.float64, n_nodes),
        flags=_array(raw, "flags", np.uint8, n_nodes),
        cat_ptr=_array(raw, "cat_ptr", np.int64, n_nodes + 1),
        cat_words=_array(raw, "cat_words", np.uint32, -1),
        value=_array(raw, "value", np.float64, n_nodes),
        cover=_array(raw, "cover", np.float64, n_nodes),
        base=_array(raw, "base", np.float64, n_outputs),
        accumulation=Accumulation(raw["accumulation"]),
        divisor=float(raw["divisor"]),
    )
    problem = forest_problem(forest, allowed_flags=_SKLEARN_FLAGS)
    if problem:
        raise _corrupt(problem)
    return forest


def forest_problem(forest: Forest, *, allowed_flags: int = 0xFF) -> str | None:
    """Why `forest` could crash or mislead an engine that trusts it, or None.

    Every tree is a tree (children after their parent, each node reached once), every index
    is in range, and every number the engines add or divide by is finite (covers positive:
    they are TreeSHAP's path weights).
    """
    tree_ptr = forest.tree_ptr
    n_nodes = forest.n_nodes
    if len(tree_ptr) != forest.n_trees + 1 or len(forest.base) != forest.n_outputs:
        return "tree_ptr or base does not match the trees or outputs"
    if tree_ptr[0] != 0 or np.any(np.diff(tree_ptr) <= 0) or tree_ptr[-1] != n_nodes:
        return "tree_ptr is not increasing from 0 to the node count (an empty tree?)"
    per_node = ("right", "feature", "threshold", "flags", "value", "cover")
    if any(len(getattr(forest, key)) != n_nodes for key in per_node):
        return "the node arrays differ in length"
    if len(forest.cat_ptr) != n_nodes + 1:
        return "cat_ptr does not have one entry per node and one more"
    out = forest.tree_output
    if len(out) and (out.min() < 0 or out.max() >= forest.n_outputs):
        return "a tree adds to an output the forest does not have"
    start = np.repeat(tree_ptr[:-1], np.diff(tree_ptr))
    size = np.repeat(np.diff(tree_ptr), np.diff(tree_ptr))
    local = np.arange(n_nodes) - start
    left, right = forest.left.astype(np.int64), forest.right.astype(np.int64)
    leaf = left == -1
    if np.any(leaf != (right == -1)):
        return "a node has one child"
    internal = ~leaf
    for child in (left, right):
        if np.any(internal & ((child <= local) | (child >= size))):
            return "a child index is out of its tree or before its parent"
    children = np.concatenate([start[internal] + left[internal], start[internal] + right[internal]])
    parents = np.bincount(children, minlength=n_nodes)
    roots = np.zeros(n_nodes, dtype=bool)
    roots[tree_ptr[:-1]] = True
    if np.any(parents[~roots] != 1) or np.any(parents[roots] != 0):
        return "a node is not reached exactly once from its tree's root"
    feature = forest.feature
    if np.any(internal & ((feature < 0) | (feature >= forest.n_features))):
        return "a split uses a feature the forest does not have"
    if np.any(forest.flags.astype(np.int64) & ~allowed_flags):
        return "a node has routing flags this format does not write"
    if np.any(np.isnan(forest.threshold)):
        return "a threshold is NaN"
    for key in ("value", "cover", "base"):
        if not np.all(np.isfinite(getattr(forest, key))):
            return f"{key} holds a non-finite number"
    if np.any(forest.cover <= 0):
        return "a node's cover is not positive"
    cat_ptr = forest.cat_ptr
    if cat_ptr[0] != 0 or np.any(np.diff(cat_ptr) < 0) or cat_ptr[-1] != len(forest.cat_words):
        return "cat_ptr does not index cat_words"
    categorical = (forest.flags & NodeFlag.CATEGORICAL) != 0
    if np.any(np.diff(cat_ptr)[~(categorical & internal)] != 0):
        return "a node that is not a categorical split has a category set"
    if not (math.isfinite(forest.divisor) and forest.divisor > 0):
        return "divisor is not a positive number"
    return None


def _check_consistent(parsed: ForestFile) -> None:
    forest = parsed.forest
    if forest.accumulation is not Accumulation.FLOAT64:
        raise _corrupt("scikit-learn forests accumulate in float64")
    if len(parsed.categories) != forest.n_features:
        raise _corrupt("categories does not have one entry per feature")
    if parsed.feature_names is not None and len(parsed.feature_names) != forest.n_features:
        raise _corrupt("feature_names does not have one name per feature")
    expected = _outputs(parsed.task, len(parsed.classes))
    if expected != forest.n_outputs:
        raise _corrupt(f"a {parsed.task.value} model with {forest.n_outputs} outputs")
    wanted = {Task.REGRESSION: 0, Task.BINARY: 2}.get(parsed.task, max(len(parsed.classes), 3))
    if len(parsed.classes) != wanted or len(set(parsed.classes)) != wanted:
        raise _corrupt(f"{len(parsed.classes)} classes for a {parsed.task.value} model")
    links = _TASK_LINKS[parsed.task]
    if parsed.link not in links:
        raise _corrupt(f"link {parsed.link.value} for a {parsed.task.value} model")
    for j, labels in enumerate(parsed.categories):
        if labels is not None and (not labels or len(set(labels)) != len(labels)):
            raise _corrupt(f"feature {j}'s categories are empty or repeat")
    categorical = (forest.flags & NodeFlag.CATEGORICAL) != 0
    split = np.unique(forest.feature[categorical & (forest.left >= 0)])
    if any(parsed.categories[int(j)] is None for j in split):
        raise _corrupt("a categorical split on a numerical feature")


_TASK_LINKS: Final = {
    Task.BINARY: (Link.SIGMOID, Link.IDENTITY),
    Task.MULTICLASS: (Link.SOFTMAX, Link.IDENTITY),
    Task.REGRESSION: (Link.IDENTITY, Link.EXP),
}


def _outputs(task: Task, n_classes: int) -> int:
    return n_classes if task is Task.MULTICLASS else 1


# --- scoring and TreeSHAP of a Forest, in numpy ----------------------------------------------


def goes_left(forest: Forest, node: NDArray[np.int64], x: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Whether each value `x[i]` goes to the left child of global node `node[i]`."""
    flags = forest.flags[node].astype(np.int64)
    nan = np.isnan(x)
    x = np.where(nan & ((flags & NodeFlag.NAN_AS_ZERO) != 0), 0.0, x)
    missing = np.isnan(x) | (((flags & NodeFlag.ZERO_MISSING) != 0) & (np.abs(x) <= _ZERO))
    threshold = forest.threshold[node]
    with np.errstate(invalid="ignore"):
        numeric = np.where((flags & NodeFlag.LESS_EQUAL) != 0, x <= threshold, x < threshold)
    left: NDArray[np.bool_] = np.where(missing, (flags & NodeFlag.DEFAULT_LEFT) != 0, numeric)
    cats = np.flatnonzero(((flags & NodeFlag.CATEGORICAL) != 0) & ~missing)
    if len(cats):
        value, at, flag = x[cats], node[cats], flags[cats]
        other = (value < 0) | (value >= _MAX_CODE)
        code = np.where(other, 0, value).astype(np.int64)  # truncation, as a C cast
        first = forest.cat_ptr[at]
        other |= (code >> 5) >= forest.cat_ptr[at + 1] - first
        words = forest.cat_words
        word = words[np.where(other, 0, first + (code >> 5))] if len(words) else np.zeros(len(at))
        in_set = ((word.astype(np.int64) >> (code & 31)) & 1) == 1
        left[cats] = np.where(
            other,
            (flag & NodeFlag.CAT_OTHER_LEFT) != 0,
            in_set == ((flag & NodeFlag.CAT_IN_SET_LEFT) != 0),
        )
    return left


def leaves(forest: Forest, x: FloatMatrix) -> NDArray[np.int64]:
    """The global index of the leaf each row reaches in each tree, shape (rows, trees)."""
    x64 = np.asarray(x, dtype=np.float64)
    starts = forest.tree_ptr[:-1]
    node = np.tile(starts, (len(x64), 1))
    rows = np.repeat(np.arange(len(x64)), forest.n_trees).reshape(node.shape)
    tree_start = np.tile(starts, (len(x64), 1))
    active = forest.left[node] >= 0
    while active.any():
        at, row = node[active], rows[active]
        left = goes_left(forest, at, x64[row, forest.feature[at]])
        child = np.where(left, forest.left[at], forest.right[at])
        node[active] = tree_start[active] + child
        active = forest.left[node] >= 0
    return node


def forest_margins(forest: Forest, x: FloatMatrix) -> NDArray[np.float64]:
    """Raw margins (rows, outputs): each output's base plus its trees' leaves, added in tree
    order in float64 (as scikit-learn adds them), then divided by the divisor."""
    if forest.accumulation is not Accumulation.FLOAT64:
        raise ValueError("forest_margins adds in float64 only")
    out = np.empty((len(x), forest.n_outputs), dtype=np.float64)
    step = max(1, _CELLS // max(forest.n_trees, 1))
    by_output = [np.flatnonzero(forest.tree_output == g) for g in range(forest.n_outputs)]
    for begin in range(0, len(x), step):
        # (trees, rows): one contiguous row of leaf values per tree.
        values = forest.value[leaves(forest, x[begin : begin + step])].T.copy()
        for g, trees in enumerate(by_output):
            acc = np.full(values.shape[1], forest.base[g])
            for t in trees:
                acc += values[t]
            out[begin : begin + step, g] = acc
    if forest.divisor != 1.0:
        out /= forest.divisor
    return out


class ForestTreeShap:
    """Exact path-dependent TreeSHAP of a Forest (Lundberg et al. 2020, Algorithm 2, as
    shap's `tree_shap_recursive`), in numpy over all rows at once: each node is visited once
    per batch. Slow next to the native engine; it needs nothing but numpy."""

    name = "forest-treeshap-numpy"

    def __init__(self, forest: Forest) -> None:
        self._forest = forest

    def contributions(self, x: FloatMatrix) -> Contributions:
        """Attributions in margin space, (rows, outputs, features + 1), bias last."""
        forest = self._forest
        x64 = np.asarray(x, dtype=np.float64)
        n, m = len(x64), forest.n_features
        out = np.zeros((n, forest.n_outputs, m + 1))
        out[:, :, m] = forest.base
        for t in range(forest.n_trees):
            phi = np.zeros((m + 1, n))
            walk = _Walk(forest, int(forest.tree_ptr[t]), x64, phi)
            root = _Path((-1,), np.ones(1), np.ones((1, n)), np.ones((1, n)))
            walk.recurse(0, root, 1.0)
            g = int(forest.tree_output[t])
            out[:, g, :m] += phi[:m].T
            out[:, g, m] += walk.expected
        if forest.divisor != 1.0:
            out /= forest.divisor
        return out


@dataclass(frozen=True, slots=True)
class _Path:
    """TreeSHAP's unique path, for all rows at once: per element its feature, zero fraction
    (a scalar: covers), one fraction (per row: 1 where the row follows the path) and
    permutation weights (per row). Element 0 is the root's placeholder (feature -1)."""

    features: tuple[int, ...]
    zeros: NDArray[np.float64]  # (elements,)
    ones: NDArray[np.float64]  # (elements, rows)
    weights: NDArray[np.float64]  # (elements, rows)

    def extend(self, zero: float, one: NDArray[np.float64], feature: int) -> "_Path":
        depth = len(self.features)
        old = self.weights
        share = np.arange(depth, dtype=np.float64)
        weights = np.zeros((depth + 1, old.shape[1]))
        weights[:depth] = zero * old * ((depth - share) / (depth + 1))[:, None]
        weights[1:] += one * old * ((share + 1) / (depth + 1))[:, None]
        return _Path(
            (*self.features, feature),
            np.append(self.zeros, zero),
            np.vstack([self.ones, one]),
            weights,
        )

    def unwind(self, index: int) -> "_Path":
        depth = len(self.features) - 1
        zero, one = self.zeros[index], self.ones[index]
        has_one = one != 0
        safe_one = np.where(has_one, one, 1.0)
        weights = self.weights[:depth].copy()
        following = self.weights[depth]
        for i in range(depth - 1, -1, -1):
            carried = following * (depth + 1) / ((i + 1) * safe_one)
            following = self.weights[i] - carried * zero * (depth - i) / (depth + 1)
            dropped = self.weights[i] * (depth + 1) / (zero * (depth - i))
            weights[i] = np.where(has_one, carried, dropped)
        keep = [i for i in range(depth + 1) if i != index]
        features = tuple(self.features[i] for i in keep)
        return _Path(features, self.zeros[keep], self.ones[keep], weights)

    def unwound_sums(self) -> NDArray[np.float64]:
        """Each element's (1..depth) weight with it unwound, (depth, rows)."""
        depth = len(self.features) - 1
        zero = self.zeros[1:, None]
        one = self.ones[1:]
        has_one = one != 0
        safe_one = np.where(has_one, one, 1.0)
        following = np.broadcast_to(self.weights[depth], one.shape)
        total_one = np.zeros_like(one)
        total_zero = np.zeros_like(one)
        for i in range(depth - 1, -1, -1):
            weight = self.weights[i]
            carried = following / ((i + 1) * safe_one)
            total_one += carried
            following = weight - carried * zero * (depth - i)
            total_zero += weight / (zero * (depth - i))
        sums: NDArray[np.float64] = np.where(has_one, total_one, total_zero) * (depth + 1)
        return sums


class _Walk:
    def __init__(self, forest: Forest, start: int, x: NDArray[np.float64], phi: Any) -> None:
        self.forest, self.start, self.x, self.phi = forest, start, x, phi
        self.expected = 0.0

    def recurse(self, local: int, path: _Path, reach: float) -> None:
        forest, node = self.forest, self.start + local
        if forest.left[node] < 0:
            value = float(forest.value[node])
            self.expected += reach * value
            if len(path.features) > 1:
                # The features of a unique path are distinct: one row of phi each.
                scale = path.unwound_sums() * (path.ones[1:] - path.zeros[1:, None])
                self.phi[list(path.features[1:])] += scale * value
            return
        feature = int(forest.feature[node])
        cover = float(forest.cover[node])
        incoming_zero, incoming_one = 1.0, np.ones(len(self.x))
        if feature in path.features:
            index = path.features.index(feature)
            incoming_zero, incoming_one = float(path.zeros[index]), path.ones[index]
            path = path.unwind(index)
        left = goes_left(forest, np.full(len(self.x), node), self.x[:, feature])
        for child, hot in ((int(forest.left[node]), left), (int(forest.right[node]), ~left)):
            ratio = float(forest.cover[self.start + child]) / cover
            one = incoming_one * hot
            self.recurse(child, path.extend(ratio * incoming_zero, one, feature), reach * ratio)


# --- the FormatModel and ModelFormat ---------------------------------------------------------


class SklearnModel:
    """A scikit-learn tree ensemble, as its neutral forest file holds it (`FormatModel`).

    `predict_margins` scores the Forest in numpy: `model init` checked that scoring bit for bit
    against scikit-learn's own, and it shares no code with the native predictor it checks.
    `reference_engine` is `ForestTreeShap` on the same Forest, for the same reason: the
    framework is not installed where the service runs.
    """

    format = NAME

    def __init__(self, content: ForestFile) -> None:
        self.content = content
        self._forest = content.forest
        self.framework_version = content.framework_version
        self.n_features = self._forest.n_features
        self.n_outputs = self._forest.n_outputs
        self.objective = content.objective
        self.task = content.task
        self.link = content.link
        self.estimator = content.estimator
        self.classes = content.classes
        self.missing_values = content.missing_values

    def _names(self) -> tuple[str, ...]:
        return self.content.feature_names or tuple(f"f{j}" for j in range(self.n_features))

    def check_schema(self, schema: ModelSchema) -> None:
        """Raise InvalidModel naming how `schema` does not describe this model."""
        content = self.content
        if len(schema.features) != self.n_features:
            raise InvalidModel(
                f"the model has {self.n_features} features, the schema {len(schema.features)}"
            )
        if (
            content.feature_names is not None
            and tuple(schema.feature_names) != content.feature_names
        ):
            raise InvalidModel("feature names or order differ from the model's")
        for feature, labels in zip(schema.features, content.categories, strict=True):
            categorical = feature.type is FeatureType.CATEGORICAL
            if categorical != (labels is not None):
                kind = "categorical" if labels is not None else "numerical"
                raise InvalidModel(f"{feature.name!r} is {kind} in the model")
            if labels is not None and feature.categories != labels:
                raise InvalidModel(
                    f"categories of {feature.name!r} differ from the ones the model was trained "
                    "with (order matters: a position is a code)"
                )
        if schema.task is not self.task:
            raise InvalidModel(
                f"{self.estimator} is a {self.task.value} model, the schema says "
                f"{schema.task.value}"
            )
        if self.task is Task.MULTICLASS and schema.classes != self.classes:
            raise InvalidModel(
                f"the schema's classes {list(schema.classes)} are not the model's "
                f"{list(self.classes)} (order matters: a position is an output)"
            )
        if not self.missing_values:
            nullable = [f.name for f in schema.features if f.nullable]
            if nullable:
                raise InvalidModel(
                    f"{self.estimator} cannot score a missing value (scikit-learn refuses NaN), "
                    f"so every feature must be required: set nullable false for {nullable}"
                )

    def forest(self) -> Forest:
        return self._forest

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        return forest_margins(self._forest, x)

    def reference_engine(self) -> ForestTreeShap:
        return ForestTreeShap(self._forest)

    def describe(self) -> ModelDescription:
        names = self._names()
        return ModelDescription(
            task=self.task,
            feature_names=self.content.feature_names,
            categorical={
                name: labels
                for name, labels in zip(names, self.content.categories, strict=True)
                if labels is not None
            },
            n_classes=len(self.classes) if self.task is Task.MULTICLASS else 0,
            classes=self.classes,
            missing_values=self.missing_values,
        )


class SklearnForestFormat:
    """shapstream's forest files of scikit-learn models (the `ModelFormat`)."""

    name = NAME

    def recognises(self, data: bytes) -> bool:
        return _RECOGNISE.match(data[:256]) is not None

    def load(self, data: bytes) -> SklearnModel:
        return SklearnModel(ForestFile.from_bytes(data))


FORMAT: Final = SklearnForestFormat()


# --- conversion of a .skops file (model init: imports scikit-learn and skops) ---------------

_GB = "gradient boosting"
_HGB = "histogram gradient boosting"
_FOREST = "averaged forest"
_ESTIMATORS: Final = {
    "sklearn.ensemble._gb.GradientBoostingClassifier": _GB,
    "sklearn.ensemble._gb.GradientBoostingRegressor": _GB,
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting."
    "HistGradientBoostingClassifier": _HGB,
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting."
    "HistGradientBoostingRegressor": _HGB,
    "sklearn.ensemble._forest.RandomForestClassifier": _FOREST,
    "sklearn.ensemble._forest.RandomForestRegressor": _FOREST,
    "sklearn.ensemble._forest.ExtraTreesClassifier": _FOREST,
    "sklearn.ensemble._forest.ExtraTreesRegressor": _FOREST,
}
_TREES: Final = frozenset(
    {
        "sklearn.tree._classes.DecisionTreeClassifier",
        "sklearn.tree._classes.DecisionTreeRegressor",
        "sklearn.tree._classes.ExtraTreeClassifier",
        "sklearn.tree._classes.ExtraTreeRegressor",
    }
)
# Every type a .skops file of those estimators names, and nothing else: their trees, loss and
# link objects, the init estimator of GradientBoosting, HistGradientBoosting's binner,
# predictors and categorical preprocessor (a ColumnTransformer of an OrdinalEncoder and a
# FunctionTransformer calling check_array), random generators, numpy arrays and scalars.
_LOSSES = (
    "AbsoluteError", "ExponentialLoss", "HalfBinomialLoss", "HalfGammaLoss",
    "HalfMultinomialLoss", "HalfPoissonLoss", "HalfSquaredError", "HuberLoss", "PinballLoss",
)  # fmt: skip
_LINKS = (
    "HalfLogitLink", "IdentityLink", "Interval", "LogLink", "LogitLink", "MultinomialLogit",
)  # fmt: skip
_NUMPY = (
    "ndarray", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "str_",
)  # fmt: skip
_BUILTINS = ("dict", "list", "tuple", "set", "str", "int", "float", "bool", "slice")
ALLOWED_TYPES: Final = frozenset(
    {
        *_ESTIMATORS,
        *_TREES,
        "sklearn.tree._tree.Tree",
        "sklearn.dummy.DummyClassifier",
        "sklearn.dummy.DummyRegressor",
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.compose._column_transformer.ColumnTransformer",
        "sklearn.preprocessing._encoders.OrdinalEncoder",
        "sklearn.preprocessing._function_transformer.FunctionTransformer",
        "sklearn.preprocessing._label.LabelEncoder",
        "sklearn.utils.validation.check_array",
        "functools.partial",
        *(f"sklearn._loss.loss.{name}" for name in _LOSSES),
        *(f"sklearn._loss._loss.Cy{name}" for name in _LOSSES),
        *(f"sklearn._loss.link.{name}" for name in _LINKS),
        "numpy.random.mtrand.RandomState",
        "numpy.random._generator.Generator",
        *(f"numpy.{name}" for name in _NUMPY),
        *(f"builtins.{name}" for name in _BUILTINS),
    }
)
# skops node kinds those types are stored as. Not MethodNode (a bound method of anything),
# OperatorFuncNode, ReduceNode or any other way of calling code.
_ALLOWED_LOADERS: Final = frozenset(
    {
        "CachedNode", "DictNode", "FunctionNode", "JsonNode", "ListNode", "LossNode",
        "NdArrayNode", "ObjectNode", "PartialNode", "RandomGeneratorNode", "RandomStateNode",
        "SetNode", "SliceNode", "TreeNode", "TupleNode", "TypeNode",
    }
)  # fmt: skip
_CONSTANT_PRIORS: Final = frozenset({"prior", "most_frequent", "uniform", "constant"})
# Probe rows: at least this many, at most that many (each split value and its float32
# neighbours once, when they fit).
_MIN_PROBES: Final = 512
_MAX_PROBES: Final = 50_000
_F32_MAX: Final = float(np.finfo(np.float32).max)


def from_skops(path: Path | str) -> bytes:
    """The neutral forest file of the model in the .skops file at `path`.

    Raises InvalidModel (one line, naming the file) for a file that is not a .skops file,
    names a type outside `ALLOWED_TYPES`, holds no supported tree ensemble, or whose
    conversion does not reproduce scikit-learn's raw predictions bit for bit.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidModel(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        model = load_skops(data)
        content = convert(model, source_sha256=hashlib.sha256(data).hexdigest())
    except InvalidModel as exc:
        raise InvalidModel(f"{path}: {exc}") from None
    return content.to_bytes()


def skops_types(data: bytes) -> set[str]:
    """Every type (module.name) the .skops archive names, read from its schema as text."""
    if data[:1] == b"\x80":
        raise InvalidModel(
            "is a pickle, which is never loaded (unpickling runs code): save the model with "
            "skops.io.dump"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            schema = orjson.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, orjson.JSONDecodeError, OSError, ValueError):
        raise InvalidModel("is not a .skops file (save the model with skops.io.dump)") from None
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
            if "__loader__" not in item and "__class__" not in item:
                continue
            loader = item.get("__loader__")
            module, name = item.get("__module__"), item.get("__class__")
            if loader == "CachedNode" and module is None and name is None:
                continue  # refers to an object stored (and audited) elsewhere in the file
            kind = f"{module}.{name}"
            found.add(kind if loader in _ALLOWED_LOADERS else f"{kind} (as skops {loader})")
    return found


def load_skops(data: bytes) -> Any:
    """The estimator in a .skops file, loaded only if every type it names is allowed."""
    found = skops_types(data)
    untrusted = sorted(found - ALLOWED_TYPES)
    if untrusted:
        raise InvalidModel(
            f"holds types shapstream does not load: {', '.join(untrusted)} (it converts "
            "scikit-learn tree ensembles only, saved on their own, not in a pipeline)"
        )
    skops_io = _import("skops.io")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = skops_io.loads(data, trusted=sorted(found))
        # skops raises whatever a malformed file provokes; every one means "cannot load".
        except Exception as exc:  # noqa: BLE001
            raise InvalidModel(f"skops cannot load it: {_first_line(exc)}") from None
    for warning in caught:
        if warning.category.__name__ == "InconsistentVersionWarning":
            message = warning.message
            raise InvalidModel(
                f"was saved by scikit-learn {getattr(message, 'original_sklearn_version', '?')}"
                f", this is {getattr(message, 'current_sklearn_version', '?')}: convert it with "
                "the scikit-learn that trained it (its internals may differ)"
            )
    kind = _qualified(model)
    if kind not in _ESTIMATORS:
        supported = ", ".join(sorted(k.rsplit(".", 1)[1] for k in _ESTIMATORS))
        raise InvalidModel(f"holds a {kind}, not one of {supported}")
    return model


def convert(model: Any, *, source_sha256: str = "") -> ForestFile:
    """The model as a ForestFile, verified bit for bit against scikit-learn's raw predictions."""
    sklearn = _import("sklearn")
    kind = _qualified(model)
    family = _ESTIMATORS.get(kind)
    if family is None:
        raise InvalidModel(f"{kind} is not a supported tree ensemble")
    n_features = int(model.n_features_in_)
    names = getattr(model, "feature_names_in_", None)
    plan = {_GB: _gradient_boosting, _HGB: _hist_gradient_boosting, _FOREST: _averaged}[family](
        model, n_features
    )
    forest = plan.forest(n_features)
    problem = forest_problem(forest, allowed_flags=_SKLEARN_FLAGS)
    if problem:
        raise InvalidModel(f"its trees cannot be converted: {problem}")
    content = ForestFile(
        estimator=type(model).__name__,
        objective=plan.objective,
        task=plan.task,
        link=plan.link,
        framework_version=str(sklearn.__version__),
        feature_names=None if names is None else tuple(str(n) for n in names),
        categories=tuple(
            None if raw is None else _labels(raw, f"feature {j}")
            for j, raw in enumerate(plan.raw_categories)
        ),
        classes=plan.classes,
        missing_values=True,
        forest=forest,
        source_sha256=source_sha256,
    )
    _check_consistent(content)
    predict = _sklearn_margins(model, family, plan, n_features)
    missing = _accepts_nan(predict, n_features)
    probes = _probe_rows(forest, plan.raw_categories, missing)
    ours = forest_margins(forest, probes)
    theirs = predict(probes)
    if theirs.shape != ours.shape:
        raise InvalidModel(
            f"scikit-learn gives {theirs.shape[1]} raw scores a row, the forest {ours.shape[1]}"
        )
    differ = np.any(ours.view(np.int64) != theirs.view(np.int64), axis=1)
    if differ.any():
        gap = float(np.nanmax(np.abs(ours - theirs)))
        raise InvalidModel(
            f"the converted forest does not reproduce scikit-learn's raw predictions bit for "
            f"bit ({int(differ.sum())} of {len(probes)} probe rows differ, by up to {gap:.3g}): "
            "refusing the model"
        )
    return replace(content, missing_values=missing, verified_rows=len(probes))


@dataclass
class _Tree:
    """One tree in Forest layout, before concatenation (child indices within the tree)."""

    left: NDArray[np.int64]
    right: NDArray[np.int64]
    feature: NDArray[np.int64]
    threshold: NDArray[np.float64]
    flags: NDArray[np.int64]
    value: NDArray[np.float64]
    cover: NDArray[np.float64]
    output: int
    # Category sets of categorical nodes, by node.
    words: dict[int, NDArray[np.uint32]]


@dataclass
class _Plan:
    """What a family's converter read from the model."""

    trees: list[_Tree]
    base: list[float]
    divisor: float
    task: Task
    link: Link
    objective: str
    classes: tuple[str, ...]
    # Per feature (input order), the raw values its category codes stand for, or None.
    raw_categories: list[NDArray[Any] | None]
    n_outputs: int

    def forest(self, n_features: int) -> Forest:
        sizes = [len(t.left) for t in self.trees]
        tree_ptr = np.zeros(len(self.trees) + 1, dtype=np.int64)
        np.cumsum(sizes, out=tree_ptr[1:])
        counts = np.zeros(int(tree_ptr[-1]), dtype=np.int64)
        chunks: list[NDArray[np.uint32]] = []
        for t, tree in enumerate(self.trees):
            for node in sorted(tree.words):
                counts[tree_ptr[t] + node] = len(tree.words[node])
                chunks.append(tree.words[node])
        cat_ptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=cat_ptr[1:])

        def cat(key: str, dtype: type[np.generic]) -> NDArray[Any]:
            parts = [getattr(t, key) for t in self.trees]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        return Forest(
            n_features=n_features,
            n_outputs=self.n_outputs,
            tree_ptr=tree_ptr,
            tree_output=np.array([t.output for t in self.trees], dtype=np.int32),
            left=cat("left", np.int32),
            right=cat("right", np.int32),
            feature=cat("feature", np.int32),
            threshold=cat("threshold", np.float64),
            flags=cat("flags", np.uint8),
            cat_ptr=cat_ptr,
            cat_words=np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32),
            value=cat("value", np.float64),
            cover=cat("cover", np.float64),
            base=np.asarray(self.base, dtype=np.float64),
            accumulation=Accumulation.FLOAT64,
            divisor=self.divisor,
        )


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise InvalidModel(
            "converting a scikit-learn model needs scikit-learn and skops: "
            "pip install 'shapstream[sklearn]'"
        ) from None


def _qualified(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _label(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and math.isfinite(value):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    raise InvalidModel(f"a label {value!r} is neither text nor a finite number")


def _labels(values: Iterable[Any], what: str) -> tuple[str, ...]:
    labels = tuple(_label(v) for v in values)
    if len(set(labels)) != len(labels):
        raise InvalidModel(f"{what}'s labels {list(labels)} repeat once written as text")
    return labels


def _classes(model: Any) -> tuple[str, ...]:
    return _labels(np.asarray(model.classes_).tolist(), "the classes")


def _sk_tree(estimator: Any, n_features: int) -> tuple[NDArray[Any], ...]:
    """A fitted sklearn tree's arrays, checked before scikit-learn ever walks it."""
    if _qualified(estimator) not in _TREES:
        raise InvalidModel(f"holds a {_qualified(estimator)} where a decision tree belongs")
    tree = estimator.tree_
    if _qualified(tree) != "sklearn.tree._tree.Tree":
        raise InvalidModel(f"holds a {_qualified(tree)} where a tree belongs")
    if int(tree.n_outputs) != 1:
        raise InvalidModel("multi-output trees are not supported")
    if int(tree.n_features) != n_features:
        raise InvalidModel(f"a tree has {tree.n_features} features, the model {n_features}")
    count = int(tree.node_count)
    arrays = (
        np.asarray(tree.children_left, dtype=np.int64),
        np.asarray(tree.children_right, dtype=np.int64),
        np.asarray(tree.feature, dtype=np.int64),
        np.asarray(tree.threshold, dtype=np.float64),
        np.asarray(tree.missing_go_to_left, dtype=np.int64),
        np.asarray(tree.weighted_n_node_samples, dtype=np.float64),
        np.asarray(tree.value, dtype=np.float64),
    )
    if count <= 0 or any(len(a) != count for a in arrays):
        raise InvalidModel("a tree's node arrays do not match its node count")
    return arrays


def _from_sk_tree(
    arrays: tuple[NDArray[Any], ...], value: NDArray[np.float64], output: int
) -> _Tree:
    left, right, feature, threshold, missing_left, cover, _ = arrays
    leaf = left == -1
    flags = np.where(
        leaf, 0, NodeFlag.LESS_EQUAL | np.where(missing_left != 0, NodeFlag.DEFAULT_LEFT, 0)
    )
    return _Tree(
        left=np.where(leaf, -1, left),
        right=np.where(leaf, -1, right),
        feature=np.where(leaf, 0, feature),
        threshold=np.where(leaf, 0.0, threshold),
        flags=flags.astype(np.int64),
        value=np.where(leaf, value, 0.0),
        cover=cover,
        output=output,
        words={},
    )


def _gradient_boosting(model: Any, n_features: int) -> _Plan:
    loss = type(model._loss).__name__
    classifier = type(model).__name__.endswith("Classifier")
    classes: tuple[str, ...] = ()
    if classifier:
        classes = _classes(model)
        if loss == "HalfBinomialLoss" and len(classes) == 2:
            task, link = Task.BINARY, Link.SIGMOID
        elif loss == "HalfMultinomialLoss" and len(classes) > 2:
            task, link = Task.MULTICLASS, Link.SOFTMAX
        elif loss == "ExponentialLoss":
            raise InvalidModel(
                "loss='exponential' scores probabilities as sigmoid(2 * margin), which the "
                "service's links do not express: retrain with loss='log_loss'"
            )
        else:
            raise InvalidModel(f"loss {model.loss!r} ({loss}) with {len(classes)} classes")
    elif loss in {"HalfSquaredError", "AbsoluteError", "HuberLoss", "PinballLoss"}:
        task, link = Task.REGRESSION, Link.IDENTITY
    else:
        raise InvalidModel(f"loss {model.loss!r} ({loss}) is not supported")
    init = model.init_
    if not (isinstance(init, str) and init == "zero"):
        kind = _qualified(init)
        if kind not in {"sklearn.dummy.DummyClassifier", "sklearn.dummy.DummyRegressor"}:
            raise InvalidModel(
                f"init={type(init).__name__}: only the default (a DummyClassifier or "
                "DummyRegressor prior) or init='zero' gives a constant intercept"
            )
        if classifier and init.strategy not in _CONSTANT_PRIORS:
            raise InvalidModel(f"init DummyClassifier(strategy={init.strategy!r}) is not constant")
    estimators = model.estimators_
    n_outputs = len(classes) if task is Task.MULTICLASS else 1
    if not isinstance(estimators, np.ndarray) or estimators.ndim != 2:
        raise InvalidModel("estimators_ is not a 2-D array of trees")
    if estimators.shape[1] != n_outputs or estimators.shape[0] < 1:
        raise InvalidModel(
            f"estimators_ has shape {estimators.shape}, expected (stages, {n_outputs})"
        )
    scale = np.float64(model.learning_rate)
    trees = []
    for stage in estimators:
        for k, estimator in enumerate(stage):
            arrays = _sk_tree(estimator, n_features)
            if arrays[-1].shape[1:] != (1, 1):
                raise InvalidModel("a boosting tree does not hold one value per node")
            # predict_stages adds `scale * value` (one double product) to the raw score.
            trees.append(_from_sk_tree(arrays, scale * arrays[-1][:, 0, 0], k))
    # The init estimator's raw prediction (constant: it ignores the features), as sklearn
    # computes it.
    init_raw = np.asarray(
        model._raw_predict_init(np.zeros((2, n_features), dtype=np.float32)), dtype=np.float64
    )
    if init_raw.shape != (2, n_outputs) or not np.array_equal(init_raw[0], init_raw[1]):
        raise InvalidModel("the init estimator's raw prediction is not one constant per output")
    return _Plan(
        trees=trees,
        base=init_raw[0].tolist(),
        divisor=1.0,
        task=task,
        link=link,
        objective=str(model.loss),
        classes=classes,
        raw_categories=[None] * n_features,
        n_outputs=n_outputs,
    )


def _averaged(model: Any, n_features: int) -> _Plan:
    if int(model.n_outputs_) != 1:
        raise InvalidModel("multi-output forests are not supported")
    classifier = type(model).__name__.endswith("Classifier")
    classes: tuple[str, ...] = ()
    task, link = Task.REGRESSION, Link.IDENTITY
    if classifier:
        classes = _classes(model)
        if len(classes) < 2:
            raise InvalidModel("a classifier of fewer than two classes")
        task = Task.BINARY if len(classes) == 2 else Task.MULTICLASS
    estimators = list(model.estimators_)
    if not estimators:
        raise InvalidModel("the forest has no trees")
    trees = []
    for estimator in estimators:
        arrays = _sk_tree(estimator, n_features)
        value = arrays[-1]
        if classifier:
            if value.shape[1:] != (1, len(classes)):
                raise InvalidModel("a tree does not hold one probability per class")
            # Binary: the one output is P(classes[1]), as predict_proba[:, 1] sums it.
            for k in [1] if task is Task.BINARY else range(len(classes)):
                output = 0 if task is Task.BINARY else k
                trees.append(_from_sk_tree(arrays, value[:, 0, k], output))
        else:
            if value.shape[1:] != (1, 1):
                raise InvalidModel("a regression tree does not hold one value per node")
            trees.append(_from_sk_tree(arrays, value[:, 0, 0], 0))
    return _Plan(
        trees=trees,
        base=[0.0] * _outputs(task, len(classes)),
        # predict and predict_proba sum the trees, then divide by their number.
        divisor=float(len(estimators)),
        task=task,
        link=link,
        objective=str(model.criterion),
        classes=classes,
        raw_categories=[None] * n_features,
        n_outputs=_outputs(task, len(classes)),
    )


_HGB_LOSSES: Final = {
    "HalfSquaredError": Link.IDENTITY,
    "AbsoluteError": Link.IDENTITY,
    "PinballLoss": Link.IDENTITY,
    "HalfPoissonLoss": Link.EXP,
    "HalfGammaLoss": Link.EXP,
}


def _hist_gradient_boosting(model: Any, n_features: int) -> _Plan:
    loss = type(model._loss).__name__
    classes: tuple[str, ...] = ()
    if type(model).__name__.endswith("Classifier"):
        classes = _classes(model)
        if loss == "HalfBinomialLoss" and len(classes) == 2:
            task, link = Task.BINARY, Link.SIGMOID
        elif loss == "HalfMultinomialLoss" and len(classes) > 2:
            task, link = Task.MULTICLASS, Link.SOFTMAX
        else:
            raise InvalidModel(f"loss {model.loss!r} ({loss}) with {len(classes)} classes")
    elif loss in _HGB_LOSSES:
        task, link = Task.REGRESSION, _HGB_LOSSES[loss]
    else:
        raise InvalidModel(f"loss {model.loss!r} ({loss}) is not supported")
    n_outputs = _outputs(task, len(classes))
    if int(model.n_trees_per_iteration_) != n_outputs:
        raise InvalidModel("n_trees_per_iteration_ does not match the classes")
    base = np.asarray(model._baseline_prediction, dtype=np.float64).reshape(-1)
    if base.shape != (n_outputs,):
        raise InvalidModel("the baseline prediction does not have one value per output")
    order, raw_categories = _hgb_columns(model, n_features)
    categorical = np.zeros(n_features, dtype=bool)  # by transformed column
    known = np.zeros((0, _HGB_WORDS), dtype=np.uint32)
    column_of = np.zeros(n_features, dtype=np.int64)
    if model.is_categorical_ is not None:
        categorical = np.asarray(model._is_categorical_remapped, dtype=bool)
        binned = np.asarray(model._bin_mapper.is_categorical_, dtype=bool)
        known_sets, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
        known = np.asarray(known_sets, dtype=np.uint32)
        column_of = np.asarray(f_idx_map, dtype=np.int64)
        # scikit-learn indexes these by feature and by categorical feature unchecked.
        if (
            categorical.shape != (n_features,)
            or not np.array_equal(binned, categorical)
            or column_of.shape != (n_features,)
            or known.shape != (int(categorical.sum()), _HGB_WORDS)
        ):
            raise InvalidModel("the categorical bookkeeping does not match the features")
    trees = []
    for iteration in model._predictors:
        if len(iteration) != n_outputs:
            raise InvalidModel("an iteration does not hold one tree per output")
        for k, predictor in enumerate(iteration):
            trees.append(_hgb_tree(predictor, k, order, categorical, known, column_of))
    if not trees:
        raise InvalidModel("the model has no trees")
    return _Plan(
        trees=trees,
        base=base.tolist(),
        divisor=1.0,
        task=task,
        link=link,
        objective=str(model.loss),
        classes=classes,
        raw_categories=raw_categories,
        n_outputs=n_outputs,
    )


def _hgb_columns(model: Any, n: int) -> tuple[NDArray[np.int64], list[NDArray[Any] | None]]:
    """The input column of each transformed column, and each input column's raw categories.

    With categorical features, HistGradientBoosting's preprocessor puts them first (as
    OrdinalEncoder codes) and the numerical ones after.
    """
    mask = model.is_categorical_
    if mask is None:
        if model._preprocessor is not None:
            raise InvalidModel("a preprocessor without categorical features")
        return np.arange(n), [None] * n
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise InvalidModel("is_categorical_ does not have one entry per feature")
    preprocessor = model._preprocessor
    if _qualified(preprocessor) != "sklearn.compose._column_transformer.ColumnTransformer":
        raise InvalidModel("the categorical preprocessor is not HistGradientBoosting's own")
    steps = {name: (step, columns) for name, step, columns in preprocessor.transformers_}
    encoder, encoded = steps.get("encoder", (None, None))
    if _qualified(
        encoder
    ) != "sklearn.preprocessing._encoders.OrdinalEncoder" or not np.array_equal(
        np.asarray(encoded, dtype=bool), mask
    ):
        raise InvalidModel("the categorical preprocessor is not HistGradientBoosting's own")
    slices = preprocessor.output_indices_
    cats, nums = np.flatnonzero(mask), np.flatnonzero(~mask)
    if slices["encoder"] != slice(0, len(cats)) or (
        len(nums) and slices["numerical"] != slice(len(cats), n)
    ):
        raise InvalidModel("the categorical preprocessor does not put categories first")
    raw: list[NDArray[Any] | None] = [None] * n
    if len(encoder.categories_) != len(cats):
        raise InvalidModel("the encoder does not have categories for each categorical feature")
    for column, values in zip(cats, encoder.categories_, strict=True):
        values = np.asarray(values)
        # A NaN category (seen in training) is encoded as NaN: a missing value.
        if len(values) and _is_nan(values[-1]):
            values = values[:-1]
        if len(values) == 0 or len(values) > 255:
            raise InvalidModel(f"feature {column} has {len(values)} categories")
        raw[int(column)] = values
    return np.concatenate([cats, nums]).astype(np.int64), raw


def _is_nan(value: Any) -> bool:
    return isinstance(value, float | np.floating) and math.isnan(value)


_HGB_FIELDS: Final = (
    "value",
    "count",
    "feature_idx",
    "num_threshold",
    "missing_go_to_left",
    "left",
    "right",
    "is_leaf",
    "is_categorical",
    "bitset_idx",
)


def _hgb_tree(
    predictor: Any,
    output: int,
    order: NDArray[np.int64],
    categorical: NDArray[np.bool_],
    known: NDArray[np.uint32],
    column_of: NDArray[np.int64],
) -> _Tree:
    """One TreePredictor as a Forest tree, checked before scikit-learn ever walks it."""
    kind = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
    if _qualified(predictor) != kind:
        raise InvalidModel(f"holds a {_qualified(predictor)} where a TreePredictor belongs")
    nodes = predictor.nodes
    names = getattr(getattr(nodes, "dtype", None), "names", None) or ()
    if (
        not isinstance(nodes, np.ndarray)
        or nodes.ndim != 1
        or any(f not in names for f in _HGB_FIELDS)
    ):
        raise InvalidModel("a TreePredictor's nodes are not scikit-learn's node records")
    count = len(nodes)
    leaf = nodes["is_leaf"] != 0
    left = np.where(leaf, -1, nodes["left"].astype(np.int64))
    right = np.where(leaf, -1, nodes["right"].astype(np.int64))
    index = np.arange(count)
    if count == 0 or np.any(
        ~leaf & ((left <= index) | (right <= index) | (left >= count) | (right >= count))
    ):
        raise InvalidModel("a TreePredictor's child indices are out of range")
    transformed = nodes["feature_idx"].astype(np.int64)
    n_features = len(order)
    if np.any(~leaf & ((transformed < 0) | (transformed >= n_features))):
        raise InvalidModel("a TreePredictor splits on a feature the model does not have")
    feature = np.where(leaf, 0, order[np.where(leaf, 0, transformed)])
    is_cat = ~leaf & (nodes["is_categorical"] != 0)
    missing_left = nodes["missing_go_to_left"] != 0
    flags = np.where(
        is_cat,
        NodeFlag.CATEGORICAL
        | NodeFlag.CAT_IN_SET_LEFT
        | np.where(missing_left, NodeFlag.DEFAULT_LEFT | NodeFlag.CAT_OTHER_LEFT, 0),
        NodeFlag.LESS_EQUAL | np.where(missing_left, NodeFlag.DEFAULT_LEFT, 0),
    )
    words: dict[int, NDArray[np.uint32]] = {}
    if is_cat.any():
        sets = np.asarray(predictor.raw_left_cat_bitsets, dtype=np.uint32)
        if sets.ndim != 2 or sets.shape[1] != _HGB_WORDS:
            raise InvalidModel("a TreePredictor's category sets are not 8-word bitsets")
        for node in np.flatnonzero(is_cat):
            f, at = int(transformed[node]), int(nodes["bitset_idx"][node])
            if not categorical[f] or at >= len(sets):
                raise InvalidModel("a categorical split on a numerical feature or a missing set")
            # Codes in the set go left; other known codes right; unknown codes (past the
            # categories, within the bitset) the way of missing values.
            unknown = ~known[int(column_of[f])] if missing_left[node] else np.uint32(0)
            words[int(node)] = sets[at] | unknown
    return _Tree(
        left=left,
        right=right,
        feature=feature,
        threshold=np.where(leaf | is_cat, 0.0, nodes["num_threshold"].astype(np.float64)),
        flags=np.where(leaf, 0, flags).astype(np.int64),
        value=np.where(leaf, nodes["value"].astype(np.float64), 0.0),
        cover=nodes["count"].astype(np.float64),
        output=output,
        words=words,
    )


def _sklearn_margins(
    model: Any, family: str, plan: _Plan, n_features: int
) -> Callable[[FloatMatrix], NDArray[np.float64]]:
    """scikit-learn's own raw prediction of encoded rows, as (rows, outputs) float64."""
    names = getattr(model, "feature_names_in_", None)
    classifier = type(model).__name__.endswith("Classifier")
    if family == _FOREST:
        # One job: the trees are then summed in their order (threads would race to add).
        model = copy.copy(model)
        model.n_jobs = None

    def inputs(x: FloatMatrix) -> Any:
        columns: list[NDArray[Any]] = []
        for j in range(n_features):
            raw = plan.raw_categories[j]
            if raw is None:
                columns.append(np.array(x[:, j]))  # writable and contiguous, as fit had it
                continue
            values = np.full(len(x), np.nan, dtype=object)
            present = ~np.isnan(x[:, j])
            values[present] = raw[x[present, j].astype(np.int64)]
            columns.append(values)
        if names is not None:
            pandas = _import("pandas")
            return pandas.DataFrame(
                {str(name): column for name, column in zip(names, columns, strict=True)}
            )
        if all(raw is None for raw in plan.raw_categories):
            return np.ascontiguousarray(x)
        table = np.empty((len(x), n_features), dtype=object)
        for j, column in enumerate(columns):
            table[:, j] = column
        return table

    def predict(x: FloatMatrix) -> NDArray[np.float64]:
        given = inputs(x)
        # Its input check sums the rows: +-float32 max overflows there, harmlessly.
        with np.errstate(over="ignore", invalid="ignore"):
            return scores(given).reshape(len(x), -1)

    def scores(given: Any) -> NDArray[np.float64]:
        if family == _GB:
            raw = model.decision_function(given) if classifier else model.predict(given)
        elif family == _HGB:
            # One thread: OpenMP's start-up costs more than these rows (and a busy host
            # more still).
            raw = model._raw_predict(given, n_threads=1)
        elif classifier:
            raw = model.predict_proba(given)
            if plan.task is Task.BINARY:
                raw = raw[:, 1]
        else:
            raw = model.predict(given)
        return np.asarray(raw, dtype=np.float64)

    return predict


def _accepts_nan(predict: Callable[[FloatMatrix], Any], n_features: int) -> bool:
    """Whether scikit-learn scores a row of missing values (GradientBoosting refuses NaN)."""
    try:
        predict(np.full((1, n_features), np.nan, dtype=np.float32))
    except ValueError as exc:
        if "NaN" in str(exc):
            return False
        raise InvalidModel(f"scikit-learn cannot score with it: {_first_line(exc)}") from None
    return True


def _probe_rows(
    forest: Forest, raw_categories: Sequence[NDArray[Any] | None], missing: bool
) -> FloatMatrix:
    """Rows that take every split value and its float32 neighbours, every category code,
    random values and (when the model takes them) missing values."""
    rng = np.random.default_rng(20_250_601)
    internal = forest.left >= 0
    numerical = internal & ((forest.flags & NodeFlag.CATEGORICAL) == 0)
    pools: list[NDArray[np.float32]] = []
    for j, raw in enumerate(raw_categories):
        if raw is not None:
            pools.append(np.arange(len(raw), dtype=np.float32))
            continue
        splits = forest.threshold[numerical & (forest.feature == j)]
        splits = np.clip(splits[np.isfinite(splits)], -_F32_MAX, _F32_MAX).astype(np.float32)
        scale = 1.0 + float(np.abs(splits).max(initial=0.0))
        pool = np.concatenate(
            [
                splits,
                np.nextafter(splits, np.float32(-np.inf)),
                np.nextafter(splits, np.float32(np.inf)),
                np.array([0.0, -_F32_MAX, _F32_MAX], dtype=np.float32),
                (rng.standard_normal(64) * scale).astype(np.float32),
            ]
        )
        pools.append(np.unique(pool[np.isfinite(pool)]))
    n = min(max(_MIN_PROBES, max(len(p) for p in pools)), _MAX_PROBES)
    x = np.empty((n, len(pools)), dtype=np.float32)
    for j, pool in enumerate(pools):
        x[:, j] = pool[rng.permutation(np.resize(np.arange(len(pool)), n))]
    if missing:
        x[rng.random(x.shape) < 0.1] = np.nan
        x[0] = np.nan
    return x
