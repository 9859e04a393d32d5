"""API keys and the access log in Cassandra, on the explanation store's session.

One cluster connection per process: this adapter borrows `CassandraStore.session` instead of
opening its own, and sends on it as the store does (`service.adapters.cassandra_session`).
"""

import asyncio
import heapq
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cassandra.query import BoundStatement, PreparedStatement

from service.adapters.cassandra_session import (
    Prepared,
    create_tables,
    execute,
    from_driver,
    prepare,
)
from service.adapters.cassandra_store import CassandraStore
from service.adapters.cql_batches import grouped_batches
from service.adapters.record_codec import to_epoch_ms, utc_day, utc_days
from service.core.access import AccessEntry, Action, ApiKey, Scope

# Keys never expire: they live until revoked (`shapstream keys revoke`). The table is tiny and
# read only on a verifier cache miss.
CREATE_API_KEYS = """
CREATE TABLE IF NOT EXISTS {keyspace}.api_keys (
    key_hash text PRIMARY KEY,
    name text,
    scopes set<text>,
    created_at timestamp
)"""

# Partitioned by UTC day and a bucket. An entry is ~120 bytes serialized: one partition per
# day would pass Cassandra's 100 MB guideline at ~10 reads/s sustained; 16 buckets allow ~150
# reads/s, and listing a day costs 16 partition reads. Never change ACCESS_LOG_BUCKETS once a
# keyspace holds entries: readers scan buckets 0..N-1.
# Every entry carries the records' retention as its TTL: an examiner asking who saw a decision
# must get an answer as long as the decision is kept, and the log (which names transactions)
# must not outlive it. Entries expire in write order, so time-window compaction drops whole
# SSTables instead of compacting tombstones.
CREATE_ACCESS_LOG = """
CREATE TABLE IF NOT EXISTS {keyspace}.access_log (
    day date,
    bucket int,
    accessed_at timestamp,
    entry_id uuid,
    key_name text,
    action text,
    target text,
    PRIMARY KEY ((day, bucket), accessed_at, entry_id)
) WITH CLUSTERING ORDER BY (accessed_at ASC, entry_id ASC)
  AND compaction = {{'class': 'TimeWindowCompactionStrategy',
                     'compaction_window_unit': 'DAYS', 'compaction_window_size': 60}}"""

SCHEMA = (CREATE_API_KEYS, CREATE_ACCESS_LOG)
TABLES = ("api_keys", "access_log")
ACCESS_LOG_BUCKETS = 16

INSERT_KEY = """
INSERT INTO {keyspace}.api_keys (key_hash, name, scopes, created_at) VALUES (?, ?, ?, ?)"""
SELECT_KEY = "SELECT key_hash, name, scopes, created_at FROM {keyspace}.api_keys WHERE key_hash = ?"
# A full scan, for the CLI only: the table holds one row per key.
SELECT_KEYS = "SELECT key_hash, name, scopes, created_at FROM {keyspace}.api_keys"
DELETE_KEY = "DELETE FROM {keyspace}.api_keys WHERE key_hash = ?"

INSERT_ENTRY = """
INSERT INTO {keyspace}.access_log (
    day, bucket, accessed_at, entry_id, key_name, action, target
) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"""

SELECT_ENTRIES = """
SELECT accessed_at, entry_id, key_name, action, target FROM {keyspace}.access_log
WHERE day = ? AND bucket = ? AND accessed_at >= ? AND accessed_at < ? LIMIT ?"""


@dataclass(frozen=True, slots=True)
class _Statements:
    insert_key: PreparedStatement
    select_key: PreparedStatement
    select_keys: PreparedStatement
    delete_key: PreparedStatement
    insert_entry: PreparedStatement
    select_entries: PreparedStatement


def _key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        name=row["name"],
        key_hash=row["key_hash"],
        scopes=frozenset(Scope(s) for s in row["scopes"] or ()),
        created_at=from_driver(row["created_at"]),
    )


class CassandraAccessStore:
    """`AccessStore` on Cassandra, sharing `store`'s session; LOCAL_QUORUM like the records."""

    def __init__(self, store: CassandraStore) -> None:
        self._session = store.session
        self._keyspace = store.keyspace
        self._ttl_s = store.ttl_s
        self._statements = Prepared(self._prepare_all)

    async def migrate(self) -> None:
        """Create the tables (the keyspace comes from the explanation store's `migrate`)."""
        await create_tables(self._session, self._keyspace, SCHEMA)

    async def put_key(self, key: ApiKey) -> None:
        statements = await self._statements.get()
        scopes = {s.value for s in key.scopes}
        values = (key.key_hash, key.name, scopes, to_epoch_ms(key.created_at))
        await execute(self._session, statements.insert_key.bind(values))

    async def get_key(self, key_hash: str) -> ApiKey | None:
        statements = await self._statements.get()
        rows = await execute(self._session, statements.select_key.bind((key_hash,)))
        return _key(rows[0]) if rows else None

    async def delete_key(self, key_hash: str) -> None:
        statements = await self._statements.get()
        await execute(self._session, statements.delete_key.bind((key_hash,)))

    async def keys(self) -> list[ApiKey]:
        statements = await self._statements.get()
        bound = statements.select_keys.bind(())
        bound.fetch_size = None
        return sorted(map(_key, await execute(self._session, bound)), key=lambda k: k.created_at)

    async def record(self, entry: AccessEntry) -> None:
        statements = await self._statements.get()
        entry_id = uuid.uuid4()
        bound = self._bind_entry(statements, entry, entry_id, entry_id.int % ACCESS_LOG_BUCKETS)
        await execute(self._session, bound)

    async def record_many(self, entries: Sequence[AccessEntry]) -> None:
        """One bucket for the lot (chosen at random, as one entry's would be), so the entries
        of a day share a partition and go as one unlogged batch (split past its limits)."""
        if not entries:
            return
        statements = await self._statements.get()
        bucket = uuid.uuid4().int % ACCESS_LOG_BUCKETS
        bound = [self._bind_entry(statements, e, uuid.uuid4(), bucket) for e in entries]
        # Grouped by partition (the routing key): a batch never spans two.
        batches = grouped_batches(bound, lambda routing_key: routing_key)
        await asyncio.gather(*(execute(self._session, batch) for batch in batches))

    def _bind_entry(
        self, statements: _Statements, entry: AccessEntry, entry_id: uuid.UUID, bucket: int
    ) -> BoundStatement:
        # The partition's day is the day of the stored time, to the millisecond.
        at_ms = to_epoch_ms(entry.at)
        values = (
            utc_day(at_ms),
            bucket,
            at_ms,
            entry_id,
            entry.key_name,
            entry.action.value,
            entry.target,
            self._entry_ttl(entry.at),
        )
        return statements.insert_entry.bind(values)

    async def entries(self, start: datetime, end: datetime, limit: int) -> list[AccessEntry]:
        """Day by day, the buckets of a day read concurrently and merged in time order."""
        if end <= start or limit < 1:
            return []
        statements = await self._statements.get()
        found: list[AccessEntry] = []
        start_ms, end_ms = to_epoch_ms(start), to_epoch_ms(end)
        for day in utc_days(start_ms, end_ms):
            wanted = limit - len(found)
            reads = []
            for bucket in range(ACCESS_LOG_BUCKETS):
                bound = statements.select_entries.bind((day, bucket, start_ms, end_ms, wanted))
                # One page of at most `wanted` rows: the driver would otherwise stop at 5,000.
                bound.fetch_size = None
                reads.append(execute(self._session, bound))
            buckets = await asyncio.gather(*reads)
            merged = heapq.merge(*buckets, key=lambda r: (r["accessed_at"], r["entry_id"]))
            for row in merged:
                found.append(
                    AccessEntry(
                        at=from_driver(row["accessed_at"]),
                        key_name=row["key_name"],
                        action=Action(row["action"]),
                        target=row["target"],
                    )
                )
                if len(found) == limit:
                    return found
        return found

    def _entry_ttl(self, at: datetime) -> int:
        # Retention counts from the access, as it counts from the decision for records (and
        # as the SQLite adapter does); at least 1 s, since a TTL of 0 would mean "forever".
        elapsed_s = max(int((datetime.now(UTC) - at).total_seconds()), 0)
        return max(self._ttl_s - elapsed_s, 1)

    def _prepare_all(self) -> _Statements:
        def idempotent(cql: str) -> PreparedStatement:
            # Every statement may be retried: keys are upserts and deletes by primary key, and
            # an entry's random id makes a retried insert land on the same row.
            return prepare(self._session, self._keyspace, cql, idempotent=True)

        return _Statements(
            insert_key=idempotent(INSERT_KEY),
            select_key=idempotent(SELECT_KEY),
            select_keys=idempotent(SELECT_KEYS),
            delete_key=idempotent(DELETE_KEY),
            insert_entry=idempotent(INSERT_ENTRY),
            select_entries=idempotent(SELECT_ENTRIES),
        )
