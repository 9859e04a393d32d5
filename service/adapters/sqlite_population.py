"""Population aggregates and references in the embedded SQLite file, on the store's connection.

The same rows as the Cassandra adapter's; retention is an expiry time each row carries.
"""

import sqlite3
import time
from collections.abc import Sequence
from datetime import date

from service.adapters.sqlite_store import SqliteStore, retention_ms, transaction
from service.core.ports import AggregatePart

CREATE_PARTS = """
CREATE TABLE IF NOT EXISTS population_parts (
    model_version TEXT NOT NULL,
    day TEXT NOT NULL,
    source TEXT NOT NULL,
    last_offset INTEGER NOT NULL,
    aggregate BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (model_version, day, source)
)"""

CREATE_REFERENCES = """
CREATE TABLE IF NOT EXISTS population_references (
    model_version TEXT PRIMARY KEY,
    reference BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
)"""

SCHEMA = (CREATE_PARTS, CREATE_REFERENCES)

UPSERT_PART = """
INSERT OR REPLACE INTO population_parts
    (model_version, day, source, last_offset, aggregate, expires_at_ms)
VALUES (?, ?, ?, ?, ?, ?)"""
SELECT_PART = """
SELECT last_offset, aggregate FROM population_parts
WHERE model_version = ? AND day = ? AND source = ? AND expires_at_ms > ?"""
SELECT_DAY = """
SELECT source, last_offset, aggregate FROM population_parts
WHERE model_version = ? AND day = ? AND expires_at_ms > ? ORDER BY source"""
INSERT_REFERENCE = """
INSERT OR IGNORE INTO population_references (model_version, reference, created_at_ms)
VALUES (?, ?, ?)"""
SELECT_REFERENCE = "SELECT reference FROM population_references WHERE model_version = ?"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqlitePopulationStore:
    """`PopulationStore` in the embedded store's SQLite file."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._retention_ms = retention_ms(store.retention)

    async def migrate(self) -> None:
        await self._store.run_with_connection(_migrate)

    async def get_part(self, model_version: str, day: date, source: str) -> AggregatePart | None:
        values = (model_version, day.isoformat(), source, _now_ms())
        row = await self._store.run_with_connection(
            lambda c: c.execute(SELECT_PART, values).fetchone()
        )
        return None if row is None else AggregatePart(model_version, day, source, *row)

    async def put_parts(self, parts: Sequence[AggregatePart]) -> None:
        expires = _now_ms() + self._retention_ms
        rows = [
            (p.model_version, p.day.isoformat(), p.source, p.last_offset, p.aggregate, expires)
            for p in parts
        ]
        await self._store.run_with_connection(lambda c: _upsert_all(c, rows))

    async def parts(self, model_version: str, days: Sequence[date]) -> list[AggregatePart]:
        now = _now_ms()

        def read(connection: sqlite3.Connection) -> list[AggregatePart]:
            return [
                AggregatePart(model_version, day, source, last_offset, aggregate)
                for day in days
                for source, last_offset, aggregate in connection.execute(
                    SELECT_DAY, (model_version, day.isoformat(), now)
                )
            ]

        return await self._store.run_with_connection(read)

    async def put_reference(self, model_version: str, reference: bytes) -> bool:
        values = (model_version, reference, _now_ms())
        inserted = await self._store.run_with_connection(
            lambda c: c.execute(INSERT_REFERENCE, values).rowcount
        )
        return bool(inserted)

    async def get_reference(self, model_version: str) -> bytes | None:
        row = await self._store.run_with_connection(
            lambda c: c.execute(SELECT_REFERENCE, (model_version,)).fetchone()
        )
        return None if row is None else bytes(row[0])


def _upsert_all(connection: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    # One transaction: a batch's parts are written together or not at all.
    with transaction(connection):
        connection.executemany(UPSERT_PART, rows)


def _migrate(connection: sqlite3.Connection) -> None:
    for statement in SCHEMA:
        connection.execute(statement)
