"""The embedded SQLite files hold applicants' data: mode 0600, their -wal and -shm too."""

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.adapters.local_bus import OUTBOX_FILE
from service.adapters.outbox import Outbox
from service.adapters.spool import SPOOL_FILE
from service.adapters.sqlite_store import DB_FILE, SqliteStore
from service.app import create_app
from service.settings import Settings
from tests.api_client import MODELS, asgi_client, bearer, dev_key, german_rows
from tests.store_contract import RETENTION


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The common umask (022), under which plain creation gives 0644."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    """The permission bits of every SQLite file (and companion) in `folder`."""
    return {
        file.name: stat.S_IMODE(file.stat().st_mode)
        for file in folder.iterdir()
        if ".sqlite3" in file.name
    }


async def test_the_embedded_store_and_outbox_are_private(tmp_path: Path) -> None:
    settings = Settings(mode="embedded", data_dir=tmp_path, models_dir=MODELS)
    async with asgi_client(create_app(settings)) as client:
        key = bearer(dev_key(tmp_path))
        answer = await client.post(
            "/v1/predictions", json={"features": german_rows(1)[0]}, headers=key
        )
        assert answer.status_code == 200, answer.text
        txn = answer.json()["transaction_id"]
        found = await client.get(f"/v1/explanations/{txn}?wait=10", headers=key)
        assert found.status_code == 200, found.text
        # While open, in WAL mode: both databases with their -wal and -shm files.
        seen = modes(tmp_path)
    expected = {
        f"{name}{suffix}" for name in (DB_FILE, OUTBOX_FILE) for suffix in ("", "-wal", "-shm")
    }
    assert expected <= set(seen), seen
    assert seen == dict.fromkeys(seen, 0o600)


async def test_the_spool_is_private(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    outbox = await Outbox.open(spool / SPOOL_FILE)
    try:
        await outbox.append("txn-1", b"an applicant's decision", 0.0)
        seen = modes(spool)
    finally:
        await outbox.close()
    assert {SPOOL_FILE, f"{SPOOL_FILE}-wal", f"{SPOOL_FILE}-shm"} <= set(seen), seen
    assert seen == dict.fromkeys(seen, 0o600)


async def test_files_an_earlier_version_left_open_to_others_are_narrowed(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("CREATE TABLE t (x)")
    # A second connection keeps the -wal and -shm files while the first one closes.
    keeper = sqlite3.connect(path)
    keeper.execute("SELECT * FROM t").fetchall()
    connection.close()
    assert set(modes(tmp_path).values()) == {0o644}
    store = await SqliteStore.open(path, RETENTION)
    try:
        seen = modes(tmp_path)
    finally:
        await store.close()
        keeper.close()
    assert {DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"} <= set(seen), seen
    assert seen == dict.fromkeys(seen, 0o600)
