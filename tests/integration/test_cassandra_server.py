"""The real Cassandra node through cassandra-driver: schema, prepared statements, TTL, LWT."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

TTL_S = 3600
SHORT_TTL_S = 2
EXPIRY_DEADLINE_S = 30.0
TABLE = "explanations"


def connection_class() -> Any:
    """libev when the driver's C extension is present; never the deprecated asyncore loop."""
    try:
        from cassandra.io.libevreactor import LibevConnection
    except ImportError:
        from cassandra.io.asyncioreactor import AsyncioConnection

        return AsyncioConnection
    return LibevConnection


def create_schema(session: Session, keyspace: str) -> None:
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.{TABLE} "
        "(decision_id text PRIMARY KEY, model text, shap_sum double)"
    )


@pytest.fixture(scope="module")
def cluster(cassandra_contact: list[tuple[str, int]]) -> Iterator[Cluster]:
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
        request_timeout=30.0,
    )
    client = Cluster(
        contact_points=cassandra_contact,
        port=cassandra_contact[0][1],
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connection_class=connection_class(),
    )
    try:
        yield client
    finally:
        client.shutdown()


@pytest.fixture(scope="module")
def keyspace() -> str:
    """A keyspace unique to this test run (tables are always named keyspace.table)."""
    return f"it_{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="module")
def session(cluster: Cluster, keyspace: str) -> Iterator[Session]:
    """A session with the test keyspace and table created; the keyspace is dropped after."""
    connection = cluster.connect()
    try:
        create_schema(connection, keyspace)
        yield connection
    finally:
        connection.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        connection.shutdown()


def test_schema_creation_is_idempotent(cluster: Cluster, session: Session, keyspace: str) -> None:
    create_schema(session, keyspace)  # a second run of the same DDL changes nothing
    metadata = cluster.metadata.keyspaces[keyspace]
    assert [column.name for column in metadata.tables[TABLE].primary_key] == ["decision_id"]
    assert metadata.replication_strategy.replication_factor == 1


def test_prepared_write_with_ttl_reads_back_its_ttl(session: Session, keyspace: str) -> None:
    insert = session.prepare(
        f"INSERT INTO {keyspace}.{TABLE} (decision_id, model, shap_sum) VALUES (?, ?, ?) "
        "USING TTL ?"
    )
    select = session.prepare(
        f"SELECT model, shap_sum, TTL(model) FROM {keyspace}.{TABLE} WHERE decision_id = ?"
    )
    assert insert.consistency_level is None  # the LOCAL_QUORUM default profile applies
    session.execute(insert, ("d-ttl", "xgb-v1", 0.25, TTL_S))
    row = session.execute(select, ("d-ttl",)).one()
    assert (row.model, row.shap_sum) == ("xgb-v1", 0.25)
    assert TTL_S - 60 < row.ttl_model <= TTL_S


def test_short_ttl_row_expires(session: Session, keyspace: str) -> None:
    insert = session.prepare(
        f"INSERT INTO {keyspace}.{TABLE} (decision_id, model, shap_sum) VALUES (?, ?, ?) "
        "USING TTL ?"
    )
    select = session.prepare(f"SELECT decision_id FROM {keyspace}.{TABLE} WHERE decision_id = ?")
    session.execute(insert, ("d-short", "xgb-v1", 1.0, SHORT_TTL_S))
    written = time.monotonic()
    assert session.execute(select, ("d-short",)).one() is not None
    deadline = written + EXPIRY_DEADLINE_S
    while session.execute(select, ("d-short",)).one() is not None:
        assert time.monotonic() < deadline, f"row outlived its {SHORT_TTL_S} s TTL"
        time.sleep(0.1)  # poll interval
    assert time.monotonic() - written >= SHORT_TTL_S - 1


def test_lightweight_transaction_applies_once(session: Session, keyspace: str) -> None:
    insert = session.prepare(
        f"INSERT INTO {keyspace}.{TABLE} (decision_id, model, shap_sum) VALUES (?, ?, ?) "
        "IF NOT EXISTS"
    )
    first = session.execute(insert, ("d-lwt", "xgb-v1", 1.5))
    second = session.execute(insert, ("d-lwt", "xgb-v2", 9.9))
    assert first.was_applied
    assert not second.was_applied
    existing = second.one()
    assert (existing.model, existing.shap_sum) == ("xgb-v1", 1.5)
    stored = session.execute(
        f"SELECT model FROM {keyspace}.{TABLE} WHERE decision_id = %s", ("d-lwt",)
    ).one()
    assert stored.model == "xgb-v1"
