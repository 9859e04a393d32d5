"""Audit export: decision records as JSON Lines or CSV, hash-chained, closed by a manifest.

One row per record, in the order the records come (a store scan), with these fields:

    transaction_id, decided_at, explained_at     (UTC, "YYYY-MM-DDTHH:MM:SS.mmmZ")
    model_name, model_version                    (the version is the model hash)
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
the export time. `verify` recomputes all of it in one pass over the file, in constant memory.
"""

import csv
import hashlib
import io
import itertools
import os
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson
from pydantic import ValidationError

from service.core.integrity import canonical_time, record_hash
from service.core.records import (
    BinaryPrediction,
    DecisionRecord,
    ModelArtifact,
    MulticlassPrediction,
    Prediction,
)
from service.core.schema import ModelSchema, Task
from service.ports import ExplanationStore

FORMAT_ID: Final = "shapstream-audit/1"
CHAIN_SEED: Final = "0" * 64
FIELDS: Final = (
    "transaction_id",
    "decided_at",
    "explained_at",
    "model_name",
    "model_version",
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
_JSON_CELLS: Final = frozenset({"features", "prediction", "reasons", "attributions", "base_value"})
_NUMBER_CELLS: Final = frozenset({"additivity_error", "protected_share"})
_NULLABLE_TEXT_CELLS: Final = frozenset({"decision"})
CSV_MANIFEST_PREFIX: Final = b"#manifest "
JSONL_MANIFEST_KEY: Final = "manifest"
# Bytes handed on at a time: few enough writes and sends, small enough to stay flat.
CHUNK_BYTES: Final = 64 * 1024
# A manifest line is read from the end of the file; past this size the file is not ours.
MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024
# Problems kept in a report (all are counted): memory stays flat on a thoroughly damaged file.
MAX_PROBLEMS: Final = 1000
# Misplaced rows and gaps remembered to pair a moved row with the place it was taken from.
MAX_UNPLACED: Final = 64
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
    if name in _JSON_CELLS or name in _NUMBER_CELLS:
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


# --- verify -------------------------------------------------------------------------------


class ProblemKind(StrEnum):
    ALTERED = "altered"
    INSERTED = "inserted"
    REMOVED = "removed"
    MOVED = "moved"
    CHAIN = "chain"
    MANIFEST = "manifest"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding; `line` (1-based) and `transaction_id` name the row when there is one."""

    kind: ProblemKind
    detail: str
    line: int | None = None
    transaction_id: str | None = None

    def __str__(self) -> str:
        where = "" if self.line is None else f"line {self.line}"
        if self.transaction_id is not None:
            where += f" ({self.transaction_id})"
        return f"{where}: {self.kind}: {self.detail}" if where else f"{self.kind}: {self.detail}"


@dataclass
class VerifyReport:
    """What `verify` found: rows read, the first MAX_PROBLEMS problems and how many in all."""

    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def replace(self, old: Problem, new: Problem | None) -> None:
        """Revise a finding that later rows explained (None: it was no problem after all)."""
        for index, kept in enumerate(self.problems):
            if kept is old:
                if new is None:
                    del self.problems[index]
                else:
                    self.problems[index] = new
                break
        if new is None:
            self.problem_count -= 1


@dataclass(frozen=True, slots=True)
class _Link:
    """A row as the chain sees it: its stated chain value and both hashes it may extend with."""

    line: int
    transaction_id: str
    stated_hash: str
    content_hash: str
    chain: str

    def extends(self, previous: str) -> bool:
        # The stated hash or the recomputed one: an altered row is reported once, as altered,
        # whether the change hit its content or its record_hash field.
        return self.chain in {
            chain_next(previous, self.stated_hash),
            chain_next(previous, self.content_hash),
        }


@dataclass(frozen=True, slots=True)
class _Orphan:
    """A row that does not chain where it stands, reported as `problem` until placed."""

    link: _Link
    problem: Problem


@dataclass(frozen=True, slots=True)
class _Gap:
    """Where rows are missing: after the chain value `good` (of line `good_line`, None: the
    start), before the row `before`."""

    good: str
    good_line: int | None
    before: _Link
    problem: Problem


class _ChainCheck:
    """Follows the chain with one row of lookahead, to tell inserted, removed and moved rows.

    A row whose chain value does not extend the last good value is held; the next row decides:
    it extends the last good value (the held row was inserted), or the held row's value (rows
    were removed before the held row), or what the held row's value should have been (the
    held row's chain cell was edited). Anything else is a break at the held row.

    A row that does not chain where it stands (inserted, or a break) is kept as an orphan, and
    a place where rows are missing as a gap, the last MAX_UNPLACED of each. A row is moved when
    it chains into a gap (an orphan whose value the first row after the gap extends, or an
    inserted row that fills an earlier gap): then one `moved` problem, naming where the row
    belongs, replaces the two reports (swapped rows are two moved rows, or one when adjacent).
    """

    def __init__(self, report: VerifyReport) -> None:
        self._report = report
        self._good = CHAIN_SEED
        # The line whose chain value is `_good` (None: the start), and the last line looked at
        # that is not held (a break is looked at, but the chain does not move on to it).
        self._good_line: int | None = None
        self._last: _Link | None = None
        self._held: _Link | None = None
        self._restart = False
        self._orphans: deque[_Orphan] = deque(maxlen=MAX_UNPLACED)
        self._gaps: deque[_Gap] = deque(maxlen=MAX_UNPLACED)

    def skip(self) -> None:
        """An unreadable row (already reported): the chain restarts at the next readable one."""
        held, self._held = self._held, None
        if held is not None:
            self._broken(held)
        self._restart = True

    def feed(self, link: _Link) -> None:
        if self._restart:
            self._restart = False
            self._accept(link)
        elif self._held is not None:
            self._resolve_held(link)
        elif link.extends(self._good):
            self._accept(link)
        elif (orphan := self._orphan_between(link.extends)) is not None:
            self._moved(orphan, self._good_line, link.line)
            self._accept(link)
        else:
            self._held = link

    def finish(self, manifest_chain: str | None) -> None:
        """The manifest's chain value is the witness after the last row."""
        if self._held is not None:
            held, self._held = self._held, None
            if manifest_chain == self._good:
                self._inserted(held)
            elif manifest_chain == held.chain:
                self._removed_before(held)
            elif manifest_chain in {
                chain_next(self._good, held.stated_hash),
                chain_next(self._good, held.content_hash),
            }:
                self._chain_cell_altered(held)
            else:
                self._broken(held)
        elif manifest_chain is not None and manifest_chain != self._good and not self._restart:
            orphan = self._orphan_between(lambda chain: chain == manifest_chain)
            if orphan is not None:
                self._moved(orphan, self._good_line, None)
                return
            after = "" if self._last is None else f" after line {self._last.line}"
            self._report.add(
                Problem(
                    ProblemKind.REMOVED,
                    f"rows are missing at the end{after}: the manifest's chain value does not "
                    "follow from the last row",
                )
            )

    def _resolve_held(self, witness: _Link) -> None:
        held, self._held = self._held, None
        assert held is not None
        if witness.extends(self._good):
            self._inserted(held)
            self._accept(witness)
        elif witness.extends(held.chain):
            self._removed_before(held)
            self._accept(held)
            self._accept(witness)
        elif witness.extends(chain_next(self._good, held.stated_hash)) or witness.extends(
            chain_next(self._good, held.content_hash)
        ):
            self._chain_cell_altered(held)
            self._accept(witness)
        elif (orphan := self._orphan_between(witness.extends)) is not None:
            # The orphan belongs here, in the held row's place: the held row is misplaced too.
            self._moved(orphan, self._good_line, witness.line)
            self._inserted(held)
            self._accept(witness)
        else:
            # Neither row chains on: the held one is a break and waits, as an orphan, for a
            # place further on; the witness is looked at afresh, after it but against the
            # chain's last good value.
            self._broken(held)
            self._last = held
            self.feed(witness)

    def _accept(self, link: _Link) -> None:
        self._good, self._good_line, self._last = link.chain, link.line, link

    def _orphan_between(self, fits: Callable[[str], bool]) -> _Orphan | None:
        """The orphan that extends the last good value and whose value `fits` what follows."""
        for orphan in self._orphans:
            if orphan.link.extends(self._good) and fits(orphan.link.chain):
                self._orphans.remove(orphan)
                return orphan
        return None

    def _moved(self, orphan: _Orphan, after: int | None, before: int | None) -> None:
        link = orphan.link
        self._report.replace(orphan.problem, _moved_problem(link, after, before))

    def _chain_cell_altered(self, link: _Link) -> None:
        self._report.add(
            Problem(
                ProblemKind.ALTERED, "its chain value was changed", link.line, link.transaction_id
            )
        )

    def _inserted(self, link: _Link) -> None:
        for gap in self._gaps:
            if link.extends(gap.good) and gap.before.extends(link.chain):
                self._gaps.remove(gap)
                self._report.replace(gap.problem, None)
                self._report.add(_moved_problem(link, gap.good_line, gap.before.line))
                return
        problem = Problem(
            ProblemKind.INSERTED,
            "the row is not part of the export's chain (the rows around it chain without it)",
            link.line,
            link.transaction_id,
        )
        self._report.add(problem)
        self._orphans.append(_Orphan(link, problem))

    def _removed_before(self, link: _Link) -> None:
        after = "the start" if self._last is None else f"line {self._last.line}"
        problem = Problem(
            ProblemKind.REMOVED,
            f"rows are missing between {after} and this row",
            link.line,
            link.transaction_id,
        )
        self._report.add(problem)
        self._gaps.append(_Gap(self._good, self._good_line, link, problem))

    def _broken(self, link: _Link) -> None:
        problem = Problem(
            ProblemKind.CHAIN,
            "the chain breaks here (rows removed, inserted or reordered)",
            link.line,
            link.transaction_id,
        )
        self._report.add(problem)
        self._orphans.append(_Orphan(link, problem))


def _moved_problem(link: _Link, after: int | None, before: int | None) -> Problem:
    """`link` belongs between line `after` and line `before` (None: the start, the end)."""
    line = link.line
    if after == line + 1 and before in {line + 2, None}:
        detail = f"swapped with line {after}: it belongs after it"
    elif before == line - 1 and after in {line - 2, None}:
        detail = f"swapped with line {before}: it belongs before it"
    elif after is None:
        detail = "it belongs at the start" if before is None else f"it belongs before line {before}"
    elif before is None:
        detail = f"it belongs at the end, after line {after}"
    else:
        detail = f"it belongs between line {after} and line {before}"
        if before == after + 2:
            detail += f", where line {after + 1} is"
    return Problem(ProblemKind.MOVED, detail, line, link.transaction_id)


@dataclass(frozen=True, slots=True)
class _Tail:
    """The manifest found at the end of a file, and where its line starts."""

    content_end: int
    manifest: dict[str, Any] | None
    damaged: bool


def _read_tail(handle: BinaryIO) -> _Tail:
    """Find the last line from the end of the file and read it as a manifest if it is one."""
    size = handle.seek(0, os.SEEK_END)
    end = size - 1 if size and _byte_at(handle, size - 1) == b"\n" else size
    start = end
    while start > 0 and end - start < MAX_MANIFEST_BYTES:
        step = min(CHUNK_BYTES, start)
        handle.seek(start - step)
        block = handle.read(step)
        newline = block.rfind(b"\n")
        if newline >= 0:
            start = start - step + newline + 1
            break
        start -= step
    handle.seek(start)
    last = handle.read(end - start)
    if last.startswith(CSV_MANIFEST_PREFIX):
        text = last[len(CSV_MANIFEST_PREFIX) :]
    elif last.startswith(b'{"' + JSONL_MANIFEST_KEY.encode() + b'"'):
        text = last
    else:
        return _Tail(size, None, damaged=False)
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _Tail(start, None, damaged=True)
    if not last.startswith(CSV_MANIFEST_PREFIX):
        parsed = parsed.get(JSONL_MANIFEST_KEY) if isinstance(parsed, dict) else None
    if not isinstance(parsed, dict):
        return _Tail(start, None, damaged=True)
    return _Tail(start, parsed, damaged=False)


def _byte_at(handle: BinaryIO, offset: int) -> bytes:
    handle.seek(offset)
    return handle.read(1)


def _content_lines(handle: BinaryIO, content_end: int, digest: Any) -> Iterator[bytes]:
    """The lines before the manifest, each hashed into `digest` as it is read."""
    handle.seek(0)
    offset = 0
    for raw in handle:
        if offset >= content_end:
            return
        raw = raw[: content_end - offset]
        offset += len(raw)
        digest.update(raw)
        yield raw


class _RowError(ValueError):
    """A row that cannot be read back into a record."""


def _named_vectors(
    row: dict[str, Any], names: dict[str, Any] | None
) -> tuple[list[list[float]], list[float]]:
    """Attributions and base value back to vectors, in the order of their named mappings."""
    attributions, base_value = row["attributions"], row["base_value"]
    if not isinstance(attributions, dict) or not attributions:
        raise _RowError("attributions are not a mapping")
    first = next(iter(attributions.values()))
    if isinstance(first, dict):
        if not isinstance(base_value, dict) or list(base_value) != list(attributions):
            raise _RowError("per-class attributions and base values name different classes")
        outputs = list(attributions.values())
        bases = list(base_value.values())
        classes = list(attributions)
    else:
        outputs, bases, classes = [attributions], [base_value], []
    if names is not None and not _named_as(names, classes, outputs):
        raise _RowError("attribution names differ from those of its model version")
    if any(not isinstance(output, dict) for output in outputs):
        raise _RowError("attributions are not a mapping per class")
    return [list(output.values()) for output in outputs], bases


def _named_as(names: dict[str, Any], classes: list[str], outputs: list[Any]) -> bool:
    features = names.get("features")
    return classes == names.get("classes") and all(
        isinstance(output, dict) and list(output) == features for output in outputs
    )


def record_from_row(row: dict[str, Any], names: dict[str, Any] | None) -> DecisionRecord:
    """The record a row was made from; raises _RowError when the row cannot be one."""
    if set(row) != set(FIELDS):
        raise _RowError(f"fields are not those of an export row: {sorted(set(row) ^ set(FIELDS))}")
    attributions, base_value = _named_vectors(row, names)
    try:
        return DecisionRecord.model_validate(
            {
                "transaction_id": row["transaction_id"],
                "model": {"name": row["model_name"], "version": row["model_version"]},
                "features": row["features"],
                "prediction": row["prediction"],
                "base_value": base_value,
                "attributions": attributions,
                "additivity_error": row["additivity_error"],
                "engine": row["engine"],
                "decided_at": row["decided_at"],
                "explained_at": row["explained_at"],
                "reasons": row["reasons"],
                "protected_share": row["protected_share"],
                "record_hash": row["record_hash"],
            }
        )
    except ValidationError as error:
        fields = sorted({".".join(str(part) for part in e["loc"]) for e in error.errors()})
        raise _RowError(f"not a valid record ({', '.join(fields)})") from None


def _csv_row(cells: list[str]) -> dict[str, Any]:
    if len(cells) != len(FIELDS):
        raise _RowError(f"{len(cells)} cells, not {len(FIELDS)}")
    row: dict[str, Any] = {}
    for name, cell in zip(FIELDS, cells, strict=True):
        if name in _JSON_CELLS or name in _NUMBER_CELLS:
            row[name] = None if cell == "" else orjson.loads(cell)
        elif name in _NULLABLE_TEXT_CELLS:
            row[name] = cell or None
        else:
            row[name] = cell
    return row


class _Verifier:
    def __init__(self, manifest: dict[str, Any] | None) -> None:
        self.report = VerifyReport(manifest=manifest)
        self.chain = _ChainCheck(self.report)
        models = manifest.get("models") if manifest else None
        self._models: dict[str, Any] | None = models if isinstance(models, dict) else None

    def check(self, line: int, parse: Callable[[], Any]) -> None:
        """Check one row: readable, its content matching its hash, then its place in the chain."""
        self.report.rows += 1
        transaction_id: str | None = None
        try:
            row = parse()
            if not isinstance(row, dict):
                raise _RowError("not a JSON object")
            candidate = row.get("transaction_id")
            transaction_id = candidate if isinstance(candidate, str) else None
            names = self._names(str(row.get("model_version")))
            record = record_from_row(row, names)
            content_hash = record_hash(record)
        # The file is untrusted: whatever a damaged row makes the parsers raise, it is reported.
        except (ValueError, TypeError, KeyError) as error:
            self.report.add(
                Problem(ProblemKind.ALTERED, f"unreadable row: {error}", line, transaction_id)
            )
            self.chain.skip()
            return
        if content_hash != record.record_hash:
            self.report.add(
                Problem(
                    ProblemKind.ALTERED,
                    "its content does not match its record hash",
                    line,
                    transaction_id,
                )
            )
        elif row["decision"] != decision_of(record.prediction):
            self.report.add(
                Problem(
                    ProblemKind.ALTERED,
                    "its decision does not follow from its prediction",
                    line,
                    transaction_id,
                )
            )
        chain = row["chain"]
        if not isinstance(chain, str):
            self.report.add(Problem(ProblemKind.ALTERED, "no chain value", line, transaction_id))
            self.chain.skip()
            return
        self.chain.feed(_Link(line, record.transaction_id, record.record_hash, content_hash, chain))

    def _names(self, version: str) -> dict[str, Any] | None:
        if self._models is None:
            return None
        names = self._models.get(version)
        if not isinstance(names, dict):
            raise _RowError(f"model version {version} is not listed in the manifest")
        return names


def _check_manifest(report: VerifyReport, tail: _Tail, content_sha256: str) -> None:
    manifest = tail.manifest
    if manifest is None:
        detail = (
            "the last line is a damaged manifest"
            if tail.damaged
            else "missing (the file was cut short, or its last line removed)"
        )
        report.add(Problem(ProblemKind.MANIFEST, detail))
        return
    if manifest.get("format") != FORMAT_ID:
        report.add(Problem(ProblemKind.MANIFEST, f"unknown format {manifest.get('format')!r}"))
    if manifest.get("rows") != report.rows:
        report.add(
            Problem(
                ProblemKind.MANIFEST,
                f"it counts {manifest.get('rows')} rows, the file has {report.rows}",
            )
        )
    if manifest.get("content_sha256") != content_sha256:
        report.add(
            Problem(
                ProblemKind.MANIFEST,
                "the SHA-256 of the rows does not match its content_sha256",
            )
        )


def verify(path: Path) -> VerifyReport:
    """Check every row's record hash, the chain and the manifest of an export file."""
    with path.open("rb") as handle:
        tail = _read_tail(handle)
        verifier = _Verifier(tail.manifest)
        digest = hashlib.sha256()
        lines = _content_lines(handle, tail.content_end, digest)
        first = next(lines, b"")
        if first.startswith(b"{") or not first:
            _verify_jsonl(verifier, first, lines)
        else:
            _verify_csv(verifier, first, lines)
        for _ in lines:  # whatever a parser left unread still counts toward the SHA-256
            pass
    manifest_chain = tail.manifest.get("chain") if tail.manifest else None
    verifier.chain.finish(manifest_chain if isinstance(manifest_chain, str) else None)
    _check_manifest(verifier.report, tail, digest.hexdigest())
    return verifier.report


def _verify_jsonl(verifier: _Verifier, first: bytes, lines: Iterator[bytes]) -> None:
    if not first:
        return
    for number, raw in enumerate(itertools.chain([first], lines), start=1):
        verifier.check(number, partial(_json_row, raw))


def _verify_csv(verifier: _Verifier, first: bytes, lines: Iterator[bytes]) -> None:
    header = first.decode("utf-8", errors="replace").rstrip("\r\n")
    if header != ",".join(FIELDS):
        verifier.report.add(
            Problem(ProblemKind.ALTERED, "not the header of an export (or altered)", 1)
        )
    position = {"line": 1}

    def text_lines() -> Iterator[str]:
        for raw in lines:
            position["line"] += 1
            yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(text_lines(), strict=True)
    while True:
        start = position["line"] + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            verifier.check(start, partial(_raise, _RowError(f"bad CSV: {error}")))
            continue
        verifier.check(start, partial(_csv_row, cells))


def _json_row(raw: bytes) -> Any:
    return orjson.loads(raw)


def _raise(error: Exception) -> dict[str, Any]:
    raise error
