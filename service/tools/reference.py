"""Building a model version's population reference from a sample (the validation set).

Each row is decided and explained exactly as production decisions are (the same encoder, the
same engine, the same reasons), so the reference and production are comparable bin for bin.
"""

import csv
import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from service.core.explain import explain_batch
from service.core.formats.base import InvalidModel
from service.core.population.reference import REFERENCE_FILE, Reference, reference_of_records
from service.core.records import DecisionEvent, ModelRef
from service.core.registry import LoadedModel
from service.core.schema import FeatureType, ModelSchema
from workers.explainer import choose_engine

# The reference's decisions carry this moment: they were never decided in production.
REFERENCE_TIME = datetime(2000, 1, 1, tzinfo=UTC)


def build_reference(
    model: LoadedModel, rows: Sequence[Mapping[str, object]], source: str
) -> Reference:
    """Decide and explain `rows` with `model`; their reference. Rows the model refuses
    (invalid features) raise InvalidModel naming the first."""
    events = [
        DecisionEvent(
            transaction_id=f"reference-{i}",
            model=ModelRef(name=model.name, version=model.version),
            features=dict(row),  # type: ignore[arg-type]
            prediction=model.predict(row),
            decided_at=REFERENCE_TIME,
        )
        for i, row in enumerate(rows)
    ]
    engine, _ = choose_engine(model, "auto")
    result = explain_batch(model, engine, events, REFERENCE_TIME)
    if result.failures:
        first = result.failures[0]
        raise InvalidModel(
            f"reference row {first.transaction_id.removeprefix('reference-')} cannot be "
            f"explained: {first.detail}"
        )
    return reference_of_records(result.records, model.schema, source)


def read_rows(csv_path: Path, schema: ModelSchema) -> list[dict[str, object]]:
    """The schema's features of each CSV row: numbers as numbers, empty cells as missing;
    other columns (a label, say) are ignored."""
    numeric = {f.name for f in schema.features if f.type is FeatureType.NUMERIC}
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        absent = [f for f in schema.feature_names if f not in (reader.fieldnames or [])]
        if absent:
            raise InvalidModel(f"{csv_path} lacks the model's columns {absent[:5]}")
        return [
            {name: _cell(row[name], name in numeric) for name in schema.feature_names}
            for row in reader
        ]


def _cell(text: str, numeric: bool) -> object:
    if text == "":
        return None
    if not numeric:
        return text
    number = float(text)
    return int(number) if number.is_integer() and "." not in text else number


def write_reference(model_dir: Path, csv_path: Path) -> Reference:
    """Explain `csv_path`'s rows with the model in `model_dir`; write its reference file."""
    model = LoadedModel.from_directory(model_dir)
    rows = read_rows(csv_path, model.schema)
    digest = hashlib.sha256(csv_path.read_bytes()).hexdigest()[:16]
    source = f"{csv_path.name} ({len(rows)} rows, sha256 {digest}...)"
    reference = build_reference(model, rows, source)
    (model_dir / REFERENCE_FILE).write_bytes(reference.to_bytes())
    return reference
