"""XGBoost models (JSON or UBJ files of a gbtree booster).

The file is checked in Python before xgboost parses it (`xgboost_file.py`: its C++ loader
aborts the process on some malformed files).

Routing as xgboost's CPU predictor: `x < split` goes left, NaN takes the default child, and
a categorical split sends the categories in its set right and invalid codes (negative, past
2**24 or past the stored bit field) left. Leaves are float32, added in float32, tree by tree,
to the intercept turned into a margin (ObjFunction::ProbToMargin, in float32).
"""

import itertools
import math
from typing import Any

import numpy as np
import orjson
import xgboost as xgb
from numpy.typing import NDArray

from service.core.engine.base import Contributions, FloatMatrix
from service.core.formats.base import (
    Accumulation,
    Forest,
    InvalidModel,
    Link,
    ModelDescription,
    NodeFlag,
    UnsupportedModel,
    check_task,
)
from service.core.formats.xgboost_file import InvalidModelFile, check_model_bytes
from service.core.schema import FeatureType, ModelSchema, Task

NAME = "xgboost"
# Objectives whose prediction is a known function of the single margin. Anything else
# (ranking, survival, hinge, multi-target) is refused at load rather than guessed.
_REGRESSION_LINKS: dict[str, Link] = {
    "reg:squarederror": Link.IDENTITY,
    "reg:absoluteerror": Link.IDENTITY,
    "reg:pseudohubererror": Link.IDENTITY,
    "reg:quantileerror": Link.IDENTITY,
    "reg:logistic": Link.SIGMOID,
    "count:poisson": Link.EXP,
    "reg:gamma": Link.EXP,
    "reg:tweedie": Link.EXP,
}
_BINARY_OBJECTIVES = frozenset({"binary:logistic", "binary:logitraw"})
_MULTICLASS_OBJECTIVES = frozenset({"multi:softprob", "multi:softmax"})

# How xgboost 3.x turns a stored intercept into a margin (ObjFunction::ProbToMargin).
# Objectives not listed are left to xgboost.
_LOGIT_INTERCEPT = frozenset({"binary:logistic", "reg:logistic"})
_LOG_INTERCEPT = frozenset({"count:poisson", "reg:gamma", "reg:tweedie"})
_PLAIN_INTERCEPT = frozenset(
    {
        "binary:logitraw",
        "reg:squarederror",
        "reg:squaredlogerror",
        "reg:absoluteerror",
        "reg:pseudohubererror",
        "reg:quantileerror",
        "multi:softprob",
        "multi:softmax",
    }
)
# xgboost's valid category codes are below 2**24 (common::Decision).
_MAX_CATEGORY = 1 << 24


def _floats(text: str) -> list[float]:
    """xgboost 3 writes base_score as "0.5", "[5E-1]" or "[a,b,c]"."""
    body = text.strip().removeprefix("[").removesuffix("]")
    return [float(v) for v in body.split(",") if v.strip()]


def intercept_margin(objective: str, score: float) -> float:
    """The stored intercept as a margin, in float32 as xgboost computes it."""
    one = np.float32(1.0)
    if objective in _LOGIT_INTERCEPT:
        if not 0.0 <= score <= 1.0:
            raise UnsupportedModel(f"base_score {score} is not a probability")
        # clipped to [1e-6, 1 - 1e-6] (kRtEps), then common::Logit: -logf(1/p - 1)
        p = np.clip(np.float32(score), np.float32(1e-6), one - np.float32(1e-6))
        return -_logf(one / p - one)
    if objective in _LOG_INTERCEPT:
        if score <= 0.0:
            raise UnsupportedModel(f"base_score {score} must be positive for {objective}")
        return _logf(np.float32(score))
    if objective in _PLAIN_INTERCEPT:
        return float(np.float32(score))
    raise UnsupportedModel(f"objective {objective!r} has no known intercept link")


def _logf(x: np.float32) -> float:
    """C's logf (correctly rounded in glibc), not numpy's float32 log, which can differ in the
    last bit: the log in double, rounded once to float32."""
    return float(np.float32(math.log(float(x))))


def forest_from_json(model_json: dict[str, Any]) -> Forest:
    """The booster's JSON (``save_raw("json")``, parsed) as a Forest.

    Raises UnsupportedModel for what the native engines cannot reproduce (gblinear, dart,
    vector-leaf trees, multi-target models, unknown intercept links, malformed documents).
    """
    try:
        return _forest(model_json)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        if isinstance(exc, UnsupportedModel):
            raise
        raise UnsupportedModel(f"unexpected model JSON: {exc!r}") from exc


def _forest(model_json: dict[str, Any]) -> Forest:
    learner = model_json["learner"]
    booster = learner["gradient_booster"]
    if booster.get("name") != "gbtree":
        raise UnsupportedModel(f"booster {booster.get('name')!r} is not supported (gbtree only)")
    params = learner["learner_model_param"]
    n_features = int(params["num_feature"])
    if n_features <= 0:
        raise UnsupportedModel("model has no features")
    if int(params.get("num_target", "1")) > 1:
        raise UnsupportedModel("multi-target models are not supported")
    n_outputs = max(int(params.get("num_class", "0")), 1)
    trees: list[dict[str, Any]] = booster["model"]["trees"]
    tree_info = [int(g) for g in booster["model"]["tree_info"]]
    if len(tree_info) != len(trees):
        raise UnsupportedModel("tree_info does not match the number of trees")
    if any(g < 0 or g >= n_outputs for g in tree_info):
        raise UnsupportedModel("tree_info names an output the model does not have")
    for tree in trees:
        if int(tree["tree_param"].get("size_leaf_vector", "1")) > 1:
            raise UnsupportedModel("multi-target (vector leaf) trees are not supported")
    objective = str(learner["objective"]["name"])
    scores = _floats(str(params["base_score"]))
    if len(scores) == 1:
        scores = scores * n_outputs
    if len(scores) != n_outputs:
        raise UnsupportedModel("base_score does not match the number of outputs")
    # xgboost leaves a not-yet-fitted intercept (no trees, to be estimated from the training
    # data) unlinked: Learner::InitModelUserParam, InitModelParam(..., false).
    linked = bool(trees) or int(params.get("boost_from_average", "1")) == 0
    base = [
        intercept_margin(objective, s) if linked else intercept_margin("reg:squarederror", s)
        for s in scores
    ]
    return _flatten(trees, n_features, n_outputs, tree_info, base)


def _concat(trees: list[dict[str, Any]], key: str, dtype: type[np.generic]) -> NDArray[Any]:
    if not trees:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(t[key], dtype=dtype) for t in trees])


def _flatten(
    trees: list[dict[str, Any]],
    n_features: int,
    n_outputs: int,
    tree_info: list[int],
    base: list[float],
) -> Forest:
    tree_ptr = np.zeros(len(trees) + 1, dtype=np.int64)
    np.cumsum([len(t["left_children"]) for t in trees], out=tree_ptr[1:])
    left = _concat(trees, "left_children", np.int32)
    feature = _concat(trees, "split_indices", np.int32)
    # float64 -> float32 is exact: xgboost prints float32 values round-trippably. A leaf's
    # split_condition is its value.
    conditions = _concat(trees, "split_conditions", np.float32).astype(np.float64)
    internal = left >= 0
    if internal.any() and (feature[internal].min() < 0 or feature[internal].max() >= n_features):
        raise UnsupportedModel("a split uses a feature index outside num_feature")
    categorical = _concat(trees, "split_type", np.int32) != 0
    flags = np.where(_concat(trees, "default_left", np.uint8) != 0, NodeFlag.DEFAULT_LEFT, 0)
    flags |= np.where(categorical, NodeFlag.CATEGORICAL | NodeFlag.CAT_OTHER_LEFT, 0)
    cat_ptr, cat_words = _category_sets(trees, tree_ptr, categorical)
    return Forest(
        n_features=n_features,
        n_outputs=n_outputs,
        tree_ptr=tree_ptr,
        tree_output=np.asarray(tree_info, dtype=np.int32),
        left=left,
        right=_concat(trees, "right_children", np.int32),
        feature=feature,
        threshold=conditions,
        flags=flags.astype(np.uint8),
        cat_ptr=cat_ptr,
        cat_words=cat_words,
        value=conditions,
        cover=_concat(trees, "sum_hessian", np.float32).astype(np.float64),
        base=np.asarray(base, dtype=np.float64),
        accumulation=Accumulation.FLOAT32,
    )


def _category_sets(
    trees: list[dict[str, Any]], tree_ptr: NDArray[np.int64], categorical: NDArray[np.bool_]
) -> tuple[NDArray[np.int64], NDArray[np.uint32]]:
    """Each categorical node's set as 32-bit words (bit c for code c), concatenated."""
    total = int(tree_ptr[-1])
    counts = np.zeros(total, dtype=np.int64)
    words_of: dict[int, list[int]] = {}
    for t, tree in enumerate(trees):
        values = tree.get("categories", [])
        for node, segment, size in zip(
            tree.get("categories_nodes") or [],
            tree.get("categories_segments", []),
            tree.get("categories_sizes", []),
            strict=True,
        ):
            # Plain ints: a node holds a handful of codes, numpy per node is slower.
            codes = [int(c) for c in values[segment : segment + size]]
            if codes and (min(codes) < 0 or max(codes) >= _MAX_CATEGORY):
                raise UnsupportedModel("category code outside xgboost's valid range")
            words = [0] * (max(codes) // 32 + 1 if codes else 0)
            for code in codes:
                words[code >> 5] |= 1 << (code & 31)
            index = int(tree_ptr[t]) + int(node)
            words_of[index] = words
            counts[index] = len(words)
    if any(int(i) not in words_of for i in np.flatnonzero(categorical)):
        raise UnsupportedModel("a categorical split has no category set in the model")
    cat_ptr = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(counts, out=cat_ptr[1:])
    cat_words = np.array([w for i in sorted(words_of) for w in words_of[i]], dtype=np.uint32)
    return cat_ptr, cat_words


def load_booster(model_bytes: bytes) -> xgb.Booster:
    """A booster from JSON or UBJ bytes, set to one thread (OpenMP oversubscription)."""
    booster = xgb.Booster(model_file=bytearray(model_bytes))
    booster.set_param({"nthread": 1})
    return booster


def booster_config(booster: xgb.Booster) -> dict[str, Any]:
    """The booster's learner configuration (objective, class and target counts)."""
    learner: dict[str, Any] = orjson.loads(booster.save_config())["learner"]
    return learner


def booster_json(booster: xgb.Booster) -> dict[str, Any]:
    """The booster's model as a JSON document (``save_raw("json")``, parsed)."""
    document: dict[str, Any] = orjson.loads(booster.save_raw("json"))
    return document


def booster_categories(
    booster: xgb.Booster, model_json: dict[str, Any] | None = None
) -> dict[str, tuple[str, ...]]:
    """Categories the booster stored (xgboost >= 3.1, trained from a DataFrame), by feature.

    The order is the training order, so a category's position is its code. Numeric
    categories are given as their decimal text. `model_json` saves parsing the booster
    again when the caller already has its `booster_json`.
    """
    if model_json is None:
        model_json = booster_json(booster)
    gradient_booster = model_json["learner"]["gradient_booster"]
    # dart nests its trees one level deeper than gbtree.
    trees = gradient_booster.get("gbtree", gradient_booster).get("model", {})
    encodings = trees.get("cats", {}).get("enc", [])
    names = booster.feature_names or [f"f{i}" for i in range(booster.num_features())]
    found: dict[str, tuple[str, ...]] = {}
    for name, enc in zip(names, encodings, strict=False):
        values = enc.get("values", [])
        if not values:
            continue
        if "offsets" in enc:
            raw = bytes(values)
            offsets = enc["offsets"]
            found[name] = tuple(raw[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets))
        else:
            found[name] = tuple(_number_label(v) for v in values)
    return found


def _number_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def task_for_objective(objective: str) -> Task:
    """The task an objective serves; raises InvalidModel for unsupported objectives."""
    if objective in _BINARY_OBJECTIVES:
        return Task.BINARY
    if objective in _MULTICLASS_OBJECTIVES:
        return Task.MULTICLASS
    if objective in _REGRESSION_LINKS:
        return Task.REGRESSION
    raise InvalidModel(f"objective {objective!r} is not supported")


def _link(task: Task, objective: str) -> Link:
    if task is Task.BINARY:
        return Link.SIGMOID
    if task is Task.MULTICLASS:
        return Link.SOFTMAX
    return _REGRESSION_LINKS[objective]


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (xgboost's carry a C++ stack trace)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class PredContribs:
    """XGBoost's own exact TreeSHAP (``predict(..., pred_contribs=True)``), one thread: the
    correctness reference for every engine on XGBoost models."""

    name = "pred_contribs"

    def __init__(self, booster: xgb.Booster) -> None:
        self._booster = booster
        self._names = booster.feature_names
        self._types = booster.feature_types
        self._categorical = self._types is not None and "c" in self._types

    def contributions(self, x: FloatMatrix) -> Contributions:
        """Attributions, shape (rows, outputs, features + 1), bias last."""
        # nthread=1: a DMatrix built with the default oversubscribes OpenMP in a busy process.
        matrix = xgb.DMatrix(
            x,
            feature_names=self._names,
            feature_types=self._types,
            enable_categorical=self._categorical,
            nthread=1,
        )
        values = self._booster.predict(matrix, pred_contribs=True, strict_shape=True)
        return np.asarray(values, dtype=np.float64)


class XgboostModel:
    """A gbtree booster (the `FormatModel` of XGBoost files)."""

    format = NAME

    def __init__(self, booster: xgb.Booster) -> None:
        self.booster = booster
        self._json = booster_json(booster)
        learner = booster_config(booster)
        params = learner["learner_model_param"]
        if int(params.get("num_target", "1")) != 1:
            raise InvalidModel("multi-target models are not supported")
        self.objective: str = learner["objective"]["name"]
        self.task = task_for_objective(self.objective)
        self.link = _link(self.task, self.objective)
        self.n_classes = int(params.get("num_class", "0"))
        self.n_features = booster.num_features()
        self.n_outputs = max(self.n_classes, 1)
        # The version of xgboost that wrote the file, as the file says.
        self.framework_version = ".".join(str(part) for part in self._json.get("version", []))

    def check_schema(self, schema: ModelSchema) -> None:
        """Raise InvalidModel naming how `schema` does not describe this booster."""
        self._check_features(schema)
        check_task(schema, self.task, self.objective, self.n_classes)

    def _check_features(self, schema: ModelSchema) -> None:
        booster = self.booster
        if booster.num_features() != len(schema.features):
            raise InvalidModel(
                f"the model has {booster.num_features()} features, the schema "
                f"{len(schema.features)}"
            )
        if booster.feature_names is not None and booster.feature_names != schema.feature_names:
            raise InvalidModel("feature names or order differ from the model's")
        types = booster.feature_types or ["q"] * booster.num_features()
        for feature, kind in zip(schema.features, types, strict=True):
            if (kind == "c") != (feature.type is FeatureType.CATEGORICAL):
                raise InvalidModel(f"{feature.name!r} is {kind!r} in the model")
        stored = booster_categories(booster, self._json)
        for feature in schema.features:
            if feature.name in stored and stored[feature.name] != feature.categories:
                raise InvalidModel(
                    f"categories of {feature.name!r} differ from the ones the model was trained "
                    "with (order matters: a position is a code)"
                )

    def forest(self) -> Forest:
        return forest_from_json(self._json)

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        # inplace_predict reads category codes like a DMatrix does and is about 2x faster for
        # one row (no DMatrix to build).
        try:
            margins = self.booster.inplace_predict(
                x, predict_type="margin", strict_shape=True, validate_features=False
            )
        except xgb.core.XGBoostError as exc:
            raise InvalidModel(f"xgboost cannot score with it: {_first_line(exc)}") from None
        return np.asarray(margins, dtype=np.float64).reshape(x.shape[0], self.n_outputs)

    def reference_engine(self) -> PredContribs:
        return PredContribs(self.booster)

    def describe(self) -> ModelDescription:
        count = self.booster.num_features()
        types = self.booster.feature_types or ["q"] * count
        names = self.booster.feature_names or [f"f{i}" for i in range(count)]
        stored = booster_categories(self.booster, self._json)
        return ModelDescription(
            task=self.task,
            feature_names=tuple(self.booster.feature_names or ()) or None,
            categorical={
                name: stored.get(name, ())
                for name, kind in zip(names, types, strict=True)
                if kind == "c"
            },
            n_classes=self.n_classes,
        )


class XgboostFormat:
    """XGBoost's JSON and UBJ model files (the `ModelFormat`)."""

    name = NAME

    def recognises(self, data: bytes) -> bool:
        # Both start with '{'; the other formats' files do not look like this one.
        return (data[:1] == b"{" and b'"learner"' in data[:4096]) or data[:2] == b"{L"

    def load(self, data: bytes) -> XgboostModel:
        try:
            # xgboost's C++ aborts the process on some malformed files: they stop here.
            check_model_bytes(data)
            booster = load_booster(data)
        except InvalidModelFile as exc:
            raise InvalidModel(str(exc)) from None
        except xgb.core.XGBoostError as exc:
            raise InvalidModel(f"cannot be loaded by xgboost: {_first_line(exc)}") from None
        try:
            return XgboostModel(booster)
        except xgb.core.XGBoostError as exc:
            raise InvalidModel(f"is refused by xgboost: {_first_line(exc)}") from None
        except ValueError as exc:  # xgboost wrote it back as JSON that does not parse
            if isinstance(exc, InvalidModel):
                raise
            raise InvalidModel(f"is not readable back from xgboost: {exc}") from None


FORMAT = XgboostFormat()
