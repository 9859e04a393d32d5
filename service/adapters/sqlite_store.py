"""The explanation store on SQLite (standard library sqlite3, WAL) for the single-process demo.

One connection, owned by one worker thread: every call runs there, so sqlite3's
same-thread rule holds and the event loop never waits on the disk. Retention is an
`expires_at_ms` column that reads honour, the counterpart of Cassandra's TTL.
"""

import asyncio
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Self, TypeVar

import orjson

from service.adapters.record_codec import (
    RecordColumns,
    claims_by_record,
    day_start,
    decision_summary,
    from_columns,
    to_columns,
    to_epoch_ms,
)
from service.adapters.sqlite_files import private_database
from service.core.ports import ModelConflictError
from service.core.records import (
    Claim,
    DecisionCursor,
    DecisionRecord,
    DecisionSummary,
    ModelArtifact,
)
from service.core.schema import ModelSchema
from service.errors import StoreUnavailable
from service.settings import Settings

DB_FILE = "explanations.sqlite3"
# Another process holding the write lock (e.g. `shapstream db` while the demo runs) is waited for.
BUSY_TIMEOUT_MS = 5_000

T = TypeVar("T")

CREATE_MODELS = """
CREATE TABLE IF NOT EXISTS models (
    model_version TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    schema_json BLOB NOT NULL,
    model_json BLOB NOT NULL,
    feature_names TEXT NOT NULL,
    registered_at_ms INTEGER NOT NULL
)"""

# One table does here what decisions_by_txn and decisions_by_day do in Cassandra: the index
# serves the scan by model version and time. Columns added since are in ADDED_DECISION_COLUMNS.
CREATE_DECISIONS = """
CREATE TABLE IF NOT EXISTS decisions (
    txn_id TEXT PRIMARY KEY,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    inputs BLOB NOT NULL,
    prediction BLOB NOT NULL,
    decision TEXT,
    base_value BLOB NOT NULL,
    attributions BLOB NOT NULL,
    additivity_error REAL NOT NULL,
    engine TEXT NOT NULL,
    decided_at_ms INTEGER NOT NULL,
    explained_at_ms INTEGER NOT NULL,
    reasons BLOB NOT NULL,
    protected_share REAL,
    record_hash TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
)"""

CREATE_DECISIONS_BY_TIME = """
CREATE INDEX IF NOT EXISTS decisions_by_version_time ON decisions (model_version, decided_at_ms)"""

CREATE_CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    txn_id TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    response BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL
)"""

SCHEMA = (CREATE_MODELS, CREATE_DECISIONS, CREATE_DECISIONS_BY_TIME, CREATE_CLAIMS)

# Columns of `decisions` added after it was first released: `migrate` adds each one a database
# lacks (SQLite has no ADD COLUMN IF NOT EXISTS), so an existing file keeps its rows, which
# read back with null there.
ADDED_DECISION_COLUMNS = (("model_format", "TEXT"), ("framework_version", "TEXT"))
SELECT_DECISION_COLUMNS = "SELECT name FROM pragma_table_info('decisions')"
ADD_DECISION_COLUMN = "ALTER TABLE decisions ADD COLUMN {name} {type}"

# REPLACE is an upsert here (no triggers, no foreign keys): the same record twice is one row.
UPSERT_DECISION = """
INSERT OR REPLACE INTO decisions (
    txn_id, model_name, model_version, inputs, prediction, decision, base_value, attributions,
    additivity_error, engine, model_format, framework_version, decided_at_ms, explained_at_ms,
    reasons, protected_share, record_hash, expires_at_ms
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

# Columns in `RecordColumns` order.
SELECT_DECISION = """
SELECT txn_id, model_name, model_version, inputs, prediction, decision, base_value, attributions,
       additivity_error, engine, model_format, framework_version, decided_at_ms,
       explained_at_ms, reasons, protected_share, record_hash
FROM decisions WHERE txn_id = ? AND expires_at_ms > ?"""

# An upsert, as in Cassandra: the last write of an id wins.
UPSERT_CLAIM = """
INSERT OR REPLACE INTO claims (txn_id, request_hash, response, expires_at_ms) VALUES (?, ?, ?, ?)"""

# An expired claim no longer holds its id, as in Cassandra once the TTL has passed.
SELECT_CLAIM = """
SELECT request_hash, response FROM claims WHERE txn_id = ? AND expires_at_ms > ?"""

# No expiry on models: a version in use for years must outlive every decision it explains.
INSERT_MODEL = """
INSERT OR IGNORE INTO models (
    model_version, name, schema_json, model_json, feature_names, registered_at_ms
) VALUES (?, ?, ?, ?, ?, ?)"""

SELECT_MODEL = "SELECT name, schema_json, model_json FROM models WHERE model_version = ?"

SELECT_MODEL_VERSIONS = "SELECT model_version FROM models ORDER BY model_version"
SELECT_MODEL_NAMES = "SELECT model_version, name FROM models"

# The newest decisions of a version on a day, strictly before a (decided_at, txn_id) cursor.
_SELECT_RECENT = """
SELECT txn_id, model_name, decided_at_ms, prediction FROM decisions
WHERE model_version = ? AND decided_at_ms >= ? AND (decided_at_ms, txn_id) < (?, ?)
  AND expires_at_ms > ?{filter}
ORDER BY decided_at_ms DESC, txn_id DESC LIMIT ?"""
SELECT_RECENT = _SELECT_RECENT.format(filter="")
SELECT_RECENT_BY_DECISION = _SELECT_RECENT.format(filter=" AND decision = ?")

# Columns in `RecordColumns` order. The (model_version, decided_at_ms) index gives the time
# order; only rows sharing a millisecond are sorted by txn_id on the side.
SCAN_DECISIONS = """
SELECT txn_id, model_name, model_version, inputs, prediction, decision, base_value, attributions,
       additivity_error, engine, model_format, framework_version, decided_at_ms,
       explained_at_ms, reasons, protected_share, record_hash
FROM decisions
WHERE model_version = ? AND decided_at_ms >= ? AND decided_at_ms < ? AND expires_at_ms > ?
ORDER BY decided_at_ms, txn_id"""

# Rows fetched from a scan's cursor at a time: memory stays flat however long the range.
SCAN_CHUNK_ROWS = 500


def retention_ms(retention: timedelta) -> int:
    milliseconds = retention // timedelta(milliseconds=1)
    if milliseconds < 1:
        raise ValueError(f"retention {retention} must be positive")
    return milliseconds


def _now_ms() -> int:
    return int(time.time() * 1000)


def _database_file(connection: sqlite3.Connection) -> str:
    rows: list[tuple[int, str, str]] = connection.execute("PRAGMA database_list").fetchall()
    return next(file for _, name, file in rows if name == "main")


def _open_reader(path: str) -> sqlite3.Connection:
    """A read-only connection of its own: in WAL mode its one SELECT reads a fixed snapshot
    while the store's connection keeps writing."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA query_only = ON")
    return connection


def _claims_with_rows(
    records: Sequence[DecisionRecord], claims: Sequence[Claim], rows: list[tuple[Any, ...]]
) -> list[tuple[Claim, tuple[Any, ...]]]:
    """Each claim with its record's row (a claim without its record is refused)."""
    claim_of = claims_by_record(records, claims)
    return [
        (claim_of[record.transaction_id], row)
        for record, row in zip(records, rows, strict=True)
        if record.transaction_id in claim_of
    ]


def _connect(path: Path) -> sqlite3.Connection:
    # Applicants' data: 0600, like the key file (its -wal and -shm follow the file's mode).
    private_database(path)
    # Autocommit mode: transactions are opened explicitly where several statements go together.
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")
    # With WAL, NORMAL can lose the last commits on power loss but never corrupts the file.
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction on an autocommit connection; rolled back if the block raises."""
    # IMMEDIATE takes the write lock up front, so a read-then-write cannot be overtaken.
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _decision_row(columns: RecordColumns, expires_at_ms: int) -> tuple[Any, ...]:
    return (*columns.row(), expires_at_ms)


class SqliteStore:
    """`ExplanationStore` in one SQLite file; same semantics as the Cassandra store."""

    def __init__(
        self, connection: sqlite3.Connection, executor: ThreadPoolExecutor, retention: timedelta
    ) -> None:
        self._connection = connection
        self._executor = executor
        self._retention_ms = retention_ms(retention)

    @classmethod
    async def open(cls, path: Path, retention: timedelta) -> Self:
        """Open (creating if needed) the database file; the schema comes from `migrate`."""
        retention_ms(retention)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            connection = await asyncio.get_running_loop().run_in_executor(executor, _connect, path)
            return cls(connection, executor, retention)
        except BaseException:
            executor.shutdown(wait=False)
            raise

    @classmethod
    async def from_settings(cls, settings: Settings) -> Self:
        return await cls.open(settings.data_dir / DB_FILE, timedelta(days=settings.retention_days))

    async def migrate(self) -> None:
        await self._run(self._migrate)

    async def put_model(self, artifact: ModelArtifact) -> None:
        feature_names = ModelSchema.model_validate_json(artifact.schema_bytes).feature_names
        await self._run(self._put_model, artifact, feature_names, _now_ms())

    async def get_model(self, version: str) -> ModelArtifact | None:
        row = await self._run(self._fetch_one, SELECT_MODEL, (version,))
        if row is None:
            return None
        name, schema_json, model_json = row
        return ModelArtifact(
            name=name, version=version, schema_bytes=schema_json, model_bytes=model_json
        )

    async def find_claims(self, transaction_ids: Sequence[str]) -> dict[str, Claim]:
        return await self._run(self._find_claims, list(transaction_ids), _now_ms())

    async def write(self, records: Sequence[DecisionRecord], claims: Sequence[Claim] = ()) -> None:
        """Upsert a batch in one transaction; writing the same records again changes nothing."""
        # Retention counts from the decision, as in the Cassandra store: a replay keeps the expiry.
        rows = [
            _decision_row(columns, columns.decided_at_ms + self._retention_ms)
            for columns in map(to_columns, records)
        ]
        # Claims expire with their decisions, as in the Cassandra store (where they share a row).
        claim_rows = [
            (c.transaction_id, c.request_hash, c.response, row[-1])
            for c, row in _claims_with_rows(records, claims, rows)
        ]
        await self._run(self._write, rows, claim_rows)

    async def get(self, transaction_id: str) -> DecisionRecord | None:
        row = await self._run(self._fetch_one, SELECT_DECISION, (transaction_id, _now_ms()))
        return None if row is None else from_columns(RecordColumns(*row))

    async def model_versions(self) -> list[str]:
        rows = await self._run(self._fetch_all, SELECT_MODEL_VERSIONS, ())
        return [version for (version,) in rows]

    async def model_names(self) -> dict[str, str]:
        rows = await self._run(self._fetch_all, SELECT_MODEL_NAMES, ())
        return dict(rows)

    async def recent(
        self,
        model_version: str,
        day: date,
        limit: int,
        before: DecisionCursor | None = None,
        decision: str | None = None,
    ) -> list[DecisionSummary]:
        start = day_start(day)
        if before is None:
            before = DecisionCursor(start + timedelta(days=1), "")
        values: list[Any] = [
            model_version,
            to_epoch_ms(start),
            to_epoch_ms(before.decided_at),
            before.transaction_id,
            _now_ms(),
        ]
        sql = SELECT_RECENT
        if decision is not None:
            sql = SELECT_RECENT_BY_DECISION
            values.append(decision)
        rows = await self._run(self._fetch_all, sql, (*values, limit))
        return [
            decision_summary(txn, name, model_version, decided_at_ms, prediction)
            for txn, name, decided_at_ms, prediction in rows
        ]

    async def scan(
        self, model_version: str, start: datetime, end: datetime
    ) -> AsyncGenerator[DecisionRecord, None]:
        """Records of `model_version` decided in [start, end), by (decided_at, txn_id).

        One query on a reader connection and thread of its own, fetched in chunks: a long
        export neither holds the writer's thread nor sees rows written after it began.
        """
        parameters = (model_version, to_epoch_ms(start), to_epoch_ms(end), _now_ms())
        path = await self._run(_database_file, self._connection)
        loop = asyncio.get_running_loop()
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-scan")
        try:
            connection = await loop.run_in_executor(reader, _open_reader, path)
            try:
                cursor = await loop.run_in_executor(
                    reader, connection.execute, SCAN_DECISIONS, parameters
                )
                while rows := await loop.run_in_executor(reader, cursor.fetchmany, SCAN_CHUNK_ROWS):
                    for row in rows:
                        yield from_columns(RecordColumns(*row))
            finally:
                await loop.run_in_executor(reader, connection.close)
        finally:
            reader.shutdown(wait=False)

    async def ping(self) -> None:
        await self._run(self._fetch_one, "SELECT 1", ())

    async def close(self) -> None:
        await self._run(self._connection.close)
        self._executor.shutdown(wait=True)

    async def run_with_connection(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run `function` on this store's connection and thread (for the access store)."""
        return await self._run(function, self._connection)

    @property
    def retention(self) -> timedelta:
        return timedelta(milliseconds=self._retention_ms)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        except sqlite3.OperationalError as exc:
            # Locked past the busy timeout, or a disk that failed: an outage, as for Cassandra.
            raise StoreUnavailable(f"the SQLite store did not answer ({exc})") from exc

    def _migrate(self) -> None:
        with transaction(self._connection):
            for statement in SCHEMA:
                self._connection.execute(statement)
            present = {name for (name,) in self._connection.execute(SELECT_DECISION_COLUMNS)}
            for name, sql_type in ADDED_DECISION_COLUMNS:
                if name not in present:
                    self._connection.execute(ADD_DECISION_COLUMN.format(name=name, type=sql_type))

    def _fetch_one(self, sql: str, parameters: tuple[Any, ...]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._connection.execute(sql, parameters).fetchone()
        return row

    def _fetch_all(self, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._connection.execute(sql, parameters).fetchall()
        return rows

    def _write(self, rows: list[tuple[Any, ...]], claim_rows: list[tuple[Any, ...]]) -> None:
        with transaction(self._connection):
            self._connection.executemany(UPSERT_DECISION, rows)
            self._connection.executemany(UPSERT_CLAIM, claim_rows)

    def _find_claims(self, ids: list[str], now_ms: int) -> dict[str, Claim]:
        found: dict[str, Claim] = {}
        for txn in ids:
            row = self._connection.execute(SELECT_CLAIM, (txn, now_ms)).fetchone()
            if row is not None:
                found[txn] = Claim(transaction_id=txn, request_hash=row[0], response=row[1])
        return found

    def _put_model(self, artifact: ModelArtifact, feature_names: list[str], now_ms: int) -> None:
        with transaction(self._connection):
            self._connection.execute(
                INSERT_MODEL,
                (
                    artifact.version,
                    artifact.name,
                    artifact.schema_bytes,
                    artifact.model_bytes,
                    orjson.dumps(feature_names).decode(),
                    now_ms,
                ),
            )
            stored = self._connection.execute(SELECT_MODEL, (artifact.version,)).fetchone()
        if tuple(stored) != (artifact.name, artifact.schema_bytes, artifact.model_bytes):
            raise ModelConflictError(f"model {artifact.version} differs from the stored version")
