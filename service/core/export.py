"""Audit export: decision records as JSON Lines or CSV, hash-chained, closed by a manifest.

One row per record, in the order the records come (a store scan), with these fields:

    transaction_id, decided_at, explained_at     (UTC, "YYYY-MM-DDTHH:MM:SS.mmmZ")
    model_name, model_version                    (the version is the model hash)
    model_format, framework_version              (the model's framework and the version of it
                                                  that wrote the model file; null for records
                                                  stored before they were kept, and the version
                                                  null when the file does not say)
    features                                     (the inputs, as the client sent them)
    prediction, decision                         (decision: approve/deny, the class, or null)
    reasons                                      ([{family, reason, contribution, features}])
    attributions, base_value                     (margin space, named by feature; for a
                                                  multiclass model by class, then feature)
    additivity_error, protected_share, engine
    record_hash                                  (service.core.integrity.record_hash)
    chain                                        (chain_i = sha256_hex(chain_{i-1} + record_hash_i),
                                                  chain_0 = CHAIN_SEED, both as ASCII hex text)

JSON Lines: one JSON object per line; the last line is `{"manifest": {...}}`. CSV: a header
row, then one row per record, nested values (features, prediction, reasons, attributions,
base_value) as JSON text in their cell, numbers as JSON numbers, null as an empty cell; the
last line is `#manifest {...}` (not a CSV row: strip it before loading the file elsewhere).
Lines end with "\\n".

The manifest holds the row count, the SHA-256 of every byte before the manifest line, the last
chain value, the feature (and class) names of each model version in the file, the query and
the export time. `service.core.export_verify` recomputes all of it from the file alone.

Format versions (the manifest's `format`): shapstream-audit/1 rows have no `model_format` and
`framework_version`; shapstream-audit/2 added them. The verifier reads both.
"""

import csv
import hashlib
import io
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import orjson

from service.core.integrity import canonical_time
from service.core.ports import ExplanationStore
from service.core.records import (
    BinaryPrediction,
    DecisionRecord,
    ModelArtifact,
    MulticlassPrediction,
    Prediction,
)
from service.core.schema import ModelSchema, Task

FORMAT_ID: Final = "shapstream-audit/2"
CHAIN_SEED: Final = "0" * 64
FIELDS: Final = (
    "transaction_id",
    "decided_at",
    "explained_at",
    "model_name",
    "model_version",
    "model_format",
    "framework_version",
    "features",
    "prediction",
    "decision",
    "reasons",
    "attributions",
    "base_value",
    "additivity_error",
    "protected_share",
    "engine",
    "record_hash",
    "chain",
)
# CSV cells holding JSON text; the other cells are plain text or a JSON number.
JSON_CELLS: Final = frozenset({"features", "prediction", "reasons", "attributions", "base_value"})
NUMBER_CELLS: Final = frozenset({"additivity_error", "protected_share"})
CSV_MANIFEST_PREFIX: Final = b"#manifest "
JSONL_MANIFEST_KEY: Final = "manifest"
# Bytes handed on at a time: few enough writes and sends, small enough to stay flat.
CHUNK_BYTES: Final = 64 * 1024
# A model version may be given by a prefix this long or longer (logs print 12 characters):
# shorter ones match too much to be a deliberate choice.
MIN_VERSION_PREFIX: Final = 8
MAX_SHOWN_VERSIONS: Final = 5
BINARY_OUTCOMES: Final = ("approve", "deny")


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


class ExportError(ValueError):
    """A record that cannot be exported (its model version is unknown, or does not fit it)."""


class QueryError(ValueError):
    """An export query that names something the store does not hold; `field` names the input."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


SchemaLookup = Callable[[str], Awaitable[ModelSchema]]


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """What was asked for; written into the manifest."""

    start: datetime
    end: datetime
    model_versions: tuple[str, ...]
    decision: str | None
    format: ExportFormat

    def as_json(self) -> dict[str, Any]:
        return {
            "start": canonical_time(self.start),
            "end": canonical_time(self.end),
            "model_versions": list(self.model_versions),
            "decision": self.decision,
            "format": self.format.value,
        }


def match_version(given: str, versions: Sequence[str]) -> str:
    """The one stored version that is `given` or starts with it (logs print 12 characters).

    Raises `QueryError` when none does, when several do (naming them), or when the prefix is
    shorter than MIN_VERSION_PREFIX.
    """
    if given in versions:
        return given
    if len(given) < MIN_VERSION_PREFIX:
        raise QueryError(
            "model_version",
            f"{given!r} is too short: give the whole version or at least "
            f"{MIN_VERSION_PREFIX} of its first characters",
        )
    found = [version for version in versions if version.startswith(given)]
    if not found:
        raise QueryError("model_version", f"no stored model version starts with {given!r}")
    if len(found) > 1:
        shown = ", ".join(found[:MAX_SHOWN_VERSIONS])
        more = (
            f" and {len(found) - MAX_SHOWN_VERSIONS} more"
            if len(found) > MAX_SHOWN_VERSIONS
            else ""
        )
        raise QueryError(
            "model_version",
            f"{given!r} is ambiguous: {len(found)} stored versions start with it ({shown}{more}); "
            "give more characters",
        )
    return found[0]


def outcomes(schema: ModelSchema) -> tuple[str, ...]:
    """The `decision` values a model's rows can hold: approve/deny, its classes, or none."""
    if schema.task is Task.BINARY:
        return BINARY_OUTCOMES
    if schema.task is Task.MULTICLASS:
        return schema.classes
    return ()


async def check_decision(decision: str, versions: Sequence[str], schemas: SchemaLookup) -> None:
    """Raise `QueryError` unless some model version in `versions` can decide `decision`."""
    allowed: dict[str, None] = {}
    for version in versions:
        allowed.update(dict.fromkeys(outcomes(await schemas(version))))
    if decision not in allowed:
        named = ", ".join(sorted(allowed)) or "none (no model version here decides)"
        raise QueryError("decision", f"{decision!r} is not an outcome; allowed: {named}")


async def select_versions(
    store: ExplanationStore,
    schemas: SchemaLookup,
    model_version: str | None,
    decision: str | None,
) -> tuple[str, ...]:
    """The stored versions an export covers: all, or the one `model_version` names.

    Raises `QueryError` for a version prefix that matches no single version, or a `decision`
    none of the versions can give.
    """
    versions = tuple(await store.model_versions())
    if model_version is not None:
        versions = (match_version(model_version, versions),)
    if decision is not None:
        await check_decision(decision, versions, schemas)
    return versions


def access_target(query: ExportQuery, model_version: str | None) -> str:
    """What the access log says was exported: the range, then the filters that were given."""
    parts = [f"{canonical_time(query.start)}/{canonical_time(query.end)}"]
    if model_version is not None:
        parts.append(f"model_version={model_version}")
    if query.decision is not None:
        parts.append(f"decision={query.decision}")
    parts.append(f"format={query.format}")
    return " ".join(parts)


def chain_next(previous: str, record_hash_hex: str) -> str:
    """The chain value after a row: SHA-256 hex of the previous value and the row's record hash."""
    return hashlib.sha256((previous + record_hash_hex).encode()).hexdigest()


def decision_of(prediction: Prediction) -> str | None:
    """The outcome an auditor filters on: approve/deny, the class label, none for regression."""
    if isinstance(prediction, BinaryPrediction):
        return prediction.decision
    if isinstance(prediction, MulticlassPrediction):
        return prediction.label
    return None


@dataclass(frozen=True, slots=True)
class Layout:
    """The names that label a model version's attributions: features, and classes if several."""

    name: str
    features: tuple[str, ...]
    classes: tuple[str, ...]

    @classmethod
    def of(cls, schema: ModelSchema) -> "Layout":
        classes = schema.classes if schema.task is Task.MULTICLASS else ()
        return cls(schema.name, tuple(schema.feature_names), classes)

    def as_json(self) -> dict[str, Any]:
        """What the manifest says of the version."""
        return {"name": self.name, "features": list(self.features), "classes": list(self.classes)}


def schemas_from(loader: Callable[[str], Awaitable[ModelArtifact | None]]) -> SchemaLookup:
    """A schema lookup over a model artifact loader (e.g. `store.get_model`), cached per version."""
    cache: dict[str, ModelSchema] = {}

    async def lookup(version: str) -> ModelSchema:
        if version not in cache:
            artifact = await loader(version)
            if artifact is None:
                raise ExportError(f"model version {version} is not in the store")
            cache[version] = ModelSchema.model_validate_json(artifact.schema_bytes)
        return cache[version]

    return lookup


async def scan_versions(
    store: ExplanationStore, versions: tuple[str, ...], start: datetime, end: datetime
) -> AsyncGenerator[DecisionRecord, None]:
    """The records of each version in turn, each version's scan closed when it is done."""
    for version in versions:
        async with aclosing(store.scan(version, start, end)) as records:
            async for record in records:
                yield record


def export_row(record: DecisionRecord, layout: Layout, chain: str) -> dict[str, Any]:
    """The row of one record, attributions named by its model's features (and classes)."""
    names = layout.features
    rows = record.attributions
    if any(len(row) != len(names) for row in rows) or len(rows) != max(len(layout.classes), 1):
        raise ExportError(
            f"record {record.transaction_id} does not fit model version {record.model.version}"
        )
    by_output = [dict(zip(names, row, strict=True)) for row in rows]
    attributions: dict[str, Any]
    base_value: float | dict[str, float]
    if layout.classes:
        attributions = dict(zip(layout.classes, by_output, strict=True))
        base_value = dict(zip(layout.classes, record.base_value, strict=True))
    else:
        attributions, base_value = by_output[0], record.base_value[0]
    return {
        "transaction_id": record.transaction_id,
        "decided_at": canonical_time(record.decided_at),
        "explained_at": canonical_time(record.explained_at),
        "model_name": record.model.name,
        "model_version": record.model.version,
        "model_format": record.model_format,
        "framework_version": record.framework_version,
        "features": record.features,
        "prediction": record.prediction.model_dump(mode="json", by_alias=True),
        "decision": decision_of(record.prediction),
        "reasons": [reason.model_dump(mode="json") for reason in record.reasons],
        "attributions": attributions,
        "base_value": base_value,
        "additivity_error": record.additivity_error,
        "protected_share": record.protected_share,
        "engine": record.engine,
        "record_hash": record.record_hash,
        "chain": chain,
    }


def _csv_cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in JSON_CELLS or name in NUMBER_CELLS:
        return orjson.dumps(value).decode()
    return str(value)


class _Encoder:
    """Rows to bytes in one format; CSV through the csv module (quoting done right)."""

    def __init__(self, export_format: ExportFormat) -> None:
        self._format = export_format
        self._text = io.StringIO()
        self._csv = csv.writer(self._text, lineterminator="\n")

    def header(self) -> bytes:
        if self._format is ExportFormat.JSONL:
            return b""
        self._csv.writerow(FIELDS)
        return self._take()

    def row(self, row: dict[str, Any]) -> bytes:
        if self._format is ExportFormat.JSONL:
            return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        self._csv.writerow([_csv_cell(name, row[name]) for name in FIELDS])
        return self._take()

    def manifest(self, manifest: dict[str, Any]) -> bytes:
        if self._format is ExportFormat.JSONL:
            return orjson.dumps({JSONL_MANIFEST_KEY: manifest}, option=orjson.OPT_APPEND_NEWLINE)
        return CSV_MANIFEST_PREFIX + orjson.dumps(manifest, option=orjson.OPT_APPEND_NEWLINE)

    def _take(self) -> bytes:
        text = self._text.getvalue()
        self._text.seek(0)
        self._text.truncate()
        return text.encode()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AuditExport:
    """One export of `query`: iterate `chunks(records)` once; `manifest` is set at its end."""

    def __init__(
        self, query: ExportQuery, schemas: SchemaLookup, now: Callable[[], datetime] = _utc_now
    ) -> None:
        self.query = query
        self._schemas = schemas
        self._now = now
        self.rows = 0
        self.manifest: dict[str, Any] | None = None

    async def chunks(self, records: AsyncIterator[DecisionRecord]) -> AsyncIterator[bytes]:
        """The export's bytes, about CHUNK_BYTES at a time; the manifest is the last line."""
        encoder = _Encoder(self.query.format)
        content = hashlib.sha256()
        chain = CHAIN_SEED
        layouts: dict[str, Layout] = {}
        buffer = bytearray(encoder.header())
        async for record in records:
            if self.query.decision is not None and (
                decision_of(record.prediction) != self.query.decision
            ):
                continue
            version = record.model.version
            layout = layouts.get(version)
            if layout is None:
                layout = layouts[version] = Layout.of(await self._schemas(version))
            chain = chain_next(chain, record.record_hash)
            buffer += encoder.row(export_row(record, layout, chain))
            self.rows += 1
            if len(buffer) >= CHUNK_BYTES:
                content.update(buffer)
                yield bytes(buffer)
                buffer.clear()
        content.update(buffer)
        self.manifest = {
            "format": FORMAT_ID,
            "rows": self.rows,
            "content_sha256": content.hexdigest(),
            "chain": chain,
            "models": {version: layout.as_json() for version, layout in layouts.items()},
            "query": self.query.as_json(),
            "exported_at": canonical_time(self._now()),
        }
        yield bytes(buffer) + encoder.manifest(self.manifest)
