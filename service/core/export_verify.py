"""Verifying an audit export file (service.core.export): rows, chain and manifest, by row.

Every row's record hash is recomputed from its content, the chain is followed with one row of
lookahead to tell altered, inserted, removed and moved rows apart, and the manifest's row
count, content SHA-256 and last chain value are checked; one pass over the file, in constant
memory. Nothing but the file is read: a verifier needs no access to the store. Files of every
format version verify (the manifest's `format` names the version; see `service.core.export`).
"""

import csv
import hashlib
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson
from pydantic import ValidationError

from service.core.export import (
    CHAIN_SEED,
    CHUNK_BYTES,
    CSV_MANIFEST_PREFIX,
    FIELDS,
    FORMAT_ID,
    JSON_CELLS,
    JSONL_MANIFEST_KEY,
    NUMBER_CELLS,
    chain_next,
    decision_of,
)
from service.core.integrity import record_hash
from service.core.records import DecisionRecord

# Text cells in which an empty cell reads back as null (the writer writes null as nothing).
NULLABLE_TEXT_CELLS: Final = frozenset({"decision", "model_format", "framework_version"})
# The row fields of each format version, the current one first. Version 1 rows were exported
# before records kept the model's format and framework version: their hashes cover neither.
FORMAT_FIELDS: Final = {
    FORMAT_ID: FIELDS,
    "shapstream-audit/1": tuple(
        name for name in FIELDS if name not in {"model_format", "framework_version"}
    ),
}
# A manifest line is read from the end of the file; past this size the file is not ours.
MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024
# Problems kept in a report (all are counted): memory stays flat on a thoroughly damaged file.
MAX_PROBLEMS: Final = 1000
# Misplaced rows and gaps remembered to pair a moved row with the place it was taken from.
MAX_UNPLACED: Final = 64


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
        detail = "the row is not part of the export's chain (the rows around it chain without it)"
        self._orphaned(link, ProblemKind.INSERTED, detail)

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
        detail = "the chain breaks here (rows removed, inserted or reordered)"
        self._orphaned(link, ProblemKind.CHAIN, detail)

    def _orphaned(self, link: _Link, kind: ProblemKind, detail: str) -> None:
        """Report `link` as a `kind` problem, kept as an orphan until later rows place it."""
        problem = Problem(kind, detail, link.line, link.transaction_id)
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


def record_from_row(
    row: dict[str, Any], names: dict[str, Any] | None, layouts: tuple[tuple[str, ...], ...]
) -> DecisionRecord:
    """The record a row of one of `layouts` was made from; raises _RowError when the row
    cannot be one."""
    if not any(set(row) == set(fields) for fields in layouts):
        wrong = sorted(set(row) ^ set(layouts[0]))
        raise _RowError(f"fields are not those of an export row: {wrong}")
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
                # Absent from a version 1 row: its record had neither.
                "model_format": row.get("model_format"),
                "framework_version": row.get("framework_version"),
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


def _csv_row(cells: list[str], fields: tuple[str, ...]) -> dict[str, Any]:
    if len(cells) != len(fields):
        raise _RowError(f"{len(cells)} cells, not {len(fields)}")
    row: dict[str, Any] = {}
    for name, cell in zip(fields, cells, strict=True):
        if name in JSON_CELLS or name in NUMBER_CELLS:
            row[name] = None if cell == "" else orjson.loads(cell)
        elif name in NULLABLE_TEXT_CELLS:
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
        # The manifest's format decides the rows' fields; without a known one (reported by
        # _check_manifest), a row of any format version is read.
        fields = FORMAT_FIELDS.get(_format_of(manifest))
        self.layouts = (fields,) if fields else tuple(FORMAT_FIELDS.values())

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
            record = record_from_row(row, names, self.layouts)
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


def _format_of(manifest: dict[str, Any] | None) -> str:
    """The manifest's format version ("" when there is none, or not as text)."""
    found = manifest.get("format") if manifest else None
    return found if isinstance(found, str) else ""


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
    if _format_of(manifest) not in FORMAT_FIELDS:
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
    layout = next((f for f in verifier.layouts if header == ",".join(f)), None)
    if layout is None:
        verifier.report.add(
            Problem(ProblemKind.ALTERED, "not the header of an export (or altered)", 1)
        )
        layout = verifier.layouts[0]
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
        verifier.check(start, partial(_csv_row, cells, layout))


def _json_row(raw: bytes) -> Any:
    return orjson.loads(raw)


def _raise(error: Exception) -> dict[str, Any]:
    raise error
