"""Audit export on the real Cassandra node: 100,000 records stream in flat memory and verify."""

import asyncio
import time
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
    ProblemKind,
    scan_versions,
    schemas_from,
    verify,
)
from service.core.integrity import sealed
from service.core.records import BinaryPrediction, DecisionRecord, ModelRef
from service.settings import CassandraSettings
from tests.integration.test_cassandra_store import hosts_setting
from tests.store_contract import APPLICANTS, REASONS, RETENTION, attributions, new_id
from tests.unit.test_export import artifact, german_schema

RECORDS = 100_000
WRITE_BATCH = 5_000
START = datetime(2026, 3, 2, tzinfo=UTC)
END = START + timedelta(days=2)
# Far below what 100,000 records take (~250 MB as a file, several times that as Python
# objects): what may stay is the scan's prefetch and one chunk of output. Tight enough to catch
# rows kept alive until a full garbage collection (driver timers did that: a 37 MiB peak).
PEAK_BOUND_BYTES = 16 * 1024 * 1024
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
    opened = await CassandraStore.connect(settings, RETENTION)
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


async def export_to(store: CassandraStore, version: str, path: Path) -> AuditExport:
    query = ExportQuery(START, END, (version,), None, ExportFormat.JSONL)
    export = AuditExport(query, schemas_from(store.get_model))
    with path.open("wb") as handle:
        async with aclosing(scan_versions(store, query.model_versions, START, END)) as records:
            async for chunk in export.chunks(records):
                handle.write(chunk)
    return export


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


async def test_100k_records_export_in_flat_memory_and_verify(
    store: CassandraStore, tmp_path: Path
) -> None:
    version = f"sha256:{uuid.uuid4().hex}"
    await store.put_model(artifact(version, german_schema()))
    started = time.perf_counter()
    await write_spread(store, version, RECORDS, END - START)
    written_s = time.perf_counter() - started

    path = tmp_path / "audit.jsonl"
    started = time.perf_counter()
    export = await export_to(store, version, path)
    export_s = time.perf_counter() - started
    assert export.rows == RECORDS

    # Again under tracemalloc (which slows allocation): the peak of Python memory while
    # exporting, and the same bytes as the first run (a scan's order is deterministic).
    tracemalloc.start()
    try:
        again = await export_to(store, version, tmp_path / "again.jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert export.manifest is not None
    assert again.manifest is not None
    assert again.manifest["content_sha256"] == export.manifest["content_sha256"]

    started = time.perf_counter()
    report = await asyncio.to_thread(verify, path)
    verify_s = time.perf_counter() - started
    assert report.ok, [str(p) for p in report.problems[:10]]
    assert report.rows == RECORDS

    size_mb = path.stat().st_size / 1e6
    print(
        f"\naudit export of {RECORDS:,} records (Cassandra, 2 days x 2,048 buckets): "
        f"written in {written_s:.1f} s ({RECORDS / written_s:,.0f} records/s); "
        f"exported in {export_s:.1f} s ({RECORDS / export_s:,.0f} rows/s, {size_mb:.0f} MB); "
        f"peak Python memory while exporting {peak / 2**20:.1f} MiB; "
        f"verified in {verify_s:.1f} s ({RECORDS / verify_s:,.0f} rows/s)"
    )
    assert peak < PEAK_BOUND_BYTES

    line = 54_321
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
