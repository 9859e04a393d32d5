"""Population aggregates and references in Cassandra, on the explanation store's session.

`population_parts` holds one row per (model version, UTC day, source): a handful of rows per
day (one per Kafka partition), each rewritten whole after every batch a worker writes. Reading
a window of days reads one partition per day. Rows carry the records' retention as TTL and
expire in write order (time-window compaction, as the records).
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from cassandra.query import BatchStatement, BatchType, PreparedStatement

from service.adapters.cassandra_session import Prepared, create_tables, execute, prepare
from service.adapters.cassandra_store import CassandraStore
from service.adapters.record_codec import to_epoch_ms
from service.core.ports import AggregatePart

CREATE_PARTS = """
CREATE TABLE IF NOT EXISTS {keyspace}.population_parts (
    model_version text,
    day date,
    source text,
    last_offset bigint,
    aggregate blob,
    PRIMARY KEY ((model_version, day), source)
) WITH compaction = {{'class': 'TimeWindowCompactionStrategy',
                      'compaction_window_unit': 'DAYS', 'compaction_window_size': 60}}"""

# No TTL: a version's reference must outlive every decision compared with it.
CREATE_REFERENCES = """
CREATE TABLE IF NOT EXISTS {keyspace}.population_references (
    model_version text PRIMARY KEY,
    reference blob,
    created_at timestamp
)"""

SCHEMA = (CREATE_PARTS, CREATE_REFERENCES)
TABLES = ("population_parts", "population_references")

UPSERT_PART = """
INSERT INTO {keyspace}.population_parts (model_version, day, source, last_offset, aggregate)
VALUES (?, ?, ?, ?, ?) USING TTL ?"""
SELECT_PART = """
SELECT last_offset, aggregate FROM {keyspace}.population_parts
WHERE model_version = ? AND day = ? AND source = ?"""
SELECT_DAY = """
SELECT source, last_offset, aggregate FROM {keyspace}.population_parts
WHERE model_version = ? AND day = ?"""
# First wins: a reference is set once (a lightweight transaction, run once per version).
INSERT_REFERENCE = """
INSERT INTO {keyspace}.population_references (model_version, reference, created_at)
VALUES (?, ?, ?) IF NOT EXISTS"""
SELECT_REFERENCE = "SELECT reference FROM {keyspace}.population_references WHERE model_version = ?"


@dataclass(frozen=True, slots=True)
class _Statements:
    upsert_part: PreparedStatement
    select_part: PreparedStatement
    select_day: PreparedStatement
    insert_reference: PreparedStatement
    select_reference: PreparedStatement


class CassandraPopulationStore:
    """`PopulationStore` on Cassandra, sharing `store`'s session."""

    def __init__(self, store: CassandraStore) -> None:
        self._session = store.session
        self._keyspace = store.keyspace
        self._ttl_s = store.ttl_s
        self._statements = Prepared(self._prepare_all)

    async def migrate(self) -> None:
        await create_tables(self._session, self._keyspace, SCHEMA)

    async def get_part(self, model_version: str, day: date, source: str) -> AggregatePart | None:
        statements = await self._statements.get()
        rows = await execute(self._session, statements.select_part, (model_version, day, source))
        if not rows:
            return None
        row = rows[0]
        return AggregatePart(model_version, day, source, row["last_offset"], row["aggregate"])

    async def put_parts(self, parts: Sequence[AggregatePart]) -> None:
        """One request per (version, day): its rows share a partition, so an unlogged batch
        of them is one write there (a worker's batch touches a row per source, in one or two
        days)."""
        statements = await self._statements.get()
        by_partition: dict[tuple[str, date], list[AggregatePart]] = {}
        for part in parts:
            by_partition.setdefault((part.model_version, part.day), []).append(part)
        requests = []
        for rows in by_partition.values():
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            batch.is_idempotent = True
            for p in rows:
                values = (p.model_version, p.day, p.source, p.last_offset, p.aggregate, self._ttl_s)
                batch.add(statements.upsert_part, values)
            requests.append(execute(self._session, batch))
        await asyncio.gather(*requests)

    async def parts(self, model_version: str, days: Sequence[date]) -> list[AggregatePart]:
        statements = await self._statements.get()
        pages = await asyncio.gather(
            *(execute(self._session, statements.select_day, (model_version, day)) for day in days)
        )
        return [
            AggregatePart(model_version, day, row["source"], row["last_offset"], row["aggregate"])
            for day, rows in zip(days, pages, strict=True)
            for row in rows
        ]

    async def put_reference(self, model_version: str, reference: bytes) -> bool:
        statements = await self._statements.get()
        now = to_epoch_ms(datetime.now(UTC))
        rows = await execute(
            self._session, statements.insert_reference, (model_version, reference, now)
        )
        return bool(rows and rows[0].get("[applied]"))

    async def get_reference(self, model_version: str) -> bytes | None:
        statements = await self._statements.get()
        rows = await execute(self._session, statements.select_reference, (model_version,))
        return rows[0]["reference"] if rows else None

    def _prepare_all(self) -> _Statements:
        def idempotent(cql: str) -> PreparedStatement:
            return prepare(self._session, self._keyspace, cql, idempotent=True)

        return _Statements(
            upsert_part=idempotent(UPSERT_PART),
            select_part=idempotent(SELECT_PART),
            select_day=idempotent(SELECT_DAY),
            insert_reference=prepare(
                self._session, self._keyspace, INSERT_REFERENCE, idempotent=False
            ),
            select_reference=idempotent(SELECT_REFERENCE),
        )
