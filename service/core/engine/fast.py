"""shapstream's own exact path-dependent TreeSHAP engine for XGBoost models.

The model is parsed once from ``booster.save_raw("json")`` into flat arrays; the compiled
kernel (``_native/treeshap.c``) then extracts every leaf's root path (distinct features,
their cover ratios), tabulates the path's SHAP weights over all 2^d subsets of "row
follows the path" patterns, and evaluates whole batches in native code, one thread per
call. Missing values follow the default direction and categorical splits test set
membership exactly as xgboost routes them, so the values equal
``Booster.predict(DMatrix, pred_contribs=True)`` up to float rounding.

`FastPredictor` reuses the same parsed model for raw margins that are bitwise identical
to ``Booster.inplace_predict(x, predict_type="margin")``: the intercept turned into a
margin and every tree's leaf added in float32, in tree order, as xgboost's CPU predictor
does.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.core.engine.base import Contributions, FloatMatrix

__all__ = ["BuildStats", "FastPredictor", "FastTreeShap", "ParsedModel", "UnsupportedModel"]

ENGINE_NAME = "shapstream"
# Leaves with more distinct path features than this are evaluated without tables.
DEFAULT_DMAX = 12
# Upper bound on the precomputed tables; dmax is lowered until the model fits.
DEFAULT_TABLE_LIMIT_BYTES = 2 * 1024**3

# binary:logitraw keeps its intercept as given (xgboost applies no link to it).
_LOGIT_OBJECTIVES = frozenset({"binary:logistic", "reg:logistic"})
_LOG_OBJECTIVES = frozenset({"count:poisson", "reg:gamma", "reg:tweedie", "survival:cox"})


class UnsupportedModel(ValueError):
    """The booster cannot be explained by this engine; fall back to ``pred_contribs``."""


@dataclass(frozen=True, slots=True)
class BuildStats:
    """What loading one model version cost (seconds, bytes of native memory)."""

    json_seconds: float
    parse_seconds: float
    precompute_seconds: float
    memory_bytes: int
    trees: int
    leaves: int
    table_entries: int
    direct_leaves: int
    dmax: int


def _native() -> Any:
    try:
        from service.core.engine._native import _treeshap
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise UnsupportedModel(
            "the compiled TreeSHAP kernel is not built (run `pip install -e .`)"
        ) from exc
    return _treeshap


def _floats(text: str) -> list[float]:
    """xgboost 3 writes base_score as "0.5", "[5E-1]" or "[a,b,c]"."""
    body = text.strip().removeprefix("[").removesuffix("]")
    return [float(v) for v in body.split(",") if v.strip()]


def _margin(objective: str, score: float) -> float:
    if objective in _LOGIT_OBJECTIVES:
        if not 0.0 <= score <= 1.0:
            raise UnsupportedModel(f"base_score {score} is not a probability")
        # xgboost clips the intercept to [1e-6, 1 - 1e-6] and takes the logit in float32
        one = np.float32(1.0)
        p = np.clip(np.float32(score), np.float32(1e-6), one - np.float32(1e-6))
        return float(-np.log(one / p - one))
    if objective in _LOG_OBJECTIVES:
        if score <= 0.0:
            raise UnsupportedModel(f"base_score {score} must be positive for {objective}")
        return math.log(score)
    return score


class _Flat:
    """All trees' nodes concatenated, in the layout the kernel's build() takes."""

    def __init__(self, trees: list[dict[str, Any]], n_features: int) -> None:
        n = [len(t["left_children"]) for t in trees]
        self.tree_ptr = np.zeros(len(trees) + 1, dtype=np.int64)
        np.cumsum(n, out=self.tree_ptr[1:])
        total = int(self.tree_ptr[-1])

        def cat(key: str, dtype: type[np.generic]) -> NDArray[Any]:
            if not trees:
                return np.zeros(0, dtype=dtype)
            return np.concatenate([np.asarray(t[key], dtype=dtype) for t in trees])

        self.left = cat("left_children", np.int32)
        self.right = cat("right_children", np.int32)
        self.feat = cat("split_indices", np.int32)
        # float64 -> float32 is exact: xgboost prints float32 values round-trippably.
        thr32 = cat("split_conditions", np.float32)
        self.thr = thr32
        self.value = thr32.astype(np.float64)  # a leaf's split_condition is its value
        self.cover = cat("sum_hessian", np.float32).astype(np.float64)
        self.dleft = cat("default_left", np.uint8)
        self.iscat = (cat("split_type", np.int32) != 0).astype(np.uint8)
        if total and (self.feat.min() < 0 or self.feat.max() >= n_features):
            leaf = self.left < 0
            bad = ((self.feat < 0) | (self.feat >= n_features)) & ~leaf
            if bad.any():
                raise UnsupportedModel("a split uses a feature index outside num_feature")
        counts = np.zeros(total, dtype=np.int64)
        node_words: dict[int, list[int]] = {}
        for ti, t in enumerate(trees):
            nodes = t.get("categories_nodes") or []
            if not nodes:
                continue
            values = t["categories"]
            for nid, seg, size in zip(
                nodes, t["categories_segments"], t["categories_sizes"], strict=True
            ):
                # Plain ints: a node holds a handful of codes, numpy per node is slower.
                codes = [int(c) for c in values[seg : seg + size]]
                if codes and (min(codes) < 0 or max(codes) >= 1 << 24):
                    raise UnsupportedModel("category code outside xgboost's valid range")
                nwords = max(codes) // 32 + 1 if codes else 0
                bits = [0] * nwords
                for c in codes:
                    bits[c >> 5] |= 1 << (c & 31)
                gid = int(self.tree_ptr[ti]) + int(nid)
                node_words[gid] = bits
                counts[gid] = nwords
        cat_nodes = np.flatnonzero(self.iscat)
        missing = [int(g) for g in cat_nodes if int(g) not in node_words]
        if missing:
            raise UnsupportedModel("a categorical split has no category set in the model")
        self.cat_ptr = np.zeros(total + 1, dtype=np.int64)
        np.cumsum(counts, out=self.cat_ptr[1:])
        self.cat_words = np.array(
            [w for gid in sorted(node_words) for w in node_words[gid]], dtype=np.uint32
        )


class ParsedModel:
    """One booster's JSON, checked and flattened once; the engines built from it share it."""

    def __init__(self, model_json: dict[str, Any]) -> None:
        learner = model_json["learner"]
        gb = learner["gradient_booster"]
        booster_name = gb.get("name")
        if booster_name != "gbtree":
            raise UnsupportedModel(f"booster {booster_name!r} is not supported (gbtree only)")
        params = learner["learner_model_param"]
        self.n_features = int(params["num_feature"])
        n_class = int(params.get("num_class", "0"))
        self.n_targets = int(params.get("num_target", "1"))
        self.n_outputs = max(n_class, self.n_targets, 1)
        model = gb["model"]
        trees: list[dict[str, Any]] = model["trees"]
        tree_info = [int(g) for g in model["tree_info"]]
        if len(tree_info) != len(trees):
            raise UnsupportedModel("tree_info does not match the number of trees")
        for t in trees:
            if int(t["tree_param"].get("size_leaf_vector", "1")) > 1:
                raise UnsupportedModel("multi-target (vector leaf) trees are not supported")
        if any(g < 0 or g >= self.n_outputs for g in tree_info):
            raise UnsupportedModel("tree_info names an output the model does not have")
        if self.n_features <= 0:
            raise UnsupportedModel("model has no features")
        self.objective = str(learner["objective"]["name"])
        scores = _floats(str(params["base_score"]))
        if len(scores) == 1:
            scores = scores * self.n_outputs
        if len(scores) != self.n_outputs:
            raise UnsupportedModel("base_score does not match the number of outputs")
        # The intercept as stored (probability space for logistic objectives).
        self.base_score = scores
        self.n_trees = len(trees)
        # xgboost leaves a not-yet-fitted intercept (no trees, to be estimated from the
        # training data) unlinked: Learner::InitModelUserParam, InitModelParam(..., false).
        self.intercept_linked = bool(trees) or int(params.get("boost_from_average", "1")) == 0
        self.tree_info = np.asarray(tree_info, dtype=np.int32)
        self.flat = _Flat(trees, self.n_features)

    @classmethod
    def from_booster(cls, booster: Any) -> ParsedModel:
        """Parse an ``xgboost.Booster``'s JSON. Raises `UnsupportedModel` when it cannot."""
        return cls.from_json(_booster_json(booster))

    @classmethod
    def from_json(cls, model_json: dict[str, Any]) -> ParsedModel:
        """Check and flatten a model JSON document. Raises `UnsupportedModel`."""
        try:
            return cls(model_json)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            if isinstance(exc, UnsupportedModel):
                raise
            raise UnsupportedModel(f"unexpected model JSON: {exc!r}") from exc


def _booster_json(booster: Any) -> dict[str, Any]:
    gc_was_enabled = gc.isenabled()
    gc.disable()  # json.loads of a big model otherwise triggers many full collections
    try:
        raw = booster.save_raw("json")
        model_json: dict[str, Any] = json.loads(bytes(raw))
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsupportedModel(f"cannot read the booster as JSON: {exc}") from exc
    finally:
        if gc_was_enabled:
            gc.enable()
    return model_json


class FastTreeShap:
    """Exact path-dependent TreeSHAP of one XGBoost model version (the `Engine` protocol)."""

    name: str = ENGINE_NAME

    def __init__(
        self,
        model_json: dict[str, Any] | ParsedModel,
        *,
        dmax: int = DEFAULT_DMAX,
        table_limit_bytes: int = DEFAULT_TABLE_LIMIT_BYTES,
        json_seconds: float = 0.0,
    ) -> None:
        t0 = time.perf_counter()
        parsed = model_json if isinstance(model_json, ParsedModel) else ParsedModel(model_json)
        self.n_features = parsed.n_features
        self.n_outputs = parsed.n_outputs
        self.objective = parsed.objective
        base = np.array([_margin(self.objective, v) for v in parsed.base_score], dtype=np.float64)
        flat = parsed.flat
        tree_info = parsed.tree_info
        t1 = time.perf_counter()
        native = _native()
        cap: Any = None
        while True:
            try:
                cap = native.build(
                    self.n_features,
                    self.n_outputs,
                    dmax,
                    table_limit_bytes,
                    flat.tree_ptr,
                    tree_info,
                    flat.left,
                    flat.right,
                    flat.feat,
                    flat.thr,
                    flat.dleft,
                    flat.iscat,
                    flat.cat_ptr,
                    flat.cat_words,
                    flat.value,
                    flat.cover,
                    base,
                )
                break
            except ValueError as exc:
                if "memory limit" in str(exc) and dmax > 0:
                    dmax -= 1
                    continue
                raise UnsupportedModel(str(exc)) from exc
        t2 = time.perf_counter()
        self._cap = cap
        self._native = native
        info = native.info(cap)
        self.stats = BuildStats(
            json_seconds=json_seconds,
            parse_seconds=t1 - t0,
            precompute_seconds=t2 - t1,
            memory_bytes=int(info["bytes"]),
            trees=int(info["trees"]),
            leaves=int(info["leaves"]),
            table_entries=int(info["table_entries"]),
            direct_leaves=int(info["direct_leaves"]),
            dmax=dmax,
        )

    @classmethod
    def from_booster(
        cls,
        booster: Any,
        *,
        dmax: int = DEFAULT_DMAX,
        table_limit_bytes: int = DEFAULT_TABLE_LIMIT_BYTES,
        verify: bool = True,
    ) -> FastTreeShap:
        """Parse an ``xgboost.Booster`` once. Raises `UnsupportedModel` when it cannot.

        With ``verify`` the expected value is checked against the booster's own margin on
        an all-missing row (catches objectives whose base_score transform is unknown).
        """
        t0 = time.perf_counter()
        model_json = _booster_json(booster)
        try:
            engine = cls(
                model_json,
                dmax=dmax,
                table_limit_bytes=table_limit_bytes,
                json_seconds=time.perf_counter() - t0,
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise UnsupportedModel(f"unexpected model JSON: {exc!r}") from exc
        if verify:
            engine._verify_margin(booster)
        return engine

    def _verify_margin(self, booster: Any) -> None:
        import xgboost as xgb

        probe = np.full((1, self.n_features), np.nan, dtype=np.float32)
        ours = self.contributions(probe).sum(axis=2).reshape(-1)
        theirs = np.asarray(
            booster.predict(
                xgb.DMatrix(probe, missing=np.nan), output_margin=True, validate_features=False
            ),
            dtype=np.float64,
        ).reshape(-1)
        if theirs.shape != ours.shape:
            raise UnsupportedModel("model outputs do not match the booster's margin shape")
        gap = np.abs(theirs - ours)
        if np.any(gap > 1e-5 * (1.0 + np.abs(theirs))):
            raise UnsupportedModel(
                f"expected value does not reproduce the booster's margin "
                f"(objective {self.objective}, gap {float(gap.max()):.3g})"
            )

    @property
    def expected_value(self) -> NDArray[np.float64]:
        """Bias per output (margin space)."""
        return np.asarray(self._native.bias(self._cap), dtype=np.float64)

    def contributions(self, x: FloatMatrix) -> Contributions:
        """Attributions in margin space, shape (rows, outputs, features + 1), bias last."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (rows, {self.n_features}), got {tuple(x.shape)}")
        xc = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((xc.shape[0], self.n_outputs, self.n_features + 1), dtype=np.float64)
        if xc.shape[0]:
            self._native.shap(self._cap, xc, out)
        return out


# How xgboost 3.x turns a stored intercept into a margin (ObjFunction::ProbToMargin):
# 1 = -logf(1/p - 1) with p clipped to [1e-6, 1 - 1e-6], 2 = logf(p), 0 = unchanged.
# Objectives not listed are left to xgboost.
_PREDICT_LINKS: dict[str, int] = {
    "binary:logistic": 1,
    "reg:logistic": 1,
    "count:poisson": 2,
    "reg:gamma": 2,
    "reg:tweedie": 2,
    "binary:logitraw": 0,
    "reg:squarederror": 0,
    "reg:squaredlogerror": 0,
    "reg:absoluteerror": 0,
    "reg:pseudohubererror": 0,
    "reg:quantileerror": 0,
    "multi:softprob": 0,
    "multi:softmax": 0,
}


class FastPredictor:
    """Raw margins bitwise identical to ``inplace_predict(x, predict_type="margin")``.

    Starts every output at the intercept (in margin space, computed in float32 as xgboost
    does) and adds each tree's leaf in float32, in tree order, to the output its tree_info
    names; rows are routed like xgboost (``x < split`` goes left, NaN takes the default
    child, categorical splits by set membership). Single-threaded.
    """

    def __init__(self, parsed: ParsedModel) -> None:
        link = _PREDICT_LINKS.get(parsed.objective)
        if link is None:
            raise UnsupportedModel(f"objective {parsed.objective!r} has no known intercept link")
        if parsed.n_targets > 1:
            raise UnsupportedModel("multi-target models are not supported")
        if not parsed.intercept_linked:
            link = 0
        self.n_features = parsed.n_features
        self.n_outputs = parsed.n_outputs
        self.objective = parsed.objective
        flat = parsed.flat
        native = _native()
        try:
            self._cap = native.predictor(
                self.n_features,
                self.n_outputs,
                link,
                flat.tree_ptr,
                parsed.tree_info,
                flat.left,
                flat.right,
                flat.feat,
                flat.thr,
                flat.dleft,
                flat.iscat,
                flat.cat_ptr,
                flat.cat_words,
                np.asarray(parsed.base_score, dtype=np.float32),
            )
        except ValueError as exc:
            raise UnsupportedModel(str(exc)) from exc
        self._predict = native.predict
        self._native = native
        # Numerical split conditions by feature, for probes that hit every boundary.
        numeric = (flat.left >= 0) & (flat.iscat == 0)
        self._splits = {
            int(f): np.unique(flat.thr[numeric & (flat.feat == f)])
            for f in np.unique(flat.feat[numeric])
        }

    @classmethod
    def from_booster(cls, booster: Any) -> FastPredictor:
        """Parse an ``xgboost.Booster`` once. Raises `UnsupportedModel` when it cannot."""
        return cls(ParsedModel.from_booster(booster))

    @classmethod
    def from_json(cls, model_json: dict[str, Any]) -> FastPredictor:
        """From the booster's ``save_raw("json")`` document, already loaded."""
        return cls(ParsedModel.from_json(model_json))

    @property
    def base_margin(self) -> NDArray[np.float32]:
        """The intercept per output in margin space, as xgboost computes it."""
        return np.asarray(self._native.predictor_base(self._cap), dtype=np.float32)

    def split_values(self, feature: int) -> NDArray[np.float32]:
        """The distinct numerical split conditions on `feature` (possibly none)."""
        return self._splits.get(feature, np.zeros(0, dtype=np.float32))

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        """Raw margins, shape (rows, outputs): float32 values held in float64.

        Raises TypeError unless `x` is a float32 (rows, features) matrix.
        """
        out = np.empty((len(x), self.n_outputs), dtype=np.float64)
        try:
            self._predict(self._cap, x, out)
        except (TypeError, ValueError, BufferError):
            if x.dtype != np.float32 or x.ndim != 2 or x.flags.c_contiguous:
                raise TypeError(
                    f"x must be float32 (rows, {self.n_features}), got {x.dtype} {x.shape}"
                ) from None
            self._predict(self._cap, np.ascontiguousarray(x), out)
        return out

    def mismatch(self, booster: Any, x: FloatMatrix) -> str | None:
        """Why the margins of `x` differ from the booster's in any bit, or None."""
        theirs = np.asarray(
            booster.inplace_predict(
                x, predict_type="margin", strict_shape=True, validate_features=False
            ),
            dtype=np.float32,
        )
        if theirs.size != len(x) * self.n_outputs:
            return f"xgboost returned shape {theirs.shape}"
        theirs = theirs.reshape(len(x), self.n_outputs)
        ours = self.predict_margins(x).astype(np.float32)
        differ = ours.view(np.uint32) != theirs.view(np.uint32)
        if not differ.any():
            return None
        row, col = (int(i) for i in np.argwhere(differ)[0])
        return (
            f"{int(differ.sum())} of {differ.size} margins differ "
            f"(row {row}, output {col}: {ours[row, col]!r} != {theirs[row, col]!r})"
        )
