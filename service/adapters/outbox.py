"""A durable FIFO of event payloads in one SQLite file: the embedded bus and the gateway's spool.

SQLite in WAL mode with `synchronous=FULL` fsyncs the log at every commit, so an appended
payload survives a crash or a power cut once `append` returns, and a torn last transaction
is rolled back at the next open. Appends are group-committed: every append waiting while a
commit is on disk goes into the next one, so one fsync serves many requests (measured here:
~0.3 ms per commit, with one row or twenty). Rows come back in append order (`seq`).

One thread owns the connection: the event loop never waits on the disk, and the connection
is never used from two threads at once.
"""

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.adapters.sqlite_files import private_database

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    enqueued_at REAL NOT NULL
)"""
_INSERT = "INSERT INTO outbox (transaction_id, payload, enqueued_at) VALUES (?, ?, ?)"
_SELECT_AFTER = "SELECT seq, transaction_id, payload, enqueued_at FROM outbox WHERE seq > ? "
_SELECT_AFTER += "ORDER BY seq LIMIT ?"
_DELETE_SEQS = "DELETE FROM outbox WHERE seq IN ({marks})"
_COUNT = "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
# Well under SQLite's limit on bound parameters per statement.
_DELETE_CHUNK = 500


class OutboxFull(Exception):
    """Appending would take the outbox past its size bound."""


class OutboxClosed(Exception):
    """The outbox was closed (the process is stopping)."""


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    transaction_id: str
    payload: bytes
    enqueued_at: float


@dataclass(slots=True)
class _Pending:
    row: tuple[str, bytes, float]
    done: "asyncio.Future[None]"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating) the file with the durability settings every user of it relies on."""
    # Decisions' inputs: 0600, like the key file (its -wal and -shm follow the file's mode).
    private_database(path)
    # Autocommit mode: transactions are explicit (`_commit`) or one statement each.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL fsyncs each commit: an acknowledged event survives a power cut, not only a crash.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute(_SCHEMA)
    return conn


def _commit(conn: sqlite3.Connection, *, rows: list[tuple[str, bytes, float]]) -> None:
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, rows)


def _delete(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    # One transaction, so a batch is acknowledged entirely or not at all.
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        for start in range(0, len(seqs), _DELETE_CHUNK):
            chunk = seqs[start : start + _DELETE_CHUNK]
            conn.execute(_DELETE_SEQS.format(marks=",".join("?" * len(chunk))), chunk)


class Outbox:
    """Append (durably, group-committed), read in order, delete what was handed on."""

    def __init__(
        self, conn: sqlite3.Connection, count: int, size: int, max_bytes: int | None
    ) -> None:
        self._conn = conn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._max_bytes = max_bytes
        # Rows and payload bytes stored or being stored, kept here so a full outbox refuses
        # an append without a query.
        self._count = count
        self._bytes = size
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        # Transactions that committed appends; fewer than appends when they were grouped.
        self.commits = 0

    @classmethod
    async def open(cls, path: Path, max_bytes: int | None = None) -> "Outbox":
        """Open (creating if needed) the outbox at `path`, bounded to `max_bytes` of payloads."""
        conn = await asyncio.to_thread(connect, path)
        count, size = await asyncio.to_thread(lambda: conn.execute(_COUNT).fetchone())
        return cls(conn, int(count), int(size), max_bytes)

    @property
    def count(self) -> int:
        """Payloads stored (or being committed) and not deleted."""
        return self._count

    @property
    def size(self) -> int:
        """Bytes of those payloads."""
        return self._bytes

    def idle(self) -> bool:
        """Nothing stored and nothing being committed (checked without yielding to the loop)."""
        return self._count == 0 and not self._queue and self._flusher is None

    def can_take(self, payload_bytes: int) -> bool:
        return self._max_bytes is None or self._bytes + payload_bytes <= self._max_bytes

    async def append(self, transaction_id: str, payload: bytes, at: float) -> None:
        """Return once `payload` is on disk; raise `OutboxFull` at once if it does not fit."""
        if self._closed:
            raise OutboxClosed("the outbox is closed")
        if not self.can_take(len(payload)):
            raise OutboxFull(f"the outbox holds {self._bytes} bytes, its bound")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending((transaction_id, payload, at), done))
        self._count += 1
        self._bytes += len(payload)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="outbox-commit")
        # Shielded: a caller that stops waiting does not take its row out of the commit.
        await asyncio.shield(done)

    async def _flush(self) -> None:
        """Commit whatever is queued, one transaction per round, until the queue is empty."""
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                rows = [p.row for p in batch]
                try:
                    await self._run(functools.partial(_commit, rows=rows))
                except BaseException as exc:
                    self._count -= len(batch)
                    self._bytes -= sum(len(p.row[1]) for p in batch)
                    for pending in batch:
                        if not pending.done.done():
                            pending.done.set_exception(_as_error(exc))
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                self.commits += 1
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_result(None)
        finally:
            self._flusher = None

    async def read(self, after_seq: int, limit: int) -> list[Entry]:
        """Up to `limit` oldest entries with `seq > after_seq`."""
        rows = await self._run(lambda c: c.execute(_SELECT_AFTER, (after_seq, limit)).fetchall())
        return [Entry(*row) for row in rows]

    async def delete(self, entries: Sequence[Entry]) -> None:
        """Remove `entries` durably (all or none)."""
        if not entries:
            return
        seqs = [e.seq for e in entries]
        await self._run(lambda c: _delete(c, seqs))
        self._count -= len(entries)
        self._bytes -= sum(len(e.payload) for e in entries)

    async def stored(self) -> int:
        """Payloads in the file now, counted by the database (whoever wrote them)."""
        rows = await self._run(lambda c: c.execute(_COUNT).fetchall())
        return int(rows[0][0])

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on the outbox's connection (for tables kept beside it)."""
        return await self._run(lambda c: c.execute(sql, params).fetchall())

    async def close(self) -> None:
        """Finish the commit in progress, then close; later appends raise `OutboxClosed`."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed and self._flusher is None:
            raise OutboxClosed("the outbox is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._conn)


def _as_error(exc: BaseException) -> Exception:
    if isinstance(exc, Exception):
        return exc
    return OutboxClosed(f"the commit was interrupted ({type(exc).__name__})")
