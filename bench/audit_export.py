"""The audit export of 100,000 decisions from Cassandra: rows/s, peak memory, verify rows/s.

    .venv/bin/python -m bench.audit_export [--records 100000] [--days 2]

The records of tests/integration/test_audit_export.py (German credit decisions, two in three
denied with their reasons), spread over `days` UTC days in the store's default 2,048 buckets a
day, written to a keyspace of this run (dropped at the end). Then, each printed:

- write:  records/s into Cassandra (the store's batched writes);
- scan:   the bare scan (`store.scan`), records/s: the baseline of this run;
- export: rows/s of the export to a file (`AuditExport`, JSON Lines), as a ratio to the scan;
- peak:   the peak of Python memory (tracemalloc) while exporting again, which must not grow
          with the row count (the test shows that on 10,000 rows);
- verify: rows/s of `verify` on the file.

Needs Cassandra (`make services`).
"""

import argparse
import asyncio
import os
import tempfile
import time
import tracemalloc
import uuid
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service.adapters.cassandra_store import CassandraStore, build_cluster
from service.core.export import (
    AuditExport,
    ExportFormat,
    ExportQuery,
    scan_versions,
    schemas_from,
)
from service.core.export_verify import verify
from service.settings import CassandraSettings
from tests.integration.test_audit_export import decision
from tests.store_contract import RETENTION
from tests.unit.test_export import artifact, german_schema

KEYSPACE = "shapstream_bench_audit"
START = datetime(2026, 3, 2, tzinfo=UTC)
WRITE_BATCH = 5_000


async def write(store: CassandraStore, version: str, count: int, end: datetime) -> float:
    """Records spread evenly over [START, end); the seconds it took."""
    step = (end - START) / count
    started = time.perf_counter()
    for first in range(0, count, WRITE_BATCH):
        batch = range(first, min(first + WRITE_BATCH, count))
        await store.write([decision(n, version, START + n * step) for n in batch])
    return time.perf_counter() - started


async def scan(store: CassandraStore, version: str, end: datetime) -> tuple[int, float]:
    started = time.perf_counter()
    rows = 0
    async with aclosing(store.scan(version, START, end)) as records:
        async for _ in records:
            rows += 1
    return rows, time.perf_counter() - started


async def export(
    store: CassandraStore, version: str, end: datetime, path: Path
) -> tuple[int, float]:
    query = ExportQuery(START, end, (version,), None, ExportFormat.JSONL)
    audit = AuditExport(query, schemas_from(store.get_model))
    started = time.perf_counter()
    with path.open("wb") as handle:
        async with aclosing(scan_versions(store, (version,), START, end)) as records:
            async for chunk in audit.chunks(records):
                handle.write(chunk)
    return audit.rows, time.perf_counter() - started


async def run(args: argparse.Namespace, settings: CassandraSettings) -> None:
    end = START + timedelta(days=args.days)
    store = await CassandraStore.connect(settings, RETENTION)
    try:
        await store.migrate()
        version = f"sha256:{uuid.uuid4().hex}"
        await store.put_model(artifact(version, german_schema()))
        print(
            f"{args.records:,} records over {args.days} days x {settings.day_buckets:,} buckets",
            flush=True,
        )
        written_s = await write(store, version, args.records, end)
        print(f"write:  {args.records / written_s:9,.0f} records/s ({written_s:.1f} s)", flush=True)
        scanned, scan_s = await scan(store, version, end)
        if scanned != args.records:
            raise SystemExit(f"the scan read {scanned:,} records, not {args.records:,}")
        print(f"scan:   {scanned / scan_s:9,.0f} records/s ({scan_s:.1f} s), baseline", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "audit.jsonl"
            rows, export_s = await export(store, version, end, path)
            if rows != args.records:
                raise SystemExit(f"the export wrote {rows:,} rows, not {args.records:,}")
            megabytes = path.stat().st_size / 1e6
            print(
                f"export: {rows / export_s:9,.0f} rows/s ({export_s:.1f} s, {megabytes:.0f} MB), "
                f"{scan_s / export_s:.2f}x the scan",
                flush=True,
            )
            tracemalloc.start()
            try:
                await export(store, version, end, path)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            print(f"peak:   {peak / 2**20:9.1f} MiB of Python memory while exporting", flush=True)
            started = time.perf_counter()
            report = await asyncio.to_thread(verify, path)
            verify_s = time.perf_counter() - started
            if not report.ok or report.rows != rows:
                raise SystemExit(f"verify failed: {[str(p) for p in report.problems[:5]]}")
            print(f"verify: {rows / verify_s:9,.0f} rows/s ({verify_s:.1f} s)", flush=True)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=2)
    args = parser.parse_args()
    hosts = os.environ.get("SHAPSTREAM_CASSANDRA_HOSTS", CassandraSettings().hosts)
    settings = CassandraSettings(hosts=hosts, keyspace=KEYSPACE, request_timeout_s=30.0)
    try:
        asyncio.run(run(args, settings))
    finally:
        cluster = build_cluster(settings)
        try:
            cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {KEYSPACE}", timeout=120)
        finally:
            cluster.shutdown()


if __name__ == "__main__":
    main()
