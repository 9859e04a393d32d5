"""Model directories, their content-hash versions, input encoding and scoring."""

import asyncio
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import ValidationError

from service.core.engine.base import FloatMatrix
from service.core.engine.fast import FastPredictor
from service.core.formats.base import (
    Forest,
    FormatModel,
    InvalidModel,
    Link,
    ModelError,
    UnsupportedModel,
)
from service.core.formats.files import load_model_file
from service.core.population.reference import REFERENCE_FILE, Reference
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
# Rows scored by both the native predictor and the framework before the native one is trusted.
_PROBE_ROWS = 384
_MAX_PROBE_ROWS = 4096


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


_LINKS: dict[Link, Callable[[float], float]] = {
    Link.IDENTITY: _identity,
    Link.SIGMOID: _sigmoid,
    Link.EXP: _exp,
}


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


class LoadedModel:
    """One model version in memory: schema, the framework's model, encoder and scorer."""

    def __init__(self, schema: ModelSchema, model_bytes: bytes, *, source: str = "") -> None:
        """`source` names where the model file came from, in errors (default: the model's name)."""
        self.schema = schema
        self.name = schema.name
        self.model_bytes = model_bytes
        self.version = model_version(model_bytes, schema)
        where = source or f"{schema.name}: the model file"
        try:
            self.framework: FormatModel = load_model_file(model_bytes)
        except InvalidModel as exc:
            raise InvalidModel(f"{where} {exc}") from None
        try:
            self.framework.check_schema(schema)
            self._check_scores()
        except InvalidModel as exc:
            raise InvalidModel(f"{source or schema.name}: {exc}") from None
        self._columns = _columns(schema)
        self._names = frozenset(schema.feature_names)
        self._n = len(schema.features)
        self._link = _LINKS.get(self.framework.link, _identity)
        self._forest: Forest | UnsupportedModel | None = None
        # The population reference shipped in the model's directory (`model init --reference`),
        # stored for the version at start (service/core/population/reference.py).
        self.reference: bytes | None = None
        self.native: FastPredictor | None = self._native_predictor()

    @property
    def format(self) -> str:
        """The framework that trained it ("xgboost", "lightgbm", "sklearn")."""
        return self.framework.format

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
        model = cls(schema, model_bytes, source=str(model_file))
        model.reference = _reference_file(path / REFERENCE_FILE)
        return model

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

    def _check_scores(self) -> None:
        """Refuse a model its framework loads but cannot score (say, an intercept its link
        refuses), or that gives another number of margins a row than the schema's task: its
        every request would fail."""
        empty = np.full((1, self.framework.n_features), np.nan, dtype=np.float32)
        margins = self.framework.predict_margins(empty)
        if margins.size != self.outputs:
            raise InvalidModel(
                f"the model gives {margins.size} margins a row, a "
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

    def forest(self) -> Forest:
        """The trees in the native engines' layout (built once); raises UnsupportedModel."""
        if self._forest is None:
            try:
                self._forest = self.framework.forest()
            except UnsupportedModel as exc:
                self._forest = exc
        if isinstance(self._forest, UnsupportedModel):
            raise self._forest
        return self._forest

    def _native_predictor(self) -> FastPredictor | None:
        """The native margin predictor, if it reproduces the framework's bit for bit.

        Checked on synthetic rows (every category, NaN, values on both sides of every split)
        against the framework's own scoring; otherwise None, and `predict_margins` keeps
        calling the framework.
        """
        where = f"{self.name}@{self.version[:12]}"
        framework = self.framework.format
        try:
            native = FastPredictor(self.forest())
            if native.n_outputs != self.outputs or native.n_features != self._n:
                raise UnsupportedModel("its outputs or features differ from the schema's")
            probe = _probe_rows(self.schema, native)
            why = native.mismatch(self.framework.predict_margins(probe), probe)
        except (UnsupportedModel, InvalidModel) as exc:
            why = str(exc)
        if why is not None:
            log.warning("%s: scoring with %s, not the native predictor: %s", where, framework, why)
            return None
        log.info("%s: scoring with the native predictor (bit-exact with %s)", where, framework)
        return native

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        """Raw margins, shape (rows, outputs)."""
        native = self.native
        if native is not None:
            # Bitwise identical to the framework's (checked at load), without its per-call
            # overhead. TypeError: not a float32 matrix of the model's width.
            try:
                return native.predict_margins(x)
            except TypeError:
                pass
        return self.framework.predict_margins(x)

    def prediction(self, margins: Sequence[float] | NDArray[np.floating[Any]]) -> AnyPrediction:
        """The served prediction for one row's margins."""
        schema = self.schema
        if schema.task is Task.BINARY:
            assert schema.decision is not None  # the schema validator guarantees it
            margin = float(margins[0])
            # A log-odds margin, or (averaging forests) the probability itself.
            probability = self._link(margin)
            deny = probability >= schema.decision.deny_at_or_above
            return BinaryPrediction(
                probability=probability, margin=margin, decision="deny" if deny else "approve"
            )
        if schema.task is Task.REGRESSION:
            margin = float(margins[0])
            return RegressionPrediction(value=self._link(margin), margin=margin)
        values = [float(m) for m in margins]
        top = max(values)
        # Softmax of margins, or (averaging forests) the class probabilities themselves.
        softmax = self.framework.link is Link.SOFTMAX
        weights = [math.exp(m - top) for m in values] if softmax else values
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
        # float64 thresholds (LightGBM, scikit-learn) as the float32 rows can hold them: the
        # nearest float32 and its neighbours on both sides, where a row's route turns.
        splits = np.clip(native.split_values(j), -_F32_MAX, _F32_MAX).astype(np.float32)
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
    """The float the model reads for `value`, or why `value` is not acceptable."""
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


def _reference_file(path: Path) -> bytes | None:
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidModel(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        Reference.from_bytes(blob)
    except (ValueError, KeyError) as exc:
        raise InvalidModel(f"{path}: not a shapstream reference ({exc})") from None
    return blob


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


DEFAULT_MODEL_FILE = "default-model"


def named_default(models_dir: Path, default_model: str | None) -> str | None:
    """The default model the deployment names: `default_model` (SHAPSTREAM_DEFAULT_MODEL),
    else the name in the models directory's `default-model` file, else none."""
    if default_model is not None:
        return default_model
    try:
        named = (models_dir / DEFAULT_MODEL_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{models_dir / DEFAULT_MODEL_FILE}: cannot be read: {exc}") from None
    return named or None


def default_model_of(names: Collection[str], default_model: str | None) -> str | None:
    """The model a request without `model` gets: the one named, else the only one served.

    Never the first by name: adding a model must not change where requests go. With more than
    one model the default must be named (SHAPSTREAM_DEFAULT_MODEL, or the models directory's
    `default-model` file), or NoDefaultModel.
    """
    served = ", ".join(sorted(names)) or "none"
    if default_model is not None:
        if default_model not in names:
            raise UnknownModel(
                f"the default model {default_model!r} (SHAPSTREAM_DEFAULT_MODEL, else the "
                f"models directory's {DEFAULT_MODEL_FILE} file) is not a served model "
                f"(served: {served})"
            )
        return default_model
    if len(names) > 1:
        raise NoDefaultModel(
            f"{len(names)} models are served ({served}) and none is named the default: set "
            f"SHAPSTREAM_DEFAULT_MODEL, or write its name in the models directory's "
            f"{DEFAULT_MODEL_FILE} file"
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
        default = named_default(models_dir, default_model)
        return cls(models, default_model=default, cache_size=cache_size)

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
