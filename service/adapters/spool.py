"""The gateway's bus in Kafka mode: Kafka, with a durable local spool for when Kafka stalls.

A decision waits at most `kafka.spool_after_s` for Kafka's acknowledgement. Past that, it is
written to the spool (an `Outbox` file, fsync'd before the answer) and so is every decision
after it, until a replayer has handed the whole spool to Kafka, oldest first; then decisions
go straight to Kafka again. Deciding never waits on a stalled broker for longer than that
first half second, and a request that is answered 200 is durable either way.

The spool is bounded (`spool.max_bytes`): full, a decision is refused with a 503 at once.
What is in the spool when the gateway stops (or crashes) is replayed when it starts again,
so the spool directory must be on a persistent volume, one per gateway process (a lock file
refuses a second process).

Delivery into Kafka is at least once: an event whose acknowledgement came too late is in the
spool as well, and a replay interrupted between Kafka's acknowledgement and the deletion from
the spool sends it again. Copies are byte for byte the same event, and a worker meeting an
event's transaction id again skips it.
"""

import asyncio
import contextlib
import fcntl
import logging
import time
from pathlib import Path
from typing import IO

from service.adapters.kafka_bus import KafkaBus
from service.adapters.outbox import Outbox, OutboxClosed, OutboxFull
from service.core.breaker import CircuitBreaker, Guard
from service.core.ports import BusStatus
from service.core.records import DecisionEvent
from service.errors import BusUnavailable
from service.metrics import Metrics
from service.settings import KafkaSettings, SpoolSettings

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.sqlite3"
LOCK_FILE = "spool.lock"
# Events handed to Kafka per replay round: big enough to drain a long outage quickly
# (thousands per second), small enough to keep each round within its deadline.
REPLAY_BATCH = 500
# Between attempts to reach Kafka again while it stays away.
RETRY_FIRST_S = 0.25
RETRY_CAP_S = 5.0
# Without a spool: after this many publishes in a row missed their deadline, refuse at once
# for a while.
DIRECT_FAILURES_TO_OPEN = 3
DIRECT_OPEN_S = 2.0


class SpoolLocked(Exception):
    """Another process holds this spool directory."""


def _lock(directory: Path) -> IO[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    handle = (directory / LOCK_FILE).open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise SpoolLocked(
            f"the spool {directory} is in use by another gateway process; give each gateway "
            "its own SHAPSTREAM_SPOOL_DIR"
        ) from exc
    return handle


class SpooledKafkaBus:
    """`EventBus` on Kafka with a local spool (without one: failing fast while Kafka is away)."""

    def __init__(
        self,
        kafka: KafkaBus,
        settings: KafkaSettings,
        metrics: Metrics,
        outbox: Outbox | None,
        lock: IO[bytes] | None = None,
    ) -> None:
        self._kafka = kafka
        self._settings = settings
        self._metrics = metrics
        self._outbox = outbox
        # Without a spool, a stalled Kafka must still fail requests fast, not hold each one
        # for the whole publish deadline.
        self._direct = Guard(
            "event bus",
            CircuitBreaker(DIRECT_FAILURES_TO_OPEN, DIRECT_OPEN_S),
            settings.publish_timeout_s,
            BusUnavailable,
        )
        self._lock = lock
        self._spooling = outbox is not None and outbox.count > 0
        self._wakeup = asyncio.Event()
        self._replayer: asyncio.Task[None] | None = None
        self._spooled_since = time.monotonic() if self._spooling else 0.0
        # Set when the spool refused a decision, until one fits again or a replay makes room.
        self._full = False
        self._closed = False

    @classmethod
    async def open(
        cls,
        kafka: KafkaBus,
        settings: KafkaSettings,
        spool: SpoolSettings,
        directory: Path,
        metrics: Metrics,
    ) -> "SpooledKafkaBus":
        """The bus; with the spool enabled, whatever an earlier run left in it is replayed."""
        if not spool.enabled:
            return cls(kafka, settings, metrics, None)
        lock = await asyncio.to_thread(_lock, directory)
        try:
            outbox = await Outbox.open(directory / SPOOL_FILE, spool.max_bytes)
        except BaseException:
            lock.close()
            raise
        bus = cls(kafka, settings, metrics, outbox, lock)
        if bus._spooling:
            log.warning(
                "spool %s holds %d decisions from an earlier run: replaying them to Kafka",
                directory,
                outbox.count,
            )
        bus._start_replayer()
        bus._observe()
        return bus

    async def publish(self, event: DecisionEvent) -> None:
        """Return once Kafka acknowledged the event or the spool holds it on disk."""
        if self._outbox is None:
            await self._direct.call(lambda: self._kafka.publish(event))
            return
        key, value = event.transaction_id.encode(), event.to_bytes()
        if not self._spooling:
            try:
                await self._kafka.send(key, value, self._settings.spool_after_s)
                return
            except BusUnavailable:
                self._begin_spooling(
                    f"Kafka did not acknowledge within {self._settings.spool_after_s} s"
                )
        await self._spool(self._outbox, event.transaction_id, value)

    async def _spool(self, outbox: Outbox, transaction_id: str, value: bytes) -> None:
        try:
            await outbox.append(transaction_id, value, time.time())
        except OutboxFull as exc:
            self._full = True
            self._metrics.spool_refusals.inc()
            raise BusUnavailable(
                "Kafka is unreachable and the gateway's spool is full.", retry_after_s=5.0
            ) from exc
        except OutboxClosed as exc:
            raise BusUnavailable("The gateway is stopping.") from exc
        self._full = False
        self._metrics.spooled.inc()
        self._observe()
        self._wakeup.set()

    def _begin_spooling(self, why: str) -> None:
        if self._spooling:
            return
        self._spooling = True
        self._spooled_since = time.monotonic()
        log.warning("%s: decisions go to the local spool until Kafka is back", why)
        self._observe()

    def _start_replayer(self) -> None:
        self._replayer = asyncio.create_task(self._replay_forever(), name="spool-replayer")

    async def _replay_forever(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        failures = 0
        while not self._closed:
            if outbox.idle():
                self._end_spooling()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._replay_round(outbox)
                failures = 0
            except (BusUnavailable, OutboxClosed) as exc:
                delay = min(RETRY_CAP_S, RETRY_FIRST_S * 2**failures)
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "replaying the spool (%d decisions) failed: %s; retrying every %.1f s",
                        outbox.count,
                        exc,
                        delay,
                    )
                await asyncio.sleep(delay)

    async def _replay_round(self, outbox: Outbox) -> None:
        # A metadata round trip first: sends queued to a broker that is away would pile up in
        # the producer and be sent again by the next round.
        await self._kafka.ping()
        entries = await outbox.read(0, REPLAY_BATCH)
        if not entries:
            return
        events = [(e.transaction_id.encode(), e.payload) for e in entries]
        await self._kafka.send_many(events, self._settings.publish_timeout_s)
        await outbox.delete(entries)
        self._full = False
        self._metrics.spool_replayed.inc(len(entries))
        self._observe()

    def _end_spooling(self) -> None:
        if not self._spooling:
            return
        self._spooling = False
        log.warning(
            "spool replayed after %.1f s: decisions go straight to Kafka again",
            time.monotonic() - self._spooled_since,
        )
        self._observe()

    def _observe(self) -> None:
        count = self._outbox.count if self._outbox is not None else 0
        size = self._outbox.size if self._outbox is not None else 0
        self._metrics.spooling.set(1 if self._spooling else 0)
        self._metrics.spool_events.set(count)
        self._metrics.spool_bytes.set(size)

    async def ping(self) -> None:
        await self._kafka.ping()

    def status(self) -> BusStatus:
        if self._outbox is None:
            return BusStatus(accepting=True)
        full = self._full
        detail = "the spool is full" if full else ""
        if self._spooling and not full:
            detail = "Kafka is not acknowledging: decisions are spooled on local disk"
        return BusStatus(
            accepting=not full,
            spooling=self._spooling,
            spooled_events=self._outbox.count,
            spooled_bytes=self._outbox.size,
            detail=detail,
        )

    async def close(self) -> None:
        """Stop replaying (what is left stays in the spool for the next start) and close."""
        if self._closed:
            return
        self._closed = True
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        try:
            if self._outbox is not None:
                await self._outbox.close()
        finally:
            if self._lock is not None:
                self._lock.close()
            await self._kafka.close()
