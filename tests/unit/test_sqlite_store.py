"""The SQLite store against the shared store contract, plus what only SQLite has."""

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from service.adapters.sqlite_store import DB_FILE, SqliteStore
from service.ports import ExplanationStore
from service.settings import Settings
from tests.store_contract import StoreContract, StoreFactory, binary_record, stored


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
