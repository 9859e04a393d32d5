"""The durable FIFO under the embedded bus and the gateway's spool: group commit, order, bound."""

import asyncio
from pathlib import Path

import pytest

from service.adapters.outbox import Outbox, OutboxClosed, OutboxFull


async def test_concurrent_appends_share_commits_and_keep_their_order(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "spool.sqlite3")
    try:
        appends = [outbox.append(f"txn-{n}", f"event {n}".encode(), float(n)) for n in range(200)]
        await asyncio.gather(*appends)
        assert outbox.commits < 200  # grouped: one fsync served many appends
        entries = await outbox.read(0, 1000)
    finally:
        await outbox.close()
    assert [e.transaction_id for e in entries] == [f"txn-{n}" for n in range(200)]
    assert [e.payload for e in entries] == [f"event {n}".encode() for n in range(200)]


async def test_appended_entries_survive_a_reopen_until_deleted(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    outbox = await Outbox.open(path)
    for n in range(5):
        await outbox.append(f"txn-{n}", b"x" * 10, 0.0)
    await outbox.close()

    reopened = await Outbox.open(path)
    try:
        assert (reopened.count, reopened.size) == (5, 50)
        first = await reopened.read(0, 2)
        await reopened.delete(first)
        assert (reopened.count, reopened.size) == (3, 30)
        rest = await reopened.read(0, 10)
        assert [e.transaction_id for e in rest] == ["txn-2", "txn-3", "txn-4"]
        assert await reopened.stored() == 3
    finally:
        await reopened.close()


async def test_a_full_outbox_refuses_at_once_and_stores_nothing(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "spool.sqlite3", max_bytes=100)
    try:
        await outbox.append("txn-1", b"x" * 60, 0.0)
        assert outbox.can_take(40)
        assert not outbox.can_take(41)
        with pytest.raises(OutboxFull):
            await outbox.append("txn-2", b"y" * 41, 0.0)
        assert outbox.count == 1
        assert await outbox.stored() == 1
        await outbox.delete(await outbox.read(0, 10))
        await outbox.append("txn-3", b"z" * 100, 0.0)  # room again
    finally:
        await outbox.close()


async def test_idle_only_when_nothing_is_stored_or_being_committed(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "spool.sqlite3")
    try:
        assert outbox.idle()
        pending = asyncio.ensure_future(outbox.append("txn-1", b"x", 0.0))
        await asyncio.sleep(0)
        assert not outbox.idle()
        await pending
        assert not outbox.idle()
        await outbox.delete(await outbox.read(0, 10))
        assert outbox.idle()
    finally:
        await outbox.close()


async def test_a_closed_outbox_refuses_appends(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "spool.sqlite3")
    await outbox.close()
    with pytest.raises(OutboxClosed):
        await outbox.append("txn-1", b"x", 0.0)
