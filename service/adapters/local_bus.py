"""The embedded mode's event bus: a durable SQLite outbox that one process both fills and drains.

For the single-process demo only. Kafka paths are always tested against Kafka.
"""

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.core.records import DecisionEvent
from service.errors import BusUnavailable
from service.metrics import Metrics
from service.settings import Settings

OUTBOX_FILE = "outbox.sqlite3"

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        transaction_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        enqueued_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS dead_letters (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        reason TEXT NOT NULL,
        payload BLOB NOT NULL,
        dead_at REAL NOT NULL
    )
    """,
)
_INSERT_EVENT = "INSERT INTO outbox (transaction_id, payload, enqueued_at) VALUES (?, ?, ?)"
_SELECT_AFTER = "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
_DELETE_SEQS = "DELETE FROM outbox WHERE seq IN ({marks})"
# Well under SQLite's limit on bound parameters per statement.
_DELETE_CHUNK = 500
_COUNT_PENDING = "SELECT count(*) FROM outbox"
_INSERT_DEAD = "INSERT INTO dead_letters (reason, payload, dead_at) VALUES (?, ?, ?)"
_SELECT_DEAD = "SELECT reason, payload FROM dead_letters ORDER BY seq"

T = TypeVar("T")


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    payload: bytes


def _delete_rows(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    # One transaction, so a batch is acknowledged entirely or not at all.
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        for start in range(0, len(seqs), _DELETE_CHUNK):
            chunk = seqs[start : start + _DELETE_CHUNK]
            conn.execute(_DELETE_SEQS.format(marks=",".join("?" * len(chunk))), chunk)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: every statement is its own transaction, so a returned publish is on disk.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL fsyncs each commit: an acknowledged event survives a power cut, not only a crash.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    for statement in _SCHEMA:
        conn.execute(statement)
    return conn


class LocalBatch:
    """Outbox rows handed to the worker; `commit` deletes them."""

    def __init__(self, bus: "LocalBus", seqs: list[int], payloads: list[bytes]) -> None:
        self._bus = bus
        self._seqs = seqs
        self._payloads = payloads

    @property
    def payloads(self) -> Sequence[bytes]:
        return self._payloads

    async def commit(self) -> None:
        await self._bus._delete(self._seqs)


class LocalBus:
    """Both sides of the embedded bus (EventBus and EventSource) over one SQLite file.

    One process owns the file: the gateway publishes into it, the in-process worker drains it.
    Like a Kafka consumer, rows handed out but not committed are not handed out again by this
    object; they are redelivered after a restart. `metrics` feeds the consumer lag gauge only:
    publishes are counted by the caller.
    """

    def __init__(self, conn: sqlite3.Connection, metrics: Metrics | None = None) -> None:
        self._conn = conn
        self._metrics = metrics
        # One thread owns every SQLite call: the event loop never waits on disk, and the
        # connection is never used from two threads at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-bus")
        self._wakeup = asyncio.Event()
        self._delivered_up_to = 0
        self._closed = False

    @classmethod
    async def open(cls, path: Path, metrics: Metrics | None = None) -> "LocalBus":
        """Open (creating if needed) the outbox at `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await asyncio.to_thread(_connect, path)
        return cls(conn, metrics)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise BusUnavailable("the embedded outbox is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._conn)

    async def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return await self._run(lambda c: c.execute(sql, params).fetchall())

    async def publish(self, event: DecisionEvent) -> None:
        """Store the event durably, then wake the consumer."""
        row = (event.transaction_id, event.to_bytes(), time.time())
        try:
            await self._run(lambda c: c.execute(_INSERT_EVENT, row))
        except sqlite3.Error as exc:
            raise BusUnavailable("the embedded outbox could not store the event") from exc
        self._wakeup.set()

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT 1").fetchone())

    async def next_batch(self, max_events: int, timeout_s: float) -> LocalBatch | None:
        """Up to `max_events` oldest undelivered events, waiting up to `timeout_s` for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            # Clear before reading: a publish landing after the read sets it again.
            self._wakeup.clear()
            rows = await self._rows(_SELECT_AFTER, (self._delivered_up_to, max_events))
            if rows:
                self._delivered_up_to = rows[-1][0]
                await self._update_lag()
                return LocalBatch(self, [r[0] for r in rows], [r[1] for r in rows])
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return None

    async def _delete(self, seqs: list[int]) -> None:
        if seqs:
            await self._run(lambda c: _delete_rows(c, seqs))
        await self._update_lag()

    async def _update_lag(self) -> None:
        if self._metrics is None:
            return
        self._metrics.consumer_lag.set(await self.pending())

    async def dead_letter(self, payload: bytes, reason: str) -> None:
        row = (reason, payload, time.time())
        await self._run(lambda c: c.execute(_INSERT_DEAD, row))

    async def dead_letters(self) -> list[DeadLetter]:
        """Everything dead-lettered so far, oldest first (for inspection and tests)."""
        rows = await self._rows(_SELECT_DEAD)
        return [DeadLetter(reason=r, payload=p) for r, p in rows]

    async def pending(self) -> int:
        """Events stored and not yet committed by a consumer."""
        rows = await self._rows(_COUNT_PENDING)
        return int(rows[0][0])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


async def open_local_bus(settings: Settings, metrics: Metrics | None = None) -> LocalBus:
    """The embedded bus for `settings.data_dir` (one outbox file per data directory)."""
    return await LocalBus.open(settings.data_dir / OUTBOX_FILE, metrics)
