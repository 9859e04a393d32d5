"""The explanation store on Apache Cassandra (cassandra-driver), bridged to asyncio.

Requests go through `service.adapters.cassandra_session`: sent with `execute_async`, awaited
on the event loop, never blocking it on the network.
"""

import asyncio
import re
import socket
import struct
import time
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Hashable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Self

from cassandra import ConsistencyLevel, InvalidRequest, ProtocolVersion
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    ResponseFuture,
    Session,
)

# Explicit, so a missing libev fails loudly instead of falling back: the asyncore reactor
# warns on import (deprecated module), and the asyncio reactor is marked experimental and calls
# `asyncio.set_event_loop` on whichever thread opens the first connection.
from cassandra.io.libevreactor import LibevConnection
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import (
    UNSET_VALUE,
    BoundStatement,
    PreparedStatement,
    SimpleStatement,
    Statement,
    dict_factory,
)

from service.adapters.cassandra_session import (
    SCHEMA_TIMEOUT_S,
    Prepared,
    bridge,
    driver_ms,
    execute,
    not_migrated,
    prepare,
)
from service.adapters.cql_batches import grouped_batches
from service.adapters.record_codec import (
    RecordColumns,
    claims_by_record,
    day_start,
    decision_summary,
    from_columns,
    to_columns,
    to_epoch_ms,
    utc_day,
    utc_days,
)
from service.core.ports import ModelConflictError
from service.core.records import (
    Claim,
    DecisionCursor,
    DecisionRecord,
    DecisionSummary,
    ModelArtifact,
)
from service.core.schema import ModelSchema
from service.hosts import parse_host_ports
from service.settings import CassandraSettings, Settings

DEFAULT_NATIVE_PORT = 9042
# Cassandra refuses TTLs above 20 years (Attributes.MAX_TTL).
MAX_TTL_S = 20 * 365 * 24 * 3600
# Before storage_compatibility_mode NONE (5.0), Cassandra stores expiry times as 32-bit seconds
# and rejects writes expiring later than this (CASSANDRA-14092); 7 years of retention reach it
# from 2031-01-19 on.
EXPIRY_LIMIT = datetime(2038, 1, 19, 3, 14, 6, tzinfo=UTC)
_KEYSPACE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")

# Partition sizing of decisions_by_day. Design load: 1,000 decisions/s on one model version,
# 86.4 M rows per (version, day). Measured on 10,000 German-credit decisions (20 features,
# binary), flushed to SSTables: a row is ~1.09 KB serialized (the inputs JSON, feature names
# included, is ~0.8 KB of it) and ~0.3 KB on disk with LZ4. The 100 MB guideline is about the
# serialized size, so a (version, day) holds ~94 GB and must be split: a partition holds
# 86.4 M / day_buckets rows, ~2.9 GB at 32 buckets, ~92 MB at 1,024, ~46 MB at 2,048 (and
# proportionally more with more features). A reader of a day scans buckets 0..day_buckets-1,
# so `day_buckets` must never change for a keyspace once written. The compliance columns
# (reasons, protected share, record hash) add ~0.2 KB of column data per row on average
# (1,000 German-credit decisions, a quarter of them denials with four reasons, ~0.7 KB at
# most), which puts a 2,048-bucket partition near 55 MB: still under the guideline.
CREATE_KEYSPACE = "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"

# Feature names live here once per model version; rows carry only the attribution vector.
# No TTL on models: a version in use for years must outlive every decision it explains.
CREATE_MODELS = """
CREATE TABLE IF NOT EXISTS {keyspace}.models (
    model_version text PRIMARY KEY,
    name text,
    schema_json blob,
    model_json blob,
    feature_names list<text>,
    registered_at timestamp
)"""

# Every row expires, and rows expire in the order they were written: time-window compaction
# drops whole SSTables at expiry instead of compacting tombstones. 60-day windows give ~43
# windows over 7 years.
_TIME_WINDOWS = (
    "compaction = {{'class': 'TimeWindowCompactionStrategy', "
    "'compaction_window_unit': 'DAYS', 'compaction_window_size': 60}}"
)

# Columns added to a released table go in an ALTER below (not here), so `shapstream db migrate`
# brings a keyspace made before them up to date.
CREATE_DECISIONS_BY_TXN = f"""
CREATE TABLE IF NOT EXISTS {{keyspace}}.decisions_by_txn (
    txn_id text PRIMARY KEY,
    model_name text,
    model_version text,
    inputs blob,
    prediction blob,
    decision text,
    base_value blob,
    attributions blob,
    additivity_error double,
    engine text,
    decided_at timestamp,
    explained_at timestamp,
    reasons blob,
    protected_share double,
    record_hash text
) WITH {_TIME_WINDOWS}"""

# Denormalised copy for the audit export and global importance, which scan by version and day.
CREATE_DECISIONS_BY_DAY = f"""
CREATE TABLE IF NOT EXISTS {{keyspace}}.decisions_by_day (
    model_version text,
    day date,
    bucket int,
    decided_at timestamp,
    txn_id text,
    model_name text,
    inputs blob,
    prediction blob,
    decision text,
    base_value blob,
    attributions blob,
    additivity_error double,
    engine text,
    explained_at timestamp,
    reasons blob,
    protected_share double,
    record_hash text,
    PRIMARY KEY ((model_version, day, bucket), decided_at, txn_id)
) WITH CLUSTERING ORDER BY (decided_at ASC, txn_id ASC) AND {_TIME_WINDOWS}"""

# A decision's claim (its request's hash and the answer's bytes) lives in its by-transaction
# row: the gateway reads it before deciding an id (docs/decision-path.md), and the worker
# writes it with the record, in the same statement. Added by ALTER, so `db migrate` brings a
# keyspace made before it up to date.
ADD_CLAIM_COLUMNS = """
ALTER TABLE {keyspace}.decisions_by_txn ADD IF NOT EXISTS (request_hash text, response blob)"""

# The model's format and framework version, in both decision tables; null in rows written
# before them (a record of then is hashed without them, `service.core.integrity`).
ADD_MODEL_FORMAT_COLUMNS = tuple(
    f"ALTER TABLE {{keyspace}}.{table} ADD IF NOT EXISTS (model_format text, "
    "framework_version text)"
    for table in ("decisions_by_txn", "decisions_by_day")
)

SCHEMA = (
    CREATE_KEYSPACE,
    CREATE_MODELS,
    CREATE_DECISIONS_BY_TXN,
    CREATE_DECISIONS_BY_DAY,
    ADD_CLAIM_COLUMNS,
    *ADD_MODEL_FORMAT_COLUMNS,
)
TABLES = ("models", "decisions_by_txn", "decisions_by_day")

# The claim's columns last; unset (not null, which would write tombstones) without a claim.
INSERT_DECISION_BY_TXN = """
INSERT INTO {keyspace}.decisions_by_txn (
    txn_id, model_name, model_version, inputs, prediction, decision, base_value, attributions,
    additivity_error, engine, model_format, framework_version, decided_at, explained_at, reasons,
    protected_share, record_hash, request_hash, response
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"""

INSERT_DECISION_BY_DAY = """
INSERT INTO {keyspace}.decisions_by_day (
    model_version, day, bucket, decided_at, txn_id, model_name, inputs, prediction, decision,
    base_value, attributions, additivity_error, engine, model_format, framework_version,
    explained_at, reasons, protected_share, record_hash
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"""

SELECT_DECISION = """
SELECT txn_id, model_name, model_version, inputs, prediction, decision, base_value, attributions,
       additivity_error, engine, model_format, framework_version, decided_at, explained_at,
       reasons, protected_share, record_hash
FROM {keyspace}.decisions_by_txn WHERE txn_id = ?"""

# Claims of many ids in one request (the gateway's concurrent requests, coalesced). Kept as
# long as the decision they answer for: a retry years later still gets the same answer.
SELECT_CLAIMS = (
    "SELECT txn_id, request_hash, response FROM {keyspace}.decisions_by_txn WHERE txn_id IN ?"
)

# IF NOT EXISTS keeps the first registration time when a process registers the version again.
INSERT_MODEL = """
INSERT INTO {keyspace}.models (
    model_version, name, schema_json, model_json, feature_names, registered_at
) VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"""

SELECT_MODEL = "SELECT name, schema_json, model_json FROM {keyspace}.models WHERE model_version = ?"

# A scan of the small models table (one row per version ever registered).
SELECT_MODEL_VERSIONS = "SELECT model_version FROM {keyspace}.models"
SELECT_MODEL_NAMES = "SELECT model_version, name FROM {keyspace}.models"

# The newest decisions of a (version, day): every bucket in one request, merged newest first by
# the coordinator (an IN on the partition key with ORDER BY needs paging off; LIMIT bounds it).
# ~0.1 s for 2,048 buckets on one node. The decision filter reads only the partitions named.
_SELECT_RECENT = """
SELECT txn_id, model_name, decided_at, prediction FROM {{keyspace}}.decisions_by_day
WHERE model_version = ? AND day = ? AND bucket IN ? AND (decided_at, txn_id) < (?, ?){filter}
ORDER BY decided_at DESC, txn_id DESC LIMIT ?{allow}"""
SELECT_RECENT = _SELECT_RECENT.format(filter="", allow="")
SELECT_RECENT_BY_DECISION = _SELECT_RECENT.format(
    filter=" AND decision = ?", allow=" ALLOW FILTERING"
)

# One (version, day, bucket) partition, sliced by time; columns as in SELECT_DECISION.
SELECT_DAY_PARTITION = """
SELECT txn_id, model_name, model_version, inputs, prediction, decision, base_value, attributions,
       additivity_error, engine, model_format, framework_version, decided_at, explained_at,
       reasons, protected_share, record_hash
FROM {keyspace}.decisions_by_day
WHERE model_version = ? AND day = ? AND bucket = ? AND decided_at >= ? AND decided_at < ?"""

# A scan reads the day_buckets partitions of each day in order, keeping this many queries ahead
# of the reader: most buckets of a day are empty or small, so one query at a time would spend
# the scan waiting on round trips. Memory stays bounded: at most one page per query ahead,
# plus the next page of the partition being read (~17 pages of SCAN_PAGE_ROWS rows).
SCAN_PARTITIONS_AHEAD = 16
SCAN_PAGE_ROWS = 1000

# Not prepared: a health check must answer before the schema exists.
SELECT_RELEASE = "SELECT release_version FROM system.local"
SELECT_STORAGE_MODE = (
    "SELECT value FROM system_views.settings WHERE name = 'storage_compatibility_mode'"
)
SELECT_TABLES = "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s"

# How Cassandra says a keyspace or table is missing (not migrated yet, or dropped).
_MISSING_SCHEMA = re.compile(r"unconfigured table|does not exist", re.IGNORECASE)


def parse_hosts(hosts: str) -> list[tuple[str, int]]:
    """`"h1:9042,[::1]:9042,h3"` as (host, port) pairs; the port defaults to 9042."""
    return parse_host_ports(hosts, DEFAULT_NATIVE_PORT, "Cassandra")


def native_port(points: Sequence[tuple[str, int]]) -> int:
    """The one port of all contact points: the driver dials every node it discovers on it."""
    ports = {port for _, port in points}
    if len(ports) != 1:
        raise ValueError(f"all Cassandra hosts must use the same native port, got {sorted(ports)}")
    return ports.pop()


def ttl_seconds(retention: timedelta) -> int:
    seconds = int(retention.total_seconds())
    if not 1 <= seconds <= MAX_TTL_S:
        raise ValueError(f"retention {retention} must be between 1 s and 20 years (Cassandra)")
    return seconds


def check_settings(settings: CassandraSettings, retention: timedelta) -> None:
    """Refuse what Cassandra would refuse later, before connecting."""
    if not _KEYSPACE_NAME.fullmatch(settings.keyspace):
        raise ValueError(f"invalid keyspace name {settings.keyspace!r}")
    native_port(parse_hosts(settings.hosts))
    ttl_seconds(retention)


def day_bucket(transaction_id: str, buckets: int) -> int:
    """Stable across processes and versions (unlike `hash()`), so a replay lands on the same row."""
    return zlib.crc32(transaction_id.encode()) % buckets


def replication_map(settings: CassandraSettings) -> str:
    if settings.local_dc:
        return (
            "{'class': 'NetworkTopologyStrategy', "
            f"'{settings.local_dc}': {settings.replication_factor}}}"
        )
    return f"{{'class': 'SimpleStrategy', 'replication_factor': {settings.replication_factor}}}"


def build_cluster(settings: CassandraSettings) -> Cluster:
    """A cluster object with the policies stated, not left to the driver's defaults."""
    points = parse_hosts(settings.hosts)
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(settings.local_dc or "")),
        # The driver's default is LOCAL_ONE: a decision record must survive a node loss.
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
        request_timeout=settings.request_timeout_s,
        row_factory=dict_factory,
    )
    auth = None
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else ""
        auth = PlainTextAuthProvider(username=settings.username, password=password)
    return Cluster(
        contact_points=[host for host, _ in points],
        port=native_port(points),
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        # Pinned: left to negotiate, the driver first tries DSE versions and logs a downgrade
        # warning on every connect. v4, not v5: v5 wraps every request and response in
        # segments whose header checksum (CRC24) the driver computes in pure Python, bit by
        # bit, ~8% of a worker's CPU here; TCP already checksums the bytes.
        protocol_version=ProtocolVersion.V4,
        connection_class=LibevConnection,
        # The driver writes a request in 4 KiB pieces; with Nagle's algorithm the last piece
        # of any larger request (a batch) waits for the server's delayed ACK: 40 ms each,
        # measured here. Requests are whole messages, so nothing is gained by holding them.
        sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        auth_provider=auth,
        connect_timeout=settings.request_timeout_s,
    )


def _discard(future: "asyncio.Future[Any]") -> None:
    """Drop a page no one will read: cancel it, or take its error so it is not logged as lost."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


def _row_columns(row: dict[str, Any]) -> RecordColumns:
    """A decision row (SELECT_DECISION or SELECT_DAY_PARTITION columns) in its stored form."""
    return RecordColumns(
        txn_id=row["txn_id"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        inputs=row["inputs"],
        prediction=row["prediction"],
        decision=row["decision"],
        base_value=row["base_value"],
        attributions=row["attributions"],
        additivity_error=row["additivity_error"],
        engine=row["engine"],
        model_format=row["model_format"],
        framework_version=row["framework_version"],
        decided_at_ms=driver_ms(row["decided_at"]),
        explained_at_ms=driver_ms(row["explained_at"]),
        reasons=row["reasons"],
        protected_share=row["protected_share"],
        record_hash=row["record_hash"],
    )


@dataclass(frozen=True, slots=True)
class _Statements:
    insert_by_txn: PreparedStatement
    insert_by_day: PreparedStatement
    select_decision: PreparedStatement
    select_claims: PreparedStatement
    insert_model: PreparedStatement
    select_model: PreparedStatement
    select_model_versions: PreparedStatement
    select_model_names: PreparedStatement
    select_day_partition: PreparedStatement
    select_recent: PreparedStatement
    select_recent_by_decision: PreparedStatement


class CassandraStore:
    """`ExplanationStore` on Cassandra: LOCAL_QUORUM upserts with a TTL, claims in the records."""

    def __init__(
        self,
        cluster: Cluster,
        session: Session,
        settings: CassandraSettings,
        retention: timedelta,
    ) -> None:
        check_settings(settings, retention)
        self._cluster = cluster
        self._session = session
        self._settings = settings
        self._ttl_s = ttl_seconds(retention)
        self._fast_timeout_s = settings.fast_timeout_s
        self._replication = settings.replication_factor
        self._statements = Prepared(self._prepare_all)

    @classmethod
    async def connect(cls, settings: CassandraSettings, retention: timedelta) -> Self:
        """Connect to the cluster; the schema may not exist yet (see `migrate`)."""
        check_settings(settings, retention)
        cluster = build_cluster(settings)
        try:
            session = await asyncio.to_thread(cluster.connect)
            store = cls(cluster, session, settings, retention)
            await store._check_expiry_limit()
            return store
        except BaseException:
            await asyncio.to_thread(cluster.shutdown)
            raise

    @classmethod
    async def from_settings(cls, settings: Settings) -> Self:
        return await cls.connect(settings.cassandra, timedelta(days=settings.retention_days))

    @property
    def keyspace(self) -> str:
        return self._settings.keyspace

    @property
    def session(self) -> Session:
        """The driver session, shared with the access store (one cluster connection)."""
        return self._session

    @property
    def ttl_s(self) -> int:
        return self._ttl_s

    async def migrate(self) -> None:
        for cql in SCHEMA:
            text = cql.format(keyspace=self.keyspace, replication=replication_map(self._settings))
            await execute(self._session, SimpleStatement(text), timeout_s=SCHEMA_TIMEOUT_S)

    async def existing_tables(self) -> set[str]:
        """Tables of this store's keyspace that exist now (empty when the keyspace does not)."""
        rows = await execute(self._session, SimpleStatement(SELECT_TABLES), (self.keyspace,))
        return {row["table_name"] for row in rows}

    async def put_model(self, artifact: ModelArtifact) -> None:
        statements = await self._statements.get()
        feature_names = ModelSchema.model_validate_json(artifact.schema_bytes).feature_names
        values = (
            artifact.version,
            artifact.name,
            artifact.schema_bytes,
            artifact.model_bytes,
            feature_names,
            int(time.time() * 1000),
        )
        rows = await execute(self._session, statements.insert_model, values)
        stored = rows[0]
        if not stored["[applied]"] and (
            stored["name"],
            stored["schema_json"],
            stored["model_json"],
        ) != (artifact.name, artifact.schema_bytes, artifact.model_bytes):
            raise ModelConflictError(f"model {artifact.version} differs from the stored version")

    async def get_model(self, version: str) -> ModelArtifact | None:
        statements = await self._statements.get()
        rows = await execute(self._session, statements.select_model, (version,))
        if not rows:
            return None
        row = rows[0]
        return ModelArtifact(
            name=row["name"],
            version=version,
            schema_bytes=row["schema_json"],
            model_bytes=row["model_json"],
        )

    async def find_claims(self, transaction_ids: Sequence[str]) -> dict[str, Claim]:
        """One `IN` query per replica set, at the gateway's short deadline."""
        statements = await self._statements.get()
        ids = transaction_ids
        groups: dict[Hashable, list[str]] = {}
        for txn in ids:
            groups.setdefault(self._replicas_of(txn.encode()), []).append(txn)
        pages = await asyncio.gather(
            *(
                execute(
                    self._session,
                    statements.select_claims,
                    (group,),
                    timeout_s=self._fast_timeout_s,
                )
                for group in groups.values()
            )
        )
        return {
            row["txn_id"]: Claim(
                transaction_id=row["txn_id"],
                request_hash=row["request_hash"],
                response=row["response"],
            )
            for rows in pages
            for row in rows
            # A record written without its claim (none of this service's) claims nothing.
            if row["request_hash"] is not None
        }

    def _replicas_of(self, routing_key: bytes) -> Hashable:
        """The nodes holding a partition key; one group for all when every node holds every
        partition (RF >= nodes: a single node, or three nodes at RF 3) or the ring is unknown."""
        metadata = self._cluster.metadata
        if metadata.token_map is None or len(metadata.all_hosts()) <= self._replication:
            return None
        return frozenset(metadata.get_replicas(self.keyspace, routing_key))

    async def write(self, records: Sequence[DecisionRecord], claims: Sequence[Claim] = ()) -> None:
        """Upsert each record into both tables (its claim, if given, in its by-transaction row)
        in unlogged batches of rows sharing their replicas, `write_concurrency` requests in
        flight at most.

        Raises the first failure (a timeout included: the write may or may not have landed,
        and the caller redelivers; every statement is an idempotent upsert).
        """
        statements = await self._statements.get()
        now_ms = int(time.time() * 1000)
        claim_of = claims_by_record(records, claims)
        # Encoded and bound (routing key included) up front: a record the driver cannot
        # encode fails the batch before anything is sent.
        writes = [
            write
            for columns in map(to_columns, records)
            for write in self._record_writes(
                statements,
                columns,
                claim_of.get(columns.txn_id),
                self._record_ttl(columns, now_ms),
            )
        ]
        # Batched, a worker's batch is a handful of requests: each awaited on the event loop
        # costs less than handing the lot to a thread.
        limit = asyncio.Semaphore(self._settings.write_concurrency)

        async def send(request: Statement) -> None:
            async with limit:
                try:
                    await execute(self._session, request)
                except InvalidRequest as exc:
                    if _MISSING_SCHEMA.search(str(exc)):
                        raise not_migrated(exc) from exc
                    # The server refused the content (a value too large, say), not an outage:
                    # the caller writes record by record and sets the refused one aside.
                    raise ValueError(f"Cassandra refused a write: {exc}") from exc

        # The first failure is raised as it is (StoreUnavailable for an outage); the other
        # requests still finish, harmlessly: the caller writes the whole batch again.
        await asyncio.gather(*(send(r) for r in grouped_batches(writes, self._replicas_of)))

    async def get(self, transaction_id: str) -> DecisionRecord | None:
        statements = await self._statements.get()
        rows = await execute(self._session, statements.select_decision, (transaction_id,))
        if not rows:
            return None
        return from_columns(_row_columns(rows[0]))

    async def model_versions(self) -> list[str]:
        statements = await self._statements.get()
        query = statements.select_model_versions.bind(())
        versions = [
            row["model_version"]
            async for page in self._pages_in_order(iter([query]))
            for row in page
        ]
        return sorted(versions)

    async def model_names(self) -> dict[str, str]:
        statements = await self._statements.get()
        query = statements.select_model_names.bind(())
        return {
            row["model_version"]: row["name"]
            async for page in self._pages_in_order(iter([query]))
            for row in page
        }

    async def recent(
        self,
        model_version: str,
        day: date,
        limit: int,
        before: DecisionCursor | None = None,
        decision: str | None = None,
    ) -> list[DecisionSummary]:
        statements = await self._statements.get()
        buckets = list(range(self._settings.day_buckets))
        if before is None:
            # ("", the next day's first instant): every decision of the day comes before it.
            before = DecisionCursor(day_start(day + timedelta(days=1)), "")
        values: list[Any] = [
            model_version,
            day,
            buckets,
            to_epoch_ms(before.decided_at),
            before.transaction_id,
        ]
        statement = statements.select_recent
        if decision is not None:
            statement = statements.select_recent_by_decision
            values.append(decision)
        rows = await execute(self._session, statement, [*values, limit])
        return [
            decision_summary(
                row["txn_id"],
                row["model_name"],
                model_version,
                driver_ms(row["decided_at"]),
                row["prediction"],
            )
            for row in rows
        ]

    async def scan(
        self, model_version: str, start: datetime, end: datetime
    ) -> AsyncGenerator[DecisionRecord, None]:
        """Records of `model_version` decided in [start, end), by (day, bucket, decided_at, txn_id).

        Not in global time order: each day's buckets are read one after the other, and each
        bucket is in time order. Rows are decoded one at a time, as the reader asks for them.
        """
        statements = await self._statements.get()
        start_ms, end_ms = to_epoch_ms(start), to_epoch_ms(end)
        partitions = (
            statements.select_day_partition.bind((model_version, day, bucket, start_ms, end_ms))
            for day in utc_days(start_ms, end_ms)
            for bucket in range(self._settings.day_buckets)
        )
        async for page in self._pages_in_order(partitions, SCAN_PARTITIONS_AHEAD):
            for row in page:
                yield from_columns(_row_columns(row))

    async def _pages_in_order(
        self, queries: Iterator[BoundStatement], ahead: int = 1
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every page of every query, in query order, with up to `ahead` queries in flight.

        The next page of the query being read is fetched while its current page is consumed.
        Leaving early (or failing) cancels what is still in flight.

        Sent without the driver's timeout, and awaited with `request_timeout_s` here instead:
        the driver's timer refers back to its `ResponseFuture`, so every response (and the page
        of rows it keeps) would sit in a reference cycle until a full garbage collection, and
        a long scan's memory would follow the collector's schedule instead of staying flat.
        """
        loop = asyncio.get_running_loop()
        deadline_s = self._settings.request_timeout_s
        waiting: deque[tuple[ResponseFuture, asyncio.Future[Any]]] = deque()
        current: asyncio.Future[Any] | None = None

        def send_next() -> None:
            query = next(queries, None)
            if query is not None:
                response = self._session.execute_async(query, timeout=None)
                waiting.append((response, bridge(response, loop)))

        try:
            for _ in range(ahead):
                send_next()
            while waiting:
                response, current = waiting.popleft()
                send_next()
                while True:
                    rows: list[dict[str, Any]] = (await asyncio.wait_for(current, deadline_s)) or []
                    more = response.has_more_pages
                    if more:
                        # Callbacks stay registered across pages; the old future is settled.
                        response.clear_callbacks()
                        response.start_fetching_next_page()
                        current = bridge(response, loop)
                    yield rows
                    if not more:
                        break
        finally:
            for future in [*(page for _, page in waiting), *([current] if current else [])]:
                _discard(future)

    async def ping(self) -> None:
        rows = await execute(self._session, SimpleStatement(SELECT_RELEASE))
        if not rows:
            raise RuntimeError("system.local returned no row")

    async def close(self) -> None:
        await asyncio.to_thread(self._cluster.shutdown)

    async def _check_expiry_limit(self) -> None:
        """Refuse to start, rather than fail every write, when retention crosses EXPIRY_LIMIT."""
        rows = await execute(self._session, SimpleStatement(SELECT_STORAGE_MODE))
        # Cassandra 4.x has no such setting (no row) and always has the limit.
        if rows and rows[0]["value"] == "NONE":
            return
        if datetime.now(UTC) + timedelta(seconds=self._ttl_s) >= EXPIRY_LIMIT:
            raise ValueError(
                f"retention of {self._ttl_s} s expires past {EXPIRY_LIMIT:%Y-%m-%d}, which this "
                "Cassandra refuses: lower the retention or run Cassandra 5 with "
                "storage_compatibility_mode: NONE"
            )

    def _record_ttl(self, columns: RecordColumns, now_ms: int) -> int:
        # Retention counts from the decision, not from this write: a replay keeps the same
        # expiry, and a late write never keeps a record longer than the policy says. An
        # already expired record still gets 1 s, because a TTL of 0 would mean "keep forever".
        elapsed_s = max(now_ms - columns.decided_at_ms, 0) // 1000
        return max(self._ttl_s - elapsed_s, 1)

    def _record_writes(
        self, statements: _Statements, columns: RecordColumns, claim: Claim | None, ttl: int
    ) -> tuple[BoundStatement, BoundStatement]:
        """The two upserts of one record, never in a logged batch together.

        A logged batch would make Cassandra write and delete a batchlog entry per record (the
        dearest part of the write at 1,000 records/s). It is not needed: the worker commits
        its offsets only after both writes succeeded, so a copy missing after a crash is
        rewritten on redelivery; both upserts are idempotent, so the driver may retry them.
        They travel in unlogged batches of rows sharing their replicas (`grouped_batches`).
        """
        day = utc_day(columns.decided_at_ms)
        bucket = day_bucket(columns.txn_id, self._settings.day_buckets)
        request_hash, response = (
            (claim.request_hash, claim.response) if claim else (UNSET_VALUE, UNSET_VALUE)
        )
        by_txn = statements.insert_by_txn.bind((*columns.row(), request_hash, response, ttl))
        by_day = statements.insert_by_day.bind(
            (
                columns.model_version,
                day,
                bucket,
                columns.decided_at_ms,
                columns.txn_id,
                columns.model_name,
                columns.inputs,
                columns.prediction,
                columns.decision,
                columns.base_value,
                columns.attributions,
                columns.additivity_error,
                columns.engine,
                columns.model_format,
                columns.framework_version,
                columns.explained_at_ms,
                columns.reasons,
                columns.protected_share,
                columns.record_hash,
                ttl,
            ),
        )
        for write in (by_txn, by_day):
            try:
                _ = write.routing_key
            except struct.error as exc:
                raise ValueError(f"a key of record {columns.txn_id[:64]!r} is too long") from exc
        return by_txn, by_day

    def _prepare_all(self) -> _Statements:
        def idempotent(cql: str, page_rows: int | None = None) -> PreparedStatement:
            return prepare(self._session, self.keyspace, cql, idempotent=True, page_rows=page_rows)

        def unpaged(cql: str) -> PreparedStatement:
            statement = idempotent(cql)
            statement.fetch_size = None
            return statement

        return _Statements(
            insert_by_txn=idempotent(INSERT_DECISION_BY_TXN),
            insert_by_day=idempotent(INSERT_DECISION_BY_DAY),
            select_decision=idempotent(SELECT_DECISION),
            select_claims=idempotent(SELECT_CLAIMS),
            insert_model=prepare(self._session, self.keyspace, INSERT_MODEL, idempotent=False),
            select_model=idempotent(SELECT_MODEL),
            select_model_versions=idempotent(SELECT_MODEL_VERSIONS),
            select_model_names=idempotent(SELECT_MODEL_NAMES),
            select_day_partition=idempotent(SELECT_DAY_PARTITION, page_rows=SCAN_PAGE_ROWS),
            select_recent=unpaged(SELECT_RECENT),
            select_recent_by_decision=unpaged(SELECT_RECENT_BY_DECISION),
        )
