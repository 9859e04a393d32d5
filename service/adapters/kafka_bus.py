"""Kafka adapters: the gateway's publisher (`KafkaBus`) and the workers' consumer (`KafkaSource`).

aiokafka's defaults are unsafe here (acks=1, no idempotence, auto-commit, offset reset to
"latest"), so every such setting is spelled out below.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)

from service.adapters.kafka_backlog import OldestUnwritten
from service.core.ports import BusStatus
from service.core.records import DecisionEvent
from service.errors import BusUnavailable
from service.metrics import Metrics
from service.settings import KafkaSettings

log = logging.getLogger(__name__)

# Dead-letter headers: why the event was rejected and where it came from.
REASON_HEADER = "shapstream-reason"
ORIGIN_HEADER = "shapstream-origin"

# A member has this long to finish its in-flight batch and rejoin when the group rebalances.
REBALANCE_TIMEOUT_MS = 30_000
# How long `on_partitions_revoked` waits for the in-flight batch to commit (below the above).
REVOKE_WAIT_S = 20.0
# A commit stuck on an unreachable coordinator is abandoned: the batch is simply redelivered.
COMMIT_TIMEOUT_S = 30.0


def _producer(settings: KafkaSettings, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        client_id=client_id,
        # Every in-sync replica has the event before the send succeeds.
        acks="all",
        # Broker-side dedup of the producer's own retries: no duplicate from a lost ack.
        enable_idempotence=True,
        linger_ms=settings.linger_ms,
        # Also aiokafka's delivery timeout: a send still queued after this fails for good.
        request_timeout_ms=40_000,
    )


async def _start_or_stop(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """Start `producer`; if that fails or is cancelled, release its connections first."""
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    return producer


def _swallow(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()


def _report_late(transaction_id: str) -> Callable[["asyncio.Future[Any]"], None]:
    """A callback for a send whose caller stopped waiting: the send itself goes on."""

    def report(fut: "asyncio.Future[Any]") -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            log.warning("event %s reached Kafka after its publish deadline", transaction_id)
        else:
            log.warning("event %s was not delivered after its deadline: %r", transaction_id, exc)

    return report


class KafkaBus:
    """The gateway's EventBus: key = transaction id, value = the event's bytes.

    Publishes and failures are counted by the caller (the gateway's `Decider`), not here.

    The producer is started on first use (or by `open`), so a gateway can come up while Kafka
    is down and answer 503 until it is back.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, settings: KafkaSettings, *, connect: bool = True) -> "KafkaBus":
        """A bus; with `connect`, raise `BusUnavailable` unless Kafka answers in time."""
        bus = cls(settings)
        if connect:
            try:
                await bus.ping()
            except BaseException:
                await bus.close()
                raise
        return bus

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = _producer(self._settings, "shapstream-gateway")
                self._producer = await _start_or_stop(producer)
            return self._producer

    async def publish(self, event: DecisionEvent) -> None:
        """Return once the brokers acknowledged the event (acks=all); raise `BusUnavailable` late.

        Cancelling the wait does not cancel a send already queued: after `BusUnavailable` the
        event may still reach Kafka. A retry with the same transaction id is safe either way:
        the gateway answers a repeated id with its first decision, and a worker meeting an
        event again skips it (workers/explainer.py), so a second copy changes nothing.
        """
        key = event.transaction_id.encode()
        await self.send(key, event.to_bytes(), self._settings.publish_timeout_s)

    async def send(self, key: bytes, value: bytes, timeout_s: float) -> None:
        """Send one event and wait up to `timeout_s` for its acknowledgement."""
        sent: asyncio.Future[Any] | None = None
        try:
            async with asyncio.timeout(timeout_s):
                producer = await self._started()
                sent = await producer.send(self._settings.topic, value=value, key=key)
                # Shielded: on the deadline we stop waiting, but the future keeps its result.
                await asyncio.shield(sent)
        except (TimeoutError, KafkaError) as exc:
            if sent is not None and not sent.done():
                sent.add_done_callback(_report_late(key.decode(errors="replace")))
            raise BusUnavailable("the event bus did not acknowledge the decision in time") from exc

    async def send_many(self, events: Sequence[tuple[bytes, bytes]], timeout_s: float) -> None:
        """Send (key, value) pairs in order and wait for every acknowledgement.

        The idempotent producer keeps the order of one partition's events; all are queued
        before any is awaited, so they travel in a few produce requests, not one each.
        """
        pending: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(timeout_s):
                producer = await self._started()
                for key, value in events:
                    pending.append(await producer.send(self._settings.topic, value=value, key=key))
                await asyncio.gather(*(asyncio.shield(sent) for sent in pending))
        except (TimeoutError, KafkaError) as exc:
            for sent in pending:
                # Taken, so an abandoned future's error is not logged as never retrieved.
                sent.add_done_callback(_swallow)
            raise BusUnavailable("Kafka did not acknowledge the replayed events in time") from exc

    def status(self) -> BusStatus:
        return BusStatus(accepting=True)

    async def ping(self) -> None:
        """Raise `BusUnavailable` unless the cluster returns its metadata within the deadline."""
        try:
            async with asyncio.timeout(self._settings.publish_timeout_s):
                producer = await self._started()
                # A real metadata round trip; the producer's cached metadata would prove nothing.
                await producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError) as exc:
            raise BusUnavailable("Kafka did not answer") from exc

    async def close(self) -> None:
        """Flush what is queued and disconnect."""
        async with self._lock:
            if self._producer is not None:
                await self._producer.stop()
                self._producer = None


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create the decisions and dead-letter topics unless they exist (safe to repeat)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="shapstream-admin")
    await admin.start()
    try:
        topics = [
            NewTopic(settings.topic, settings.partitions, settings.replication_factor),
            NewTopic(settings.dead_letter_topic, settings.partitions, settings.replication_factor),
        ]
        response = await admin.create_topics(topics)
        for topic, code, *_ in response.topic_errors:
            error = for_code(code)
            if code == 0 or error is TopicAlreadyExistsError:
                continue
            raise error(f"creating topic {topic!r}")
    finally:
        await admin.close()


@dataclass(frozen=True)
class _Origin:
    key: bytes | None
    tp: TopicPartition
    offset: int


class KafkaBatch:
    """One `getmany` result; `commit` commits exactly its offsets (last + 1 per partition)."""

    def __init__(
        self,
        source: "KafkaSource",
        payloads: list[bytes],
        positions: list[tuple[str, int]],
        offsets: dict[TopicPartition, int],
    ) -> None:
        self._source = source
        self._payloads = payloads
        self._positions = positions
        self._offsets = offsets

    @property
    def payloads(self) -> Sequence[bytes]:
        return self._payloads

    @property
    def positions(self) -> Sequence[tuple[str, int]]:
        """("topic/partition", offset) of each payload."""
        return self._positions

    @property
    def offsets(self) -> dict[TopicPartition, int]:
        """The offsets `commit` will commit: the next offset to read, per partition."""
        return dict(self._offsets)

    async def commit(self) -> None:
        """Commit; a refusal after a rebalance is logged and counted, not raised."""
        await self._source._commit(self)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: "KafkaSource") -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._on_assigned()
        log.info("assigned partitions %s", sorted((tp.topic, tp.partition) for tp in assigned))


class KafkaSource:
    """A worker's EventSource: one member of the consumer group, committing only what it wrote."""

    def __init__(
        self,
        settings: KafkaSettings,
        metrics: Metrics,
        consumer: AIOKafkaConsumer,
        dead_letters: AIOKafkaProducer,
        revoke_wait_s: float = REVOKE_WAIT_S,
    ) -> None:
        self._settings = settings
        self._revoke_wait_s = revoke_wait_s
        self._metrics = metrics
        self._consumer = consumer
        self._dead_letters = dead_letters
        # Where each payload of the batch handed out came from, by object identity, so a dead
        # letter keeps its original key. A list: CPython shares tiny bytes objects (b"", b"x").
        self._origins: dict[int, list[_Origin]] = {}
        # Holds those objects alive, so no other object can take one of their ids meanwhile.
        self._in_flight: list[bytes] = []
        # Set while no batch is between `next_batch` and its `commit`.
        self._idle = asyncio.Event()
        self._idle.set()
        # Between an assignment and the next revocation (or the stop), for readiness.
        self._in_group = False
        # The backlog's age, read at scrape time so it keeps growing while a batch is retried.
        self._unwritten = OldestUnwritten()
        metrics.consumer_lag_seconds.set_function(self._unwritten.age_s)
        # Per partition of the batch in flight: its last record's timestamp (ms); and the
        # partitions that had more events than that batch took, as of its fetch.
        self._newest_ms: dict[TopicPartition, int] = {}
        self._behind: set[TopicPartition] = set()

    @classmethod
    async def open(
        cls,
        settings: KafkaSettings,
        metrics: Metrics,
        *,
        client_id: str = "shapstream-worker",
        revoke_wait_s: float = REVOKE_WAIT_S,
    ) -> "KafkaSource":
        """Join the group (`settings.group_id`) on `settings.topic` and start the DLQ producer."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap,
            client_id=client_id,
            group_id=settings.group_id,
            # Offsets move only when the batch is in the store (see `KafkaBatch.commit`).
            enable_auto_commit=False,
            # A new group starts at the oldest event: an event published before any worker
            # existed still gets explained.
            auto_offset_reset="earliest",
            # Nothing is published transactionally today; if a producer ever is, aborted
            # events must never be explained.
            isolation_level="read_committed",
            fetch_min_bytes=settings.fetch_min_bytes,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
        )
        dead_letters = _producer(settings, f"{client_id}-dlq")
        source = cls(settings, metrics, consumer, dead_letters, revoke_wait_s)
        consumer.subscribe([settings.topic], listener=_Listener(source))
        try:
            await _start_or_stop(dead_letters)
            await consumer.start()
        except BaseException:
            await consumer.stop()
            await dead_letters.stop()
            raise
        return source

    def assignment(self) -> set[TopicPartition]:
        """The partitions this member owns right now."""
        assigned: set[TopicPartition] = self._consumer.assignment()
        return assigned

    def in_group(self) -> bool:
        """Whether this member holds its group's current assignment (which may be empty)."""
        return self._in_group

    async def next_batch(self, max_events: int, timeout_s: float) -> KafkaBatch | None:
        """Up to `max_events` events, waiting up to `timeout_s`; None when none arrived."""
        # Asking again means the previous batch was given up uncommitted (it will be redelivered
        # after the next rebalance or restart).
        self._forget_batch()
        fetched = await self._consumer.getmany(
            timeout_ms=int(timeout_s * 1000), max_records=max_events
        )
        payloads: list[bytes] = []
        positions: list[tuple[str, int]] = []
        offsets: dict[TopicPartition, int] = {}
        first_ms: dict[TopicPartition, int] = {}
        for tp, records in fetched.items():
            where = f"{tp.topic}/{tp.partition}"
            for record in records:
                value: bytes = record.value if record.value is not None else b""
                payloads.append(value)
                positions.append((where, record.offset))
                self._origins.setdefault(id(value), []).append(
                    _Origin(record.key, tp, record.offset)
                )
            if records:
                offsets[tp] = records[-1].offset + 1
                # A negative timestamp is a record without one (pre-0.10 message format).
                if records[0].timestamp >= 0:
                    first_ms[tp] = records[0].timestamp
                    self._newest_ms[tp] = max(records[0].timestamp, records[-1].timestamp)
        self._unwritten.fetched(first_ms)
        await self._update_lag(set(offsets))
        if not payloads:
            return None
        self._in_flight = payloads
        self._idle.clear()
        return KafkaBatch(self, payloads, positions, offsets)

    async def _update_lag(self, in_batch: set[TopicPartition]) -> None:
        # Highwaters first, without awaiting: the assignment cannot change in between.
        highwaters = {tp: self._consumer.highwater(tp) for tp in self._consumer.assignment()}
        remaining: dict[TopicPartition, int] = {}
        try:
            for tp, highwater in highwaters.items():
                if highwater is None:
                    # Not fetched yet: the lag of this partition is unknown, not zero.
                    continue
                remaining[tp] = max(0, highwater - await self._consumer.position(tp))
        except IllegalStateError:
            # Rebalanced while counting: keep the previous value.
            return
        self._metrics.consumer_lag.set(sum(remaining.values()))
        self._behind = {tp for tp, left in remaining.items() if left > 0}
        self._unwritten.caught_up(
            tp for tp, left in remaining.items() if left == 0 and tp not in in_batch
        )

    async def _commit(self, batch: KafkaBatch) -> None:
        # Called once the batch is in the store: its events leave the backlog whatever the
        # commit's fate (a refused commit only means they will be written again, elsewhere).
        self._unwritten.written(self._newest_ms, self._behind)
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT_S):
                await self._consumer.commit(batch.offsets)
        except (CommitFailedError, IllegalStateError, TimeoutError) as exc:
            # The partitions moved on (or the coordinator is unreachable): whoever reads them
            # next redelivers this batch, and rewriting it is harmless (idempotent upserts).
            self._metrics.commit_failures.inc()
            log.warning("offset commit refused, the batch will be redelivered: %r", exc)
        finally:
            self._forget_batch()

    def _forget_batch(self) -> None:
        self._origins.clear()
        self._in_flight = []
        self._newest_ms = {}
        self._idle.set()

    def _on_assigned(self) -> None:
        self._in_group = True

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Out of the group until the rebalance assigns partitions again.
        self._in_group = False
        # Let the in-flight batch be written and committed while we still own its partitions.
        try:
            async with asyncio.timeout(self._revoke_wait_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "rebalance: the in-flight batch did not commit within %.1f s; "
                "it will be redelivered to the partitions' next owner",
                self._revoke_wait_s,
            )
        # Their backlog is the next owner's to report (even if a late commit comes back here).
        self._behind -= revoked
        self._unwritten.forget(revoked)
        log.info("revoked partitions %s", sorted((tp.topic, tp.partition) for tp in revoked))

    async def dead_letter(self, payload: bytes, reason: str) -> None:
        """Publish `payload` to the dead-letter topic with its reason and original key.

        Raise `BusUnavailable` past the publish deadline, so the caller can retry before it
        commits: the event must be in the dead-letter topic before its offset moves on.
        """
        found = self._origins.get(id(payload))
        origin = found.pop(0) if found else None
        headers = [(REASON_HEADER, reason.encode())]
        if origin is not None:
            where = f"{origin.tp.topic}/{origin.tp.partition}@{origin.offset}"
            headers.append((ORIGIN_HEADER, where.encode()))
        try:
            async with asyncio.timeout(self._settings.publish_timeout_s):
                sent = await self._dead_letters.send(
                    self._settings.dead_letter_topic,
                    value=payload,
                    key=origin.key if origin is not None else None,
                    headers=headers,
                )
                await asyncio.shield(sent)
        except (TimeoutError, KafkaError) as exc:
            raise BusUnavailable("the dead-letter topic did not acknowledge in time") from exc

    async def close(self) -> None:
        """Leave the group (so partitions move at once) and flush the dead-letter producer."""
        # Whatever is in flight now stays uncommitted; a rebalance must not wait for it.
        self._idle.set()
        self._in_group = False
        self._unwritten.clear()
        try:
            await self._consumer.stop()
        finally:
            await self._dead_letters.stop()
