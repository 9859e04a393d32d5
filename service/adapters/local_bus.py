"""The embedded mode's event bus: a durable SQLite outbox that one process both fills and drains.

For the single-process demo only. Kafka paths are always tested against Kafka.
"""

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.adapters.outbox import Entry, Outbox, OutboxClosed
from service.core.ports import BusStatus
from service.core.records import DecisionEvent
from service.errors import BusUnavailable
from service.metrics import Metrics
from service.settings import Settings

OUTBOX_FILE = "outbox.sqlite3"

_CREATE_DEAD = """
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    dead_at REAL NOT NULL
)"""
_INSERT_DEAD = "INSERT INTO dead_letters (reason, payload, dead_at) VALUES (?, ?, ?)"
_SELECT_DEAD = "SELECT reason, payload FROM dead_letters ORDER BY seq"


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    payload: bytes


OUTBOX_SOURCE = "outbox"


class LocalBatch:
    """Outbox rows handed to the worker; `commit` deletes them."""

    def __init__(self, bus: "LocalBus", entries: list[Entry]) -> None:
        self._bus = bus
        self._entries = entries
        self._payloads = [e.payload for e in entries]

    @property
    def payloads(self) -> Sequence[bytes]:
        return self._payloads

    @property
    def positions(self) -> Sequence[tuple[str, int]]:
        # The outbox is one source; its row ids only grow.
        return [(OUTBOX_SOURCE, e.seq) for e in self._entries]

    async def commit(self) -> None:
        await self._bus._delete(self._entries)


class LocalBus:
    """Both sides of the embedded bus (EventBus and EventSource) over one outbox file.

    One process owns the file: the gateway publishes into it, the in-process worker drains it.
    Like a Kafka consumer, rows handed out but not committed are not handed out again by this
    object; they are redelivered after a restart. `metrics` feeds the consumer lag gauges only:
    publishes are counted by the caller.
    """

    def __init__(self, outbox: Outbox, metrics: Metrics | None = None) -> None:
        self._outbox = outbox
        self._metrics = metrics
        self._wakeup = asyncio.Event()
        self._delivered_up_to = 0
        self._closed = False
        # When the oldest event not yet written was published, as of the last fetch or commit.
        self._oldest_at: float | None = None
        if metrics is not None:
            # Read at scrape time, so it keeps growing while a batch is retried.
            metrics.consumer_lag_seconds.set_function(self._lag_seconds)

    @classmethod
    async def open(cls, path: Path, metrics: Metrics | None = None) -> "LocalBus":
        """Open (creating if needed) the outbox at `path`."""
        outbox = await Outbox.open(path)
        await outbox.execute(_CREATE_DEAD)
        return cls(outbox, metrics)

    async def publish(self, event: DecisionEvent) -> None:
        """Store the event durably (group-committed with concurrent publishes), then wake the
        consumer."""
        try:
            await self._outbox.append(event.transaction_id, event.to_bytes(), time.time())
        except OutboxClosed as exc:
            raise BusUnavailable("the embedded outbox is closed") from exc
        # sqlite3 errors and I/O errors alike: the event is not stored, the client may retry.
        except Exception as exc:
            raise BusUnavailable("the embedded outbox could not store the event") from exc
        self._wakeup.set()

    async def ping(self) -> None:
        await self._outbox.execute("SELECT 1")

    def status(self) -> BusStatus:
        return BusStatus(accepting=not self._closed)

    async def next_batch(self, max_events: int, timeout_s: float) -> LocalBatch | None:
        """Up to `max_events` oldest undelivered events, waiting up to `timeout_s` for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            # Clear before reading: a publish landing after the read sets it again.
            self._wakeup.clear()
            entries = await self._outbox.read(self._delivered_up_to, max_events)
            if entries:
                self._delivered_up_to = entries[-1].seq
                self._update_lag(entries[0])
                return LocalBatch(self, entries)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return None

    async def _delete(self, entries: list[Entry]) -> None:
        await self._outbox.delete(entries)
        # Written events are deleted, so the first one stored is the oldest not yet written:
        # one row by primary key, and only when something is left and someone reads the gauge.
        wanted = self._metrics is not None and self._outbox.count > 0
        first = await self._outbox.read(0, 1) if wanted else []
        self._update_lag(first[0] if first else None)

    def _update_lag(self, oldest: Entry | None) -> None:
        if self._metrics is None:
            return
        self._metrics.consumer_lag.set(self._outbox.count)
        self._oldest_at = oldest.enqueued_at if oldest is not None else None

    def _lag_seconds(self) -> float:
        if self._oldest_at is None:
            return 0.0
        return max(0.0, time.time() - self._oldest_at)

    async def dead_letter(self, payload: bytes, reason: str) -> None:
        try:
            await self._outbox.execute(_INSERT_DEAD, (reason, payload, time.time()))
        except (sqlite3.OperationalError, OutboxClosed) as exc:
            raise BusUnavailable("the embedded outbox could not keep the dead letter") from exc

    async def dead_letters(self) -> list[DeadLetter]:
        """Everything dead-lettered so far, oldest first (for inspection and tests)."""
        rows = await self._outbox.execute(_SELECT_DEAD)
        return [DeadLetter(reason=r, payload=p) for r, p in rows]

    async def pending(self) -> int:
        """Events stored and not yet committed by a consumer."""
        return await self._outbox.stored()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._outbox.close()


async def open_local_bus(settings: Settings, metrics: Metrics | None = None) -> LocalBus:
    """The embedded bus for `settings.data_dir` (one outbox file per data directory)."""
    return await LocalBus.open(settings.data_dir / OUTBOX_FILE, metrics)
