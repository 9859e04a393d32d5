"""The SQLite store against the shared store contract, plus what only SQLite has."""

import sqlite3
from contextlib import closing
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest

from service.adapters.record_codec import to_columns
from service.adapters.sqlite_store import CREATE_DECISIONS, DB_FILE, SqliteStore, retention_ms
from service.core.ports import ExplanationStore
from service.settings import Settings
from tests.store_contract import (
    RETENTION,
    StoreContract,
    StoreFactory,
    binary_record,
    check_brought_up_to_date,
    legacy_record,
    stored,
)


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        async def open_store(retention: timedelta) -> ExplanationStore:
            store = await SqliteStore.open(tmp_path / DB_FILE, retention)
            await store.migrate()
            return store

        return open_store


async def test_file_under_data_dir_in_wal_mode(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    store = await SqliteStore.from_settings(settings)
    try:
        await store.migrate()
        record = binary_record()
        await store.write([record])
    finally:
        await store.close()
    with sqlite3.connect(settings.data_dir / DB_FILE) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reopened = await SqliteStore.from_settings(settings)
    try:
        assert await reopened.get(record.transaction_id) == stored(record)
    finally:
        await reopened.close()


@pytest.mark.parametrize("retention", [timedelta(0), timedelta(microseconds=10)])
async def test_retention_must_be_positive(tmp_path: Path, retention: timedelta) -> None:
    with pytest.raises(ValueError, match="retention"):
        await SqliteStore.open(tmp_path / DB_FILE, retention)


async def test_migrate_brings_an_older_database_up_to_date(tmp_path: Path) -> None:
    """A file made before records kept the model's format gets the columns; its rows remain."""
    old = legacy_record()
    row = asdict(to_columns(old))
    del row["model_format"], row["framework_version"]
    row["expires_at_ms"] = row["decided_at_ms"] + retention_ms(RETENTION)
    with closing(sqlite3.connect(tmp_path / DB_FILE)) as connection, connection:
        # The table as it was released: later columns come from ADDED_DECISION_COLUMNS.
        connection.execute(CREATE_DECISIONS)
        connection.execute(
            f"INSERT INTO decisions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    store = await SqliteStore.open(tmp_path / DB_FILE, RETENTION)
    try:
        await check_brought_up_to_date(store, old)
    finally:
        await store.close()
