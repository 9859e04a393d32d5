"""API keys and the access log in the embedded SQLite file, on the explanation store's connection.

Retention mirrors the Cassandra adapter's TTL: each log entry carries `expires_at_ms`, which
reads honour. Keys do not expire; they live until revoked.
"""

import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service.adapters.sqlite_store import SqliteStore, retention_ms, transaction
from service.core.access import AccessEntry, Action, ApiKey, parse_scopes

CREATE_API_KEYS = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
)"""

# The entry id breaks ties between entries of the same millisecond.
CREATE_ACCESS_LOG = """
CREATE TABLE IF NOT EXISTS access_log (
    at_ms INTEGER NOT NULL,
    entry_id TEXT NOT NULL,
    key_name TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (at_ms, entry_id)
)"""

SCHEMA = (CREATE_API_KEYS, CREATE_ACCESS_LOG)
TABLES = ("api_keys", "access_log")

UPSERT_KEY = """
INSERT OR REPLACE INTO api_keys (key_hash, name, scopes, created_at_ms) VALUES (?, ?, ?, ?)"""
SELECT_KEY = "SELECT key_hash, name, scopes, created_at_ms FROM api_keys WHERE key_hash = ?"
SELECT_KEYS = "SELECT key_hash, name, scopes, created_at_ms FROM api_keys ORDER BY created_at_ms"
DELETE_KEY = "DELETE FROM api_keys WHERE key_hash = ?"

INSERT_ENTRY = """
INSERT INTO access_log (at_ms, entry_id, key_name, action, target, expires_at_ms)
VALUES (?, ?, ?, ?, ?, ?)"""
SELECT_ENTRIES = """
SELECT at_ms, key_name, action, target FROM access_log
WHERE at_ms >= ? AND at_ms < ? AND expires_at_ms > ?
ORDER BY at_ms, entry_id LIMIT ?"""


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _moment(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _key(row: tuple[str, str, str, int]) -> ApiKey:
    key_hash, name, scopes, created_at_ms = row
    return ApiKey(name, key_hash, parse_scopes(scopes), _moment(created_at_ms))


class SqliteAccessStore:
    """`AccessStore` in the embedded store's SQLite file."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        # An entry is kept as long as the decisions it concerns, and no longer (see the
        # Cassandra adapter).
        self._retention_ms = retention_ms(store.retention)

    async def migrate(self) -> None:
        await self._store.run_with_connection(_migrate)

    async def put_key(self, key: ApiKey) -> None:
        row = (key.key_hash, key.name, ",".join(sorted(key.scopes)), _ms(key.created_at))
        await self._store.run_with_connection(lambda c: c.execute(UPSERT_KEY, row))

    async def get_key(self, key_hash: str) -> ApiKey | None:
        row = await self._store.run_with_connection(
            lambda c: c.execute(SELECT_KEY, (key_hash,)).fetchone()
        )
        return None if row is None else _key(row)

    async def delete_key(self, key_hash: str) -> None:
        await self._store.run_with_connection(lambda c: c.execute(DELETE_KEY, (key_hash,)))

    async def keys(self) -> list[ApiKey]:
        rows = await self._store.run_with_connection(lambda c: c.execute(SELECT_KEYS).fetchall())
        return [_key(row) for row in rows]

    async def record(self, entry: AccessEntry) -> None:
        row = self._row(entry)
        await self._store.run_with_connection(lambda c: c.execute(INSERT_ENTRY, row))

    async def record_many(self, entries: Sequence[AccessEntry]) -> None:
        """All in one transaction: one commit on the store's thread, however many entries."""
        rows = [self._row(entry) for entry in entries]
        await self._store.run_with_connection(lambda c: _insert_all(c, rows))

    def _row(self, entry: AccessEntry) -> tuple[int, str, str, str, str, int]:
        at_ms = _ms(entry.at)
        return (
            at_ms,
            str(uuid.uuid4()),
            entry.key_name,
            entry.action.value,
            entry.target,
            at_ms + self._retention_ms,
        )

    async def entries(self, start: datetime, end: datetime, limit: int) -> list[AccessEntry]:
        now_ms = _ms(datetime.now(UTC))
        parameters = (_ms(start), _ms(end), now_ms, limit)
        rows = await self._store.run_with_connection(
            lambda c: c.execute(SELECT_ENTRIES, parameters).fetchall()
        )
        return [
            AccessEntry(_moment(at_ms), key_name, Action(action), target)
            for at_ms, key_name, action, target in rows
        ]


def _insert_all(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    with transaction(connection):
        connection.executemany(INSERT_ENTRY, rows)


def _migrate(connection: sqlite3.Connection) -> None:
    # Autocommit connection: each CREATE ... IF NOT EXISTS stands alone and is idempotent.
    for statement in SCHEMA:
        connection.execute(statement)
