"""Model directories, their content-hash versions, input encoding and scoring."""

import asyncio
import hashlib
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import xgboost as xgb
from numpy.typing import NDArray
from pydantic import ValidationError

from service.core.engine.base import FloatMatrix
from service.core.engine.fast import FastPredictor, UnsupportedModel
from service.core.model_file import InvalidModelFile, check_model_bytes
from service.core.records import (
    BinaryPrediction,
    ModelArtifact,
    MulticlassPrediction,
    RegressionPrediction,
)
from service.core.schema import SCHEMA_FILE, FeatureType, ModelSchema, Task
from service.settings import Settings

AnyPrediction = BinaryPrediction | RegressionPrediction | MulticlassPrediction
ArtifactLoader = Callable[[str], Awaitable[ModelArtifact | None]]

log = logging.getLogger(__name__)

_F32_MAX = float(np.finfo(np.float32).max)
# Listing the allowed categories helps a caller fix a request; past this many it is noise.
_MAX_LISTED_CATEGORIES = 12
# Rows scored by both the native predictor and xgboost before the native one is trusted.
_PROBE_ROWS = 384
_MAX_PROBE_ROWS = 4096


class ModelError(Exception):
    """A model directory, artifact or version that cannot be served."""


class InvalidModel(ModelError):
    """The model file and schema do not form a servable model."""


class UnknownModel(ModelError, LookupError):
    """No model (or model version) by that name is known."""


class NoDefaultModel(ModelError):
    """Several models are served and none is named the default."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """Why one input field was rejected; `row` is set for batch input."""

    field: str
    reason: str
    row: int | None = None


class InvalidFeatures(ValueError):
    """The input does not match the model's schema; `errors` names every bad field."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors: list[FieldError] = list(errors)
        super().__init__("; ".join(f"{e.field}: {e.reason}" for e in self.errors))


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """The valid rows of a batch, encoded, and why the others were rejected."""

    x: FloatMatrix
    rows: list[int]
    errors: dict[int, list[FieldError]] = field(default_factory=dict)


def canonical_schema_json(schema: ModelSchema) -> bytes:
    """The schema as sorted-key compact JSON: the form that is hashed and stored."""
    return orjson.dumps(schema.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


def model_version(model_bytes: bytes, schema: ModelSchema) -> str:
    """Content hash (sha256 hex) of the model file and the canonical schema."""
    digest = hashlib.sha256()
    # Length prefixes make the concatenation unambiguous.
    for part in (model_bytes, canonical_schema_json(schema)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


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


def _sigmoid(margin: float) -> float:
    # Split by sign so exp never overflows.
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    z = math.exp(margin)
    return z / (1.0 + z)


def _exp(margin: float) -> float:
    return math.exp(margin)


def _identity(margin: float) -> float:
    return margin


# Objectives whose prediction is a known function of the single margin. Anything else
# (ranking, survival, hinge, multi-target) is refused at load rather than guessed.
_REGRESSION_LINKS: dict[str, Callable[[float], float]] = {
    "reg:squarederror": _identity,
    "reg:absoluteerror": _identity,
    "reg:pseudohubererror": _identity,
    "reg:quantileerror": _identity,
    "reg:logistic": _sigmoid,
    "count:poisson": _exp,
    "reg:gamma": _exp,
    "reg:tweedie": _exp,
}
_BINARY_OBJECTIVES = frozenset({"binary:logistic", "binary:logitraw"})
_MULTICLASS_OBJECTIVES = frozenset({"multi:softprob", "multi:softmax"})


def check_objective(task: Task, objective: str, num_class: int, classes: int) -> None:
    """Refuse a schema task the booster's objective does not support."""
    if task is Task.BINARY and objective not in _BINARY_OBJECTIVES:
        raise InvalidModel(f"objective {objective!r} is not a binary classifier")
    if task is Task.REGRESSION and objective not in _REGRESSION_LINKS:
        supported = ", ".join(sorted(_REGRESSION_LINKS))
        raise InvalidModel(f"regression objective {objective!r} is not supported ({supported})")
    if task is Task.MULTICLASS:
        if objective not in _MULTICLASS_OBJECTIVES:
            raise InvalidModel(f"objective {objective!r} is not a multiclass classifier")
        if num_class != classes:
            raise InvalidModel(f"the model has {num_class} classes, the schema names {classes}")


def task_for_objective(objective: str) -> Task:
    """The task an objective serves; raises InvalidModel for unsupported objectives."""
    if objective in _BINARY_OBJECTIVES:
        return Task.BINARY
    if objective in _MULTICLASS_OBJECTIVES:
        return Task.MULTICLASS
    if objective in _REGRESSION_LINKS:
        return Task.REGRESSION
    raise InvalidModel(f"objective {objective!r} is not supported")


@dataclass(frozen=True, slots=True)
class _Column:
    """Precomputed encoding of one schema feature."""

    name: str
    codes: dict[str, float] | None
    minimum: float | None
    maximum: float | None
    nullable: bool
    unknown_reason: str


def _columns(schema: ModelSchema) -> tuple[_Column, ...]:
    columns = []
    for feature in schema.features:
        codes = None
        reason = ""
        if feature.type is FeatureType.CATEGORICAL:
            codes = {label: float(code) for code, label in enumerate(feature.categories)}
            reason = "unknown category"
            if len(feature.categories) <= _MAX_LISTED_CATEGORIES:
                reason += "; expected one of: " + ", ".join(feature.categories)
        columns.append(
            _Column(feature.name, codes, feature.minimum, feature.maximum, feature.nullable, reason)
        )
    return tuple(columns)


def _check_features(schema: ModelSchema, booster: xgb.Booster, model_json: dict[str, Any]) -> None:
    if booster.num_features() != len(schema.features):
        raise InvalidModel(
            f"the model has {booster.num_features()} features, the schema {len(schema.features)}"
        )
    if booster.feature_names is not None and booster.feature_names != schema.feature_names:
        raise InvalidModel("feature names or order differ from the model's")
    types = booster.feature_types or ["q"] * booster.num_features()
    for feature, kind in zip(schema.features, types, strict=True):
        if (kind == "c") != (feature.type is FeatureType.CATEGORICAL):
            raise InvalidModel(f"{feature.name!r} is {kind!r} in the model")
    stored = booster_categories(booster, model_json)
    for feature in schema.features:
        if feature.name in stored and stored[feature.name] != feature.categories:
            raise InvalidModel(
                f"categories of {feature.name!r} differ from the ones the model was trained "
                "with (order matters: a position is a code)"
            )


def _check_objective(schema: ModelSchema, booster: xgb.Booster) -> None:
    learner = booster_config(booster)
    params = learner["learner_model_param"]
    if int(params.get("num_target", "1")) != 1:
        raise InvalidModel("multi-target models are not supported")
    check_objective(
        schema.task,
        learner["objective"]["name"],
        int(params.get("num_class", "0")),
        len(schema.classes),
    )


class LoadedModel:
    """One model version in memory: schema, booster, encoder and scorer."""

    def __init__(self, schema: ModelSchema, model_bytes: bytes, *, source: str = "") -> None:
        """`source` names where the model file came from, in errors (default: the model's name)."""
        self.schema = schema
        self.name = schema.name
        self.model_bytes = model_bytes
        self.version = model_version(model_bytes, schema)
        where = source or f"{schema.name}: the model file"
        try:
            # xgboost's C++ aborts the process on some malformed files: they stop here.
            check_model_bytes(model_bytes)
            self.booster = load_booster(model_bytes)
        except InvalidModelFile as exc:
            raise InvalidModel(f"{where} {exc}") from None
        except xgb.core.XGBoostError as exc:
            raise InvalidModel(f"{where} cannot be loaded by xgboost: {_first_line(exc)}") from None
        try:
            # Parsed once per version: the schema checks and the native predictor share it.
            model_json = booster_json(self.booster)
            self._check_booster(model_json, source or schema.name)
            self._check_scores(source or schema.name)
            objective = booster_config(self.booster)["objective"]["name"]
        except xgb.core.XGBoostError as exc:
            # Loaded, yet xgboost refuses to use it (an intercept its objective cannot take).
            raise InvalidModel(f"{where} is refused by xgboost: {_first_line(exc)}") from None
        except ValueError as exc:  # xgboost wrote it back as JSON that does not parse
            raise InvalidModel(f"{where} is not readable back from xgboost: {exc}") from None
        self._columns = _columns(schema)
        self._names = frozenset(schema.feature_names)
        self._n = len(schema.features)
        self._link = _REGRESSION_LINKS.get(objective, _identity)
        self.native: FastPredictor | None = self._native_predictor(model_json)

    @classmethod
    def from_directory(cls, path: Path) -> "LoadedModel":
        """Load the model directory at `path` (schema.json and the model file it names)."""
        schema_file = path / SCHEMA_FILE
        try:
            schema = ModelSchema.model_validate_json(schema_file.read_bytes())
        except OSError as exc:
            raise InvalidModel(f"{schema_file}: cannot be read: {exc.strerror}") from None
        except ValidationError as exc:
            raise InvalidModel(f"{schema_file}: not a valid schema: {_errors(exc)}") from None
        model_file = path / schema.model_file
        try:
            model_bytes = model_file.read_bytes()
        except OSError as exc:
            raise InvalidModel(f"{model_file}: cannot be read: {exc.strerror}") from None
        return cls(schema, model_bytes, source=str(model_file))

    @classmethod
    def from_artifact(cls, artifact: ModelArtifact) -> "LoadedModel":
        """Load a stored version; raises InvalidModel unless it hashes to its version."""
        try:
            schema = ModelSchema.model_validate_json(artifact.schema_bytes)
        except ValueError as exc:
            raise InvalidModel(f"artifact {artifact.version}: invalid schema") from exc
        # Before xgboost sees the bytes: a version's content is known, anything else is refused.
        version = model_version(artifact.model_bytes, schema)
        if version != artifact.version or schema.name != artifact.name:
            raise InvalidModel(
                f"artifact {artifact.name}@{artifact.version} hashes to "
                f"{schema.name}@{version}: refusing a tampered or corrupt model"
            )
        return cls(schema, artifact.model_bytes, source=f"artifact {artifact.name}@{version[:12]}")

    def artifact(self) -> ModelArtifact:
        """This version as stored, so a worker can load it later by version."""
        return ModelArtifact(
            name=self.name,
            version=self.version,
            schema_bytes=canonical_schema_json(self.schema),
            model_bytes=self.model_bytes,
        )

    @property
    def outputs(self) -> int:
        """Margin columns per row (one per class for multiclass, else one)."""
        return self.schema.outputs

    def _check_booster(self, model_json: dict[str, Any], where: str) -> None:
        """Refuse a schema that does not describe this booster."""
        try:
            _check_features(self.schema, self.booster, model_json)
            _check_objective(self.schema, self.booster)
        except InvalidModel as exc:
            raise InvalidModel(f"{where}: {exc}") from None

    def _check_scores(self, where: str) -> None:
        """Refuse a model xgboost loads but cannot score (say, an intercept its link refuses),
        or that gives another number of margins a row than the schema's task: its every
        request would fail."""
        empty = np.full((1, self.booster.num_features()), np.nan, dtype=np.float32)
        try:
            margins = self.booster.inplace_predict(
                empty, predict_type="margin", strict_shape=True, validate_features=False
            )
        except xgb.core.XGBoostError as exc:
            raise InvalidModel(
                f"{where}: xgboost cannot score with it: {_first_line(exc)}"
            ) from None
        if np.asarray(margins).size != self.outputs:
            raise InvalidModel(
                f"{where}: the model gives {np.asarray(margins).size} margins a row, a "
                f"{self.schema.task.value} model {self.outputs}"
            )

    def _encode_row(
        self, features: Mapping[str, object], values: list[float], row: int | None
    ) -> list[FieldError]:
        """Encode into `values`; return the errors (empty when the row is valid)."""
        errors: list[FieldError] = []
        for i, col in enumerate(self._columns):
            encoded = _encode_value(col, features.get(col.name, _ABSENT))
            if isinstance(encoded, str):
                errors.append(FieldError(col.name, encoded, row))
            else:
                values[i] = encoded
        if len(features) != self._n or errors:
            # Only look for unknown names when the count says there are some (hot path).
            errors.extend(
                FieldError(name, "unknown feature", row)
                for name in features
                if name not in self._names
            )
        return errors

    def encode(self, features: Mapping[str, object]) -> NDArray[np.float32]:
        """One request as a float32 row; raises InvalidFeatures naming every bad field."""
        values = [math.nan] * self._n
        errors = self._encode_row(features, values, None)
        if errors:
            raise InvalidFeatures(errors)
        return np.array(values, dtype=np.float32)

    def encode_batch(self, rows: Sequence[Mapping[str, object]]) -> EncodedBatch:
        """Encode the valid rows into one C-contiguous matrix; collect the others' errors."""
        encoded: list[list[float]] = []
        kept: list[int] = []
        errors: dict[int, list[FieldError]] = {}
        for index, features in enumerate(rows):
            values = [math.nan] * self._n
            row_errors = self._encode_row(features, values, index)
            if row_errors:
                errors[index] = row_errors
            else:
                encoded.append(values)
                kept.append(index)
        x = np.array(encoded, dtype=np.float32).reshape(len(encoded), self._n)
        return EncodedBatch(x, kept, errors)

    def encode_many(self, rows: Sequence[Mapping[str, object]]) -> FloatMatrix:
        """All rows as a float32 matrix; raises InvalidFeatures naming every bad field."""
        batch = self.encode_batch(rows)
        if batch.errors:
            raise InvalidFeatures([e for row in batch.errors.values() for e in row])
        return batch.x

    def _native_predictor(self, model_json: dict[str, Any]) -> FastPredictor | None:
        """The native margin predictor, if it reproduces the booster bit for bit.

        Checked on synthetic rows (every category, unseen and invalid codes, NaN, values
        on both sides of every split) against ``inplace_predict``; otherwise None, and
        `predict_margins` keeps calling xgboost.
        """
        where = f"{self.name}@{self.version[:12]}"
        try:
            native = FastPredictor.from_json(model_json)
            if native.n_outputs != self.outputs or native.n_features != self._n:
                raise UnsupportedModel("its outputs or features differ from the schema's")
            why = native.mismatch(self.booster, _probe_rows(self.schema, native))
        except UnsupportedModel as exc:
            why = str(exc)
        except xgb.core.XGBoostError as exc:  # xgboost refused a probe row
            why = f"xgboost could not score the probe rows: {exc}"
        if why is not None:
            log.warning("%s: scoring with xgboost, not the native predictor: %s", where, why)
            return None
        log.info("%s: scoring with the native predictor (bit-exact with xgboost)", where)
        return native

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        """Raw margins, shape (rows, outputs)."""
        native = self.native
        if native is not None:
            # Bitwise identical to inplace_predict (checked at load), without xgboost's
            # per-call overhead. TypeError: not a float32 matrix of the model's width.
            try:
                return native.predict_margins(x)
            except TypeError:
                pass
        # inplace_predict reads category codes like a DMatrix does and is about 2x
        # faster for one row (no DMatrix to build).
        margins = self.booster.inplace_predict(
            x, predict_type="margin", strict_shape=True, validate_features=False
        )
        return np.asarray(margins, dtype=np.float64).reshape(x.shape[0], self.outputs)

    def prediction(self, margins: Sequence[float] | NDArray[np.floating[Any]]) -> AnyPrediction:
        """The served prediction for one row's margins."""
        schema = self.schema
        if schema.task is Task.BINARY:
            assert schema.decision is not None  # the schema validator guarantees it
            margin = float(margins[0])
            probability = _sigmoid(margin)
            deny = probability >= schema.decision.deny_at_or_above
            return BinaryPrediction(
                probability=probability, margin=margin, decision="deny" if deny else "approve"
            )
        if schema.task is Task.REGRESSION:
            margin = float(margins[0])
            return RegressionPrediction(value=self._link(margin), margin=margin)
        values = [float(m) for m in margins]
        top = max(values)
        weights = [math.exp(m - top) for m in values]
        total = sum(weights)
        best = values.index(top)
        return MulticlassPrediction(
            label=schema.classes[best],
            probabilities={c: w / total for c, w in zip(schema.classes, weights, strict=True)},
            margins_by_class=dict(zip(schema.classes, values, strict=True)),
        )

    def predict(self, features: Mapping[str, object]) -> AnyPrediction:
        """Validate, encode and score one request."""
        row = self.encode(features)
        return self.prediction(self.predict_margins(row.reshape(1, -1))[0])


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (xgboost's carry a C++ stack trace)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _errors(exc: ValidationError, limit: int = 3) -> str:
    """A schema's validation errors on one line: where, and what is wrong."""
    found = [
        f"{'.'.join(str(part) for part in error['loc']) or 'document'}: {error['msg']}"
        for error in exc.errors()[:limit]
    ]
    more = exc.error_count() - len(found)
    return "; ".join(found) + (f" (and {more} more)" if more > 0 else "")


def _probe_rows(schema: ModelSchema, native: FastPredictor) -> FloatMatrix:
    """Synthetic rows that exercise every routing rule of the model.

    Categorical features take every category code (each at least once, never masked)
    plus unseen, negative, fractional and out-of-range codes; numerical features take
    each split condition and its float32 neighbours, the schema's bounds, zero,
    infinities and random values. About a tenth of the other values are NaN.
    """
    rng = np.random.default_rng(20_240_229)
    widest = max((len(f.categories) for f in schema.features), default=0)
    pools: dict[int, NDArray[np.float32]] = {}
    for j, feature in enumerate(schema.features):
        if feature.type is FeatureType.CATEGORICAL:
            continue
        splits = native.split_values(j)
        finite = splits[np.isfinite(splits)]
        scale = 1.0 + float(np.abs(finite).max(initial=0.0))
        bounds = [b for b in (feature.minimum, feature.maximum) if b is not None]
        pools[j] = np.concatenate(
            [
                splits,
                np.nextafter(splits, np.float32(-np.inf)),
                np.nextafter(splits, np.float32(np.inf)),
                np.array([0.0, -0.0, np.inf, -np.inf], dtype=np.float32),
                np.clip(np.array(bounds, dtype=np.float64), -_F32_MAX, _F32_MAX).astype(np.float32),
                (rng.standard_normal(32) * scale).astype(np.float32),
            ]
        )
    largest_pool = max((len(p) for p in pools.values()), default=0)
    n = max(2 * widest + 32, min(max(_PROBE_ROWS, largest_pool), _MAX_PROBE_ROWS))
    x = np.empty((n, len(schema.features)), dtype=np.float32)
    for j, pool in pools.items():
        x[:, j] = pool[rng.permutation(np.resize(np.arange(len(pool)), n))]
    x[rng.random(x.shape) < 0.1] = np.nan
    for j, feature in enumerate(schema.features):
        if feature.type is not FeatureType.CATEGORICAL:
            continue
        k = len(feature.categories)
        x[k:, j] = rng.integers(0, max(k, 1), n - k)
        x[rng.random(n) < 0.1, j] = np.nan
        x[:k, j] = (np.arange(k) + j) % k  # every category, NaN-free
        odd = np.array([k, k + 1, k + 40, -1.0, 0.5, k - 0.5, 2.0**24, 1e9], dtype=np.float32)
        x[rng.choice(np.arange(k, n), size=len(odd), replace=False), j] = odd
    return x


class _Absent:
    """Marks a feature the request did not carry (unlike an explicit null)."""


_ABSENT: Any = _Absent()


def _encode_value(col: _Column, value: object) -> float | str:
    """The float the booster reads for `value`, or why `value` is not acceptable."""
    if value is None:
        return math.nan if col.nullable else "must not be null"
    if value is _ABSENT:
        return "missing"
    if col.codes is not None:
        code = col.codes.get(value) if isinstance(value, str) else None
        return col.unknown_reason if code is None else code
    # bool is an int subclass, but `true` is no amount of anything.
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "must be a number"
    try:
        number = float(value)
    except OverflowError:
        return "must be a finite number"
    if not math.isfinite(number) or abs(number) > _F32_MAX:
        return "must be a finite number"
    if col.minimum is not None and number < col.minimum:
        return f"must be >= {col.minimum:g}"
    if col.maximum is not None and number > col.maximum:
        return f"must be <= {col.maximum:g}"
    return number


def model_dirs(models_dir: Path) -> list[Path]:
    """The model directories under `models_dir` (those holding a schema.json), by name."""
    return sorted(p for p in models_dir.iterdir() if (p / SCHEMA_FILE).is_file())


def load_model_dirs(
    dirs: Iterable[Path], before_each: Callable[[Path], None] | None = None
) -> list[LoadedModel]:
    """Every directory loaded; raises InvalidModel naming each one that cannot be served."""
    models: list[LoadedModel] = []
    problems: list[str] = []
    for directory in dirs:
        if before_each is not None:
            before_each(directory)
        try:
            models.append(LoadedModel.from_directory(directory))
        except InvalidModel as exc:
            problems.append(str(exc))
    if problems:
        # Each directory must load: fix the one named, or move it out of the models directory.
        raise InvalidModel("; ".join(problems))
    return models


def default_model_of(names: Collection[str], default_model: str | None) -> str | None:
    """The model a request without `model` gets: the one named, else the only one served.

    Never the first by name: adding a model must not change where requests go. With more than
    one model the default must be named (SHAPSTREAM_DEFAULT_MODEL), or NoDefaultModel.
    """
    served = ", ".join(sorted(names)) or "none"
    if default_model is not None:
        if default_model not in names:
            raise UnknownModel(
                f"SHAPSTREAM_DEFAULT_MODEL={default_model!r} is not a served model (served: "
                f"{served})"
            )
        return default_model
    if len(names) > 1:
        raise NoDefaultModel(
            f"{len(names)} models are served ({served}) and SHAPSTREAM_DEFAULT_MODEL is not "
            "set: set it to the model a request without `model` gets"
        )
    return next(iter(names), None)


class ModelRegistry:
    """The active version of each model, plus older versions loaded on demand for workers."""

    def __init__(
        self,
        models: Iterable[LoadedModel],
        *,
        default_model: str | None = None,
        cache_size: int = 8,
    ) -> None:
        self._active: dict[str, LoadedModel] = {}
        for model in models:
            if model.name in self._active:
                raise InvalidModel(f"two model directories are named {model.name!r}")
            self._active[model.name] = model
        self._by_version = {m.version: m for m in self._active.values()}
        self._default = default_model_of(self._active.keys(), default_model)
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._cache_size = cache_size
        self._load_lock = asyncio.Lock()

    @classmethod
    def scan(
        cls, models_dir: Path, *, default_model: str | None = None, cache_size: int = 8
    ) -> "ModelRegistry":
        """Load every model directory of `models_dir`; refuse if any one cannot be served.

        A broken directory is a deployment error: serving the others would answer its
        callers with "unknown model" (or another model, were it the default) until someone
        reads the log, so nothing is served and the error names each broken directory.
        """
        models = load_model_dirs(model_dirs(models_dir))
        return cls(models, default_model=default_model, cache_size=cache_size)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelRegistry":
        """The registry the settings describe."""
        return cls.scan(
            settings.models_dir,
            default_model=settings.default_model,
            cache_size=settings.worker.model_cache,
        )

    def models(self) -> list[LoadedModel]:
        """The active version of every model, by name."""
        return [self._active[name] for name in sorted(self._active)]

    @property
    def default_name(self) -> str | None:
        """The model served when a request names none (None when no model is loaded)."""
        return self._default

    def active(self, name: str | None = None) -> LoadedModel:
        """The active version of `name` (the default model when None)."""
        if name is None:
            if self._default is None:
                raise UnknownModel("no model is loaded")
            name = self._default
        try:
            return self._active[name]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}") from None

    def known_version(self, version: str) -> LoadedModel | None:
        """A version already in memory, if any."""
        model = self._by_version.get(version)
        if model is not None:
            return model
        model = self._cache.get(version)
        if model is not None:
            self._cache.move_to_end(version)
        return model

    async def get_version(self, version: str, loader: ArtifactLoader) -> LoadedModel:
        """The exact version `version`, loaded through `loader` when not in memory."""
        model = self.known_version(version)
        if model is not None:
            return model
        # Loads are rare (an older version after a deploy); one at a time keeps it simple
        # and stops concurrent batches from loading the same version twice.
        async with self._load_lock:
            model = self.known_version(version)
            if model is not None:
                return model
            artifact = await loader(version)
            if artifact is None:
                raise UnknownModel(f"model version {version} is not in the store")
            if artifact.version != version:
                raise InvalidModel(f"asked for version {version}, got {artifact.version}")
            model = await asyncio.to_thread(LoadedModel.from_artifact, artifact)
            self._cache[version] = model
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return model
