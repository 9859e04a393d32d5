"""Turn any XGBoost model file into a model directory the registry can serve."""

import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import orjson
import xgboost as xgb

from service.core.model_file import InvalidModelFile, check_model_bytes
from service.core.registry import (
    InvalidModel,
    LoadedModel,
    booster_categories,
    booster_config,
    load_booster,
    task_for_objective,
)
from service.core.schema import SCHEMA_FILE, DecisionRule, Feature, FeatureType, ModelSchema, Task

MODEL_FILE = "model.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_model_dir(booster: xgb.Booster, schema: ModelSchema, dest_dir: Path) -> LoadedModel:
    """Write the booster (as JSON) and schema into `dest_dir`; return it loaded back."""
    model_bytes = bytes(booster.save_raw("json"))
    # Loading first checks the pair is servable before anything is written.
    loaded = LoadedModel(schema, model_bytes)
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / schema.model_file).write_bytes(model_bytes)
    schema_json = orjson.dumps(schema.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
    (dest_dir / SCHEMA_FILE).write_bytes(schema_json + b"\n")
    return loaded


def _features(
    booster: xgb.Booster,
    categories: Mapping[str, Sequence[str]],
    protected: Collection[str],
) -> tuple[Feature, ...]:
    count = booster.num_features()
    names = booster.feature_names or [f"f{i}" for i in range(count)]
    types = booster.feature_types or ["q"] * count
    stored = booster_categories(booster)
    unknown = set(categories).union(protected).difference(names)
    if unknown:
        raise InvalidModel(f"the model has no features named {sorted(unknown)}")
    features = []
    for name, kind in zip(names, types, strict=True):
        if kind != "c":
            features.append(
                Feature(name=name, type=FeatureType.NUMERIC, protected=name in protected)
            )
            continue
        labels = tuple(categories.get(name, ())) or stored.get(name, ())
        if not labels:
            # Code labels ("0", "1", ...) would be guesses about what the codes mean and
            # how many there are; an explanation service should not guess.
            raise InvalidModel(
                f"categorical feature {name!r}: the model file does not carry its categories "
                "(train from a pandas DataFrame with category dtype on xgboost >= 3.1, or "
                "pass them in code order, e.g. --categories cats.json)"
            )
        if name in stored and stored[name] != labels:
            raise InvalidModel(f"categories given for {name!r} differ from the model's own")
        features.append(
            Feature(
                name=name,
                type=FeatureType.CATEGORICAL,
                categories=labels,
                protected=name in protected,
            )
        )
    return tuple(features)


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
    """Make `dest_dir` a model directory from an XGBoost model file (JSON or UBJ)."""
    name = name or dest_dir.name
    if not _NAME.match(name):
        raise InvalidModel(f"{name!r} is not a valid model name: pass one (letters, digits, _.-)")
    if (dest_dir / SCHEMA_FILE).exists():
        raise InvalidModel(f"{dest_dir} already holds a model; choose an empty directory")
    try:
        model_bytes = model_file.read_bytes()
    except OSError as exc:
        raise InvalidModel(f"{model_file}: cannot be read: {exc.strerror}") from None
    try:
        # xgboost's C++ aborts the process on some malformed files: they stop here.
        check_model_bytes(model_bytes)
        booster = load_booster(model_bytes)
    except InvalidModelFile as exc:
        raise InvalidModel(f"{model_file} {exc}") from None
    except xgb.core.XGBoostError as exc:
        raise InvalidModel(f"{model_file} is not an XGBoost model file") from exc
    learner = booster_config(booster)
    task = task_for_objective(learner["objective"]["name"])
    num_class = int(learner["learner_model_param"].get("num_class", "0"))
    labels: tuple[str, ...] = ()
    if task is Task.MULTICLASS:
        labels = tuple(classes) if classes else tuple(str(k) for k in range(num_class))
    elif classes:
        raise InvalidModel("class labels are for multiclass models only")
    if task is Task.BINARY and decision is None:
        decision = DecisionRule()
    schema = ModelSchema(
        name=name,
        task=task,
        model_file=MODEL_FILE,
        features=_features(booster, categories or {}, protected),
        classes=labels,
        decision=decision if task is Task.BINARY else None,
        description=description,
    )
    write_model_dir(booster, schema, dest_dir)
    return schema
