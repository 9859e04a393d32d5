"""Turn a model file of any supported format into a model directory the registry serves."""

import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import orjson

from service.core.formats import sklearn
from service.core.formats.base import FormatModel, InvalidModel, ModelDescription
from service.core.formats.files import load_model_file
from service.core.formats.xgboost import XgboostModel
from service.core.registry import LoadedModel
from service.core.schema import SCHEMA_FILE, DecisionRule, Feature, FeatureType, ModelSchema, Task

# The file each format's model is written as inside the directory.
MODEL_FILES = {"xgboost": "model.json", "lightgbm": "model.txt", "sklearn": "model.forest.json"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ZIP = b"PK\x03\x04"


def write_model_dir(model_bytes: bytes, schema: ModelSchema, dest_dir: Path) -> LoadedModel:
    """Write the model file and schema into `dest_dir`; return it loaded back."""
    # Loading first checks the pair is servable before anything is written.
    loaded = LoadedModel(schema, model_bytes)
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / schema.model_file).write_bytes(model_bytes)
    schema_json = orjson.dumps(schema.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
    (dest_dir / SCHEMA_FILE).write_bytes(schema_json + b"\n")
    return loaded


def _features(
    model: ModelDescription,
    n_features: int,
    categories: Mapping[str, Sequence[str]],
    protected: Collection[str],
) -> tuple[Feature, ...]:
    names = model.feature_names or tuple(f"f{i}" for i in range(n_features))
    unknown = set(categories).union(protected).difference(names)
    if unknown:
        raise InvalidModel(f"the model has no features named {sorted(unknown)}")
    features = []
    for name in names:
        if name not in model.categorical:
            features.append(
                Feature(
                    name=name,
                    type=FeatureType.NUMERIC,
                    nullable=model.missing_values,
                    protected=name in protected,
                )
            )
            continue
        stored = model.categorical[name]
        labels = tuple(categories.get(name, ())) or stored
        if not labels:
            # Code labels ("0", "1", ...) would be guesses about what the codes mean and
            # how many there are; an explanation service should not guess.
            raise InvalidModel(
                f"categorical feature {name!r}: the model file does not carry its categories "
                "(train from a pandas DataFrame with category dtype, or pass them in code "
                "order, e.g. --categories cats.json)"
            )
        if stored and stored != labels:
            raise InvalidModel(f"categories given for {name!r} differ from the model's own")
        features.append(
            Feature(
                name=name,
                type=FeatureType.CATEGORICAL,
                categories=labels,
                nullable=model.missing_values,
                protected=name in protected,
            )
        )
    return tuple(features)


def _served_bytes(model_file: Path) -> bytes:
    """The bytes a model directory keeps for `model_file`.

    A .skops archive (a zip) of a scikit-learn ensemble is converted into a forest file: it is
    never unpickled, and the service serves the forest without scikit-learn.
    """
    try:
        data = model_file.read_bytes()
    except OSError as exc:
        raise InvalidModel(f"{model_file}: cannot be read: {exc.strerror}") from None
    if data.startswith(_ZIP):
        return sklearn.from_skops(model_file)
    return data


def _normalised(framework: FormatModel, model_bytes: bytes) -> bytes:
    # XGBoost's UBJ is kept as JSON: one readable file name and form for every XGBoost model.
    if isinstance(framework, XgboostModel):
        return bytes(framework.booster.save_raw("json"))
    return model_bytes


def init_model_dir(
    model_file: Path,
    dest_dir: Path,
    name: str | None = None,
    *,
    classes: Sequence[str] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    decision: DecisionRule | None = None,
    protected: Collection[str] = (),
    description: str = "",
) -> ModelSchema:
    """Make `dest_dir` a model directory from a model file: XGBoost (JSON or UBJ), LightGBM
    (text), or a scikit-learn ensemble converted to a forest file."""
    name = name or dest_dir.name
    if not _NAME.match(name):
        raise InvalidModel(f"{name!r} is not a valid model name: pass one (letters, digits, _.-)")
    if (dest_dir / SCHEMA_FILE).exists():
        raise InvalidModel(f"{dest_dir} already holds a model; choose an empty directory")
    model_bytes = _served_bytes(model_file)
    try:
        framework = load_model_file(model_bytes)
    except InvalidModel as exc:
        raise InvalidModel(f"{model_file} {exc}") from None
    described = framework.describe()
    task = described.task
    labels: tuple[str, ...] = ()
    stored = described.classes
    if task is Task.MULTICLASS:
        numbers = tuple(str(k) for k in range(described.n_classes))
        labels = tuple(classes) if classes else stored or numbers
    elif classes:
        raise InvalidModel("class labels are for multiclass models only")
    if task is Task.BINARY and decision is None:
        # The probability served is that of the model's last class, when it names its classes.
        decision = (
            DecisionRule(negative_class=stored[0], positive_class=stored[1])
            if stored
            else DecisionRule()
        )
    schema = ModelSchema(
        name=name,
        task=task,
        model_file=MODEL_FILES[framework.format],
        features=_features(described, framework.n_features, categories or {}, protected),
        classes=labels,
        decision=decision if task is Task.BINARY else None,
        description=description,
    )
    write_model_dir(_normalised(framework, model_bytes), schema, dest_dir)
    return schema
