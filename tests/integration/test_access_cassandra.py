"""The Cassandra access store on the real node: keys, the access log by time range, TTLs."""

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cassandra.cluster import Session

from service.adapters.cassandra_access import ACCESS_LOG_BUCKETS, TABLES, CassandraAccessStore
from service.adapters.cassandra_store import CassandraStore, build_cluster
from service.core.access import AccessEntry, Action
from service.settings import CassandraSettings
from tests.access_contract import check_entries, check_keys

RETENTION = timedelta(days=400)
RETENTION_S = int(RETENTION.total_seconds())
TTL_SLACK_S = 60


@pytest.fixture(scope="module")
def settings(cassandra_contact: list[tuple[str, int]]) -> CassandraSettings:
    host, port = cassandra_contact[0]
    return CassandraSettings(
        hosts=f"{host}:{port}", keyspace=f"test_access_{uuid.uuid4().hex[:16]}"
    )


@pytest.fixture(scope="module")
def cql(settings: CassandraSettings) -> Iterator[Session]:
    """A plain driver session for checks the store does not expose; drops the keyspace after."""
    cluster = build_cluster(settings)
    session = cluster.connect()
    try:
        yield session
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace}", timeout=120)
        cluster.shutdown()


@pytest.fixture
async def access(settings: CassandraSettings, cql: Session) -> AsyncIterator[CassandraAccessStore]:
    store = await CassandraStore.connect(settings, RETENTION)
    try:
        await store.migrate()
        access = CassandraAccessStore(store)
        await access.migrate()
        await access.migrate()
        yield access
    finally:
        await store.close()


async def test_keys_and_entries_follow_the_contract(
    access: CassandraAccessStore, settings: CassandraSettings, cql: Session
) -> None:
    tables = {
        row["table_name"]
        for row in cql.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
            (settings.keyspace,),
        )
    }
    assert set(TABLES) <= tables
    await check_keys(access)
    await check_entries(access)


async def test_entries_expire_with_the_retention(
    access: CassandraAccessStore, settings: CassandraSettings, cql: Session
) -> None:
    now = datetime.now(UTC)
    target = f"txn-{uuid.uuid4().hex}"
    await access.record(AccessEntry(now, "ttl-check", Action.AUDIT_EXPORT, target))
    rows = [
        row
        for bucket in range(ACCESS_LOG_BUCKETS)
        for row in cql.execute(
            f"SELECT target, TTL(key_name) AS k, TTL(target) AS t FROM {settings.keyspace}."
            "access_log WHERE day = %s AND bucket = %s",
            (now.date(), bucket),
        )
        if row["target"] == target
    ]
    assert len(rows) == 1
    assert all(RETENTION_S - TTL_SLACK_S < rows[0][c] <= RETENTION_S for c in ("k", "t")), rows

    # Retention counts from the access: an entry recorded late expires on time.
    old = now - timedelta(days=100)
    await access.record(AccessEntry(old, "ttl-check", Action.AUDIT_EXPORT, target))
    late = [
        row["t"]
        for bucket in range(ACCESS_LOG_BUCKETS)
        for row in cql.execute(
            f"SELECT target, TTL(target) AS t FROM {settings.keyspace}.access_log "
            "WHERE day = %s AND bucket = %s",
            (old.date(), bucket),
        )
        if row["target"] == target
    ]
    expected = RETENTION_S - 100 * 86_400
    assert len(late) == 1
    assert expected - TTL_SLACK_S < late[0] <= expected
    listed = await access.entries(old, now + timedelta(seconds=1), 10_000)
    assert [e.target for e in listed].count(target) == 2
