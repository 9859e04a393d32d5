"""The Cassandra store on the real node: the shared store contract, TTLs, failures, settings."""

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cassandra.cluster import Session

from service.adapters.cassandra_store import (
    ADD_MODEL_FORMAT_COLUMNS,
    MAX_TTL_S,
    SCHEMA,
    SELECT_STORAGE_MODE,
    CassandraStore,
    build_cluster,
    day_bucket,
    native_port,
    parse_hosts,
    replication_map,
)
from service.adapters.record_codec import to_columns, to_epoch_ms, utc_day
from service.core.ports import ExplanationStore
from service.core.records import DecisionRecord
from service.errors import StoreUnavailable
from service.settings import CassandraSettings
from tests.store_contract import (
    RETENTION,
    StoreContract,
    StoreFactory,
    binary_record,
    check_brought_up_to_date,
    claim_for,
    legacy_record,
    new_id,
)

RETENTION_S = int(RETENTION.total_seconds())
# Seconds a TTL may have run down between the write and the check on a slow machine.
TTL_SLACK_S = 60


def hosts_setting(contact: list[tuple[str, int]]) -> str:
    return ",".join(
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in contact
    )


@pytest.fixture(scope="session")
def settings(cassandra_contact: list[tuple[str, int]]) -> CassandraSettings:
    """A keyspace of this test session only."""
    return CassandraSettings(
        hosts=hosts_setting(cassandra_contact),
        keyspace=f"test_store_{uuid.uuid4().hex[:16]}",
        request_timeout_s=30.0,
    )


@pytest.fixture(scope="session")
def cql(settings: CassandraSettings) -> Iterator[Session]:
    """A plain driver session, for what the store does not expose; drops the keyspace at the end."""
    cluster = build_cluster(settings)
    session = cluster.connect()
    try:
        yield session
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace}", timeout=120)
        cluster.shutdown()


async def query(cql: Session, statement: str, *values: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = list(await asyncio.to_thread(cql.execute, statement, values))
    return rows


# The compliance columns (reasons, protected share, record hash) expire with the rest.
TTL_COLUMNS = (
    "TTL(attributions) AS a, TTL(engine) AS e, TTL(reasons) AS r, TTL(protected_share) AS s, "
    "TTL(record_hash) AS h"
)


async def decision_ttls(
    cql: Session, keyspace: str, record: DecisionRecord, buckets: int
) -> list[int]:
    """TTL of payload columns of the record's row in both decision tables."""
    by_txn = await query(
        cql,
        f"SELECT {TTL_COLUMNS} FROM {keyspace}.decisions_by_txn WHERE txn_id = %s",
        record.transaction_id,
    )
    by_day = await query(
        cql,
        f"SELECT {TTL_COLUMNS} FROM {keyspace}.decisions_by_day "
        "WHERE model_version = %s AND day = %s AND bucket = %s AND decided_at = %s AND txn_id = %s",
        record.model.version,
        utc_day(to_epoch_ms(record.decided_at)),
        day_bucket(record.transaction_id, buckets),
        to_epoch_ms(record.decided_at),
        record.transaction_id,
    )
    return [row[column] for row in by_txn + by_day for column in ("a", "e", "r", "s", "h")]


class TestCassandraStore(StoreContract):
    @pytest.fixture
    def store_factory(self, settings: CassandraSettings, cql: Session) -> StoreFactory:
        async def open_store(retention: timedelta) -> ExplanationStore:
            store = await CassandraStore.connect(settings, retention)
            try:
                await store.migrate()
            except BaseException:
                await store.close()
                raise
            return store

        return open_store

    async def test_every_row_gets_the_retention_ttl(
        self, store: ExplanationStore, settings: CassandraSettings, cql: Session
    ) -> None:
        record = binary_record(decided_at=datetime.now(UTC))
        await store.write([record], [claim_for(record.transaction_id, "sha256:aaaa")])
        claims = await query(
            cql,
            f"SELECT TTL(request_hash) AS h, TTL(response) AS r "
            f"FROM {settings.keyspace}.decisions_by_txn WHERE txn_id = %s",
            record.transaction_id,
        )
        ttls = await decision_ttls(cql, settings.keyspace, record, settings.day_buckets)
        ttls += [claims[0][column] for column in ("h", "r")]
        assert len(ttls) == 12
        assert all(RETENTION_S - TTL_SLACK_S < ttl <= RETENTION_S for ttl in ttls), ttls

    async def test_retention_counts_from_the_decision(
        self, store: ExplanationStore, settings: CassandraSettings, cql: Session
    ) -> None:
        record = binary_record(decided_at=datetime.now(UTC) - timedelta(days=30))
        await store.write([record])
        first = await decision_ttls(cql, settings.keyspace, record, settings.day_buckets)
        await store.write([record])  # a replay keeps the expiry
        second = await decision_ttls(cql, settings.keyspace, record, settings.day_buckets)
        expected = RETENTION_S - 30 * 86_400
        for ttl in first + second:
            assert expected - TTL_SLACK_S < ttl <= expected

    async def test_a_failed_write_is_raised(
        self, store_factory: StoreFactory, settings: CassandraSettings
    ) -> None:
        # A partition key component above 64 KiB cannot be encoded: one bad record of many
        # fails the whole batch before anything is sent.
        narrow = settings.model_copy(update={"write_concurrency": 4})
        store = await CassandraStore.connect(narrow, RETENTION)
        try:
            batch = [binary_record(seed) for seed in range(40)]
            bad = batch[20].model_copy(
                update={"model": batch[20].model.model_copy(update={"version": "v" * 70_000})}
            )
            with pytest.raises(ValueError, match="too long"):
                await store.write([*batch[:20], bad, *batch[21:]])
            assert await store.get(batch[0].transaction_id) is None
        finally:
            await store.close()

    async def test_ping_needs_no_schema(self, cassandra_contact: list[tuple[str, int]]) -> None:
        elsewhere = CassandraSettings(
            hosts=hosts_setting(cassandra_contact), keyspace=f"absent_{uuid.uuid4().hex[:16]}"
        )
        store = await CassandraStore.connect(elsewhere, RETENTION)
        try:
            await store.ping()
            assert await store.existing_tables() == set()
            with pytest.raises(StoreUnavailable, match="shapstream db migrate"):
                await store.get(new_id())
        finally:
            await store.close()

    async def test_retention_past_2038_is_refused_unless_the_server_allows_it(
        self, settings: CassandraSettings, cql: Session
    ) -> None:
        mode = await query(cql, SELECT_STORAGE_MODE)
        twenty_years = timedelta(seconds=MAX_TTL_S)
        if mode and mode[0]["value"] == "NONE":
            store = await CassandraStore.connect(settings, twenty_years)
            await store.close()
        else:
            with pytest.raises(ValueError, match="storage_compatibility_mode"):
                await CassandraStore.connect(settings, twenty_years)


async def write_before_model_format(
    cql: Session, settings: CassandraSettings, record: DecisionRecord
) -> None:
    """`record` in both decision tables, as a build before the model format column wrote it."""
    columns = asdict(to_columns(record))
    del columns["model_format"], columns["framework_version"]
    columns["decided_at"] = columns.pop("decided_at_ms")
    columns["explained_at"] = columns.pop("explained_at_ms")
    by_day = {key: value for key, value in columns.items() if key != "model_version"}
    by_day |= {
        "model_version": record.model.version,
        "day": utc_day(columns["decided_at"]),
        "bucket": day_bucket(record.transaction_id, settings.day_buckets),
    }
    for table, values in (("decisions_by_txn", columns), ("decisions_by_day", by_day)):
        await query(
            cql,
            f"INSERT INTO {settings.keyspace}.{table} ({', '.join(values)}) "
            f"VALUES ({', '.join(['%s'] * len(values))})",
            *values.values(),
        )


async def test_migrate_brings_a_keyspace_of_before_the_model_format_up_to_date(
    settings: CassandraSettings, cql: Session
) -> None:
    """A keyspace made before records kept the model's format gets its columns from `migrate`
    (`shapstream db migrate`); the rows it held read back as they were, and verify."""
    older = settings.model_copy(update={"keyspace": f"test_older_{uuid.uuid4().hex[:16]}"})
    store = await CassandraStore.connect(older, RETENTION)
    try:
        for statement in SCHEMA:
            if statement not in ADD_MODEL_FORMAT_COLUMNS:
                text = statement.format(keyspace=older.keyspace, replication=replication_map(older))
                await asyncio.to_thread(cql.execute, text, timeout=120)
        old = legacy_record(decided_at=datetime.now(UTC) - timedelta(minutes=5))
        await write_before_model_format(cql, older, old)
        await check_brought_up_to_date(store, old)
    finally:
        await store.close()
        await asyncio.to_thread(
            cql.execute, f"DROP KEYSPACE IF EXISTS {older.keyspace}", timeout=120
        )


def test_hosts_are_read_with_their_port() -> None:
    assert parse_hosts("10.0.0.1:19042, 10.0.0.2:19042") == [
        ("10.0.0.1", 19042),
        ("10.0.0.2", 19042),
    ]
    assert parse_hosts("cassandra,[::1]:9042") == [("cassandra", 9042), ("::1", 9042)]
    with pytest.raises(ValueError, match="cannot read"):
        parse_hosts("::1:9042")
    with pytest.raises(ValueError, match="no Cassandra hosts"):
        parse_hosts(" , ")


def test_hosts_must_share_one_port() -> None:
    with pytest.raises(ValueError, match="same native port"):
        native_port(parse_hosts("a:9042,b:9043"))


@pytest.mark.parametrize(
    ("change", "retention", "message"),
    [
        ({"keyspace": "bad-name"}, RETENTION, "keyspace"),
        ({"hosts": "a:9042,b:9142"}, RETENTION, "same native port"),
        ({}, timedelta(seconds=MAX_TTL_S + 1), "20 years"),
        ({}, timedelta(0), "20 years"),
    ],
)
async def test_bad_settings_are_refused_before_connecting(
    change: dict[str, str], retention: timedelta, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await CassandraStore.connect(CassandraSettings().model_copy(update=change), retention)


def test_day_bucket_is_stable() -> None:
    # crc32 is the same in every process and release; `hash()` of a str is not.
    assert day_bucket("txn-0001", 1024) == 40
    assert len({day_bucket(f"txn-{n}", 64) for n in range(10_000)}) == 64
