"""Audit export on the real Cassandra node: memory stays flat as rows grow, and files verify.

The smallest data that shows it: 10,000 records. The throughput of 100,000 is a benchmark
(`make bench`, bench/audit_export.py), not a test.
"""

import asyncio
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cassandra.cluster import Session

from service.adapters.cassandra_store import CassandraStore, build_cluster
from service.core.export import (
    AuditExport,
    ExportFormat,
    ExportQuery,
    scan_versions,
    schemas_from,
)
from service.core.export_verify import ProblemKind, verify
from service.core.integrity import sealed
from service.core.records import BinaryPrediction, DecisionRecord, ModelRef
from service.settings import CassandraSettings
from tests.integration.test_cassandra_store import hosts_setting
from tests.store_contract import APPLICANTS, REASONS, RETENTION, attributions, new_id
from tests.unit.test_export import artifact, german_schema

RECORDS = 10_000
DAYS = 5
WRITE_BATCH = 5_000
START = datetime(2026, 3, 2, tzinfo=UTC)
END = START + timedelta(days=DAYS)
# 64 buckets a day: 2,000 records a day are ~31 rows a partition (100,000 records in 2 days of
# the default 2,048 buckets are ~24), and an export reads 64 partitions a day, not 2,048 (its
# time goes mostly to partitions read, not rows).
DAY_BUCKETS = 64
# What may stay while exporting is the scan's prefetch (17 partitions' pages) and one chunk of
# output, whatever the row count: far below what 10,000 records take (~25 MB as a file, several
# times that as Python objects).
PEAK_BOUND_BYTES = 16 * 1024 * 1024
# One day (2,000 rows) and five (10,000): the same partitions' pages in flight, only more rows
# through them. 8,000 more rows may not add 128 bytes each (a row of the file is ~2.5 kB, its
# record several times that as Python objects): no row, nor anything per row, is kept.
GROWTH_BOUND_BYTES = 1024 * 1024
DENY = BinaryPrediction(probability=0.7310585786300049, margin=1.0, decision="deny")
APPROVE = BinaryPrediction(probability=0.2689414213699951, margin=-1.0, decision="approve")


@pytest.fixture(scope="module")
def settings(cassandra_contact: list[tuple[str, int]]) -> Iterator[CassandraSettings]:
    """A keyspace of this module only, dropped at the end."""
    settings = CassandraSettings(
        hosts=hosts_setting(cassandra_contact),
        keyspace=f"test_audit_{uuid.uuid4().hex[:16]}",
        request_timeout_s=30.0,
    )
    yield settings
    cluster = build_cluster(settings)
    session: Session = cluster.connect()
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace}", timeout=120)
    finally:
        cluster.shutdown()


@pytest.fixture
async def store(settings: CassandraSettings) -> AsyncIterator[CassandraStore]:
    bucketed = settings.model_copy(update={"day_buckets": DAY_BUCKETS})
    opened = await CassandraStore.connect(bucketed, RETENTION)
    try:
        await opened.migrate()
        yield opened
    finally:
        await opened.close()


def decision(n: int, version: str, decided_at: datetime) -> DecisionRecord:
    """A German credit decision: two in three denied with their reasons, the rest approved."""
    denied = n % 3 != 0
    return sealed(
        DecisionRecord(
            transaction_id=new_id(),
            model=ModelRef(name="german-credit", version=version),
            features=APPLICANTS[n % len(APPLICANTS)],
            prediction=DENY if denied else APPROVE,
            base_value=[-0.8472978603872037],
            attributions=attributions(1, n),
            additivity_error=3.814697265625e-06,
            engine="pred_contribs",
            model_format="xgboost",
            framework_version="3.2.0",
            decided_at=decided_at,
            explained_at=decided_at + timedelta(milliseconds=38),
            reasons=REASONS if denied else [],
            protected_share=0.0817,
            record_hash="",
        )
    )


async def write_spread(store: CassandraStore, version: str, count: int, span: timedelta) -> None:
    step = span / count
    for first in range(0, count, WRITE_BATCH):
        batch = range(first, min(first + WRITE_BATCH, count))
        await store.write([decision(n, version, START + n * step) for n in batch])


async def export_to(
    store: CassandraStore, version: str, path: Path, end: datetime = END
) -> AuditExport:
    query = ExportQuery(START, end, (version,), None, ExportFormat.JSONL)
    export = AuditExport(query, schemas_from(store.get_model))
    with path.open("wb") as handle:
        async with aclosing(scan_versions(store, query.model_versions, START, end)) as records:
            async for chunk in export.chunks(records):
                handle.write(chunk)
    return export


async def traced_peak(
    store: CassandraStore, version: str, path: Path, end: datetime
) -> tuple[AuditExport, int]:
    """An export under tracemalloc (which slows allocation), and the peak of Python memory."""
    tracemalloc.start()
    try:
        export = await export_to(store, version, path, end)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return export, peak


def flip_a_digit(path: Path, line_number: int) -> str:
    """Change one byte of a row (a decimal of its probability); the row's transaction id."""
    with path.open("r+b") as handle:
        offset = 0
        for number, line in enumerate(handle, start=1):
            if number == line_number:
                break
            offset += len(line)
        at = line.index(b".", line.index(b"probability")) + 1
        handle.seek(offset + at)
        handle.write(str((int(chr(line[at])) + 1) % 10).encode())
    transaction_id = line.split(b'"transaction_id":"', 1)[1].split(b'"', 1)[0]
    return transaction_id.decode()


async def test_export_memory_stays_flat_as_rows_grow_and_the_file_verifies(
    store: CassandraStore, tmp_path: Path
) -> None:
    version = f"sha256:{uuid.uuid4().hex}"
    await store.put_model(artifact(version, german_schema()))
    await write_spread(store, version, RECORDS, END - START)

    # Once untraced, to warm what stays anyway (prepared statements, the schema, the driver's
    # caches), then traced: the first day's rows, and all five days'.
    small_end = START + timedelta(days=1)
    path = tmp_path / "audit.jsonl"
    first = await export_to(store, version, tmp_path / "first.jsonl", small_end)
    small, small_peak = await traced_peak(store, version, tmp_path / "small.jsonl", small_end)
    export, peak = await traced_peak(store, version, path, END)
    assert first.rows == small.rows == RECORDS // DAYS
    assert export.rows == RECORDS
    assert first.manifest is not None
    assert small.manifest is not None
    # A scan's order is deterministic: the same bytes again.
    assert small.manifest["content_sha256"] == first.manifest["content_sha256"]
    print(
        f"\npeak Python memory exporting {small.rows:,} rows: {small_peak / 2**20:.2f} MiB; "
        f"{export.rows:,} rows: {peak / 2**20:.2f} MiB"
    )
    assert peak < PEAK_BOUND_BYTES
    assert peak - small_peak < GROWTH_BOUND_BYTES

    report = await asyncio.to_thread(verify, path)
    assert report.ok, [str(p) for p in report.problems[:10]]
    assert report.rows == RECORDS

    line = 5_432
    transaction_id = flip_a_digit(path, line)
    report = await asyncio.to_thread(verify, path)
    assert not report.ok
    rows = [(p.line, p.transaction_id, p.kind) for p in report.problems if p.line is not None]
    assert rows == [(line, transaction_id, ProblemKind.ALTERED)]


async def test_a_partition_of_many_pages_is_read_whole_and_in_order(
    settings: CassandraSettings,
) -> None:
    # One bucket a day: 2,500 rows in one partition are three pages of SCAN_PAGE_ROWS.
    store = await CassandraStore.connect(settings.model_copy(update={"day_buckets": 1}), RETENTION)
    try:
        await store.migrate()
        version = f"sha256:{uuid.uuid4().hex}"
        await write_spread(store, version, 2_500, timedelta(hours=20))
        found = [record async for record in store.scan(version, START, END)]
        assert len({record.transaction_id for record in found}) == len(found) == 2_500
        keys = [(record.decided_at, record.transaction_id) for record in found]
        assert keys == sorted(keys)
    finally:
        await store.close()
