"""KafkaBus and KafkaSource against the real broker: delivery, commits, dead letters, deadlines."""

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from service.adapters.kafka_bus import (
    ORIGIN_HEADER,
    REASON_HEADER,
    KafkaBatch,
    KafkaBus,
    KafkaSource,
    ensure_topics,
)
from service.core.records import BinaryPrediction, DecisionEvent, ModelRef
from service.errors import BusUnavailable
from service.metrics import create_metrics
from service.settings import KafkaSettings
from tests.polling import until

PARTITIONS = 3
# Time allowed for a consumer group to form and hand out partitions on the local broker.
GROUP_WAIT_S = 30.0


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    await until(check, GROUP_WAIT_S, 0.05)


def _event(txn: str, seq: int) -> DecisionEvent:
    return DecisionEvent(
        transaction_id=txn,
        model=ModelRef(name="demo", version="v1"),
        features={"seq": float(seq)},
        prediction=BinaryPrediction(probability=0.4, margin=-0.4, decision="approve"),
        decided_at=datetime.now(UTC),
    )


def _key(payload: bytes) -> tuple[str, int]:
    event = DecisionEvent.from_bytes(payload)
    seq = event.features["seq"]
    assert isinstance(seq, float)
    return event.transaction_id, int(seq)


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> KafkaSettings:
    """Fresh topics and group for each test, so tests never see each other's events."""
    name = f"test-bus-{uuid.uuid4().hex[:12]}"
    settings = KafkaSettings(
        bootstrap=kafka_bootstrap,
        topic=name,
        dead_letter_topic=f"{name}.dlq",
        group_id=f"{name}-group",
        partitions=PARTITIONS,
        publish_timeout_s=10.0,
    )
    await ensure_topics(settings)
    return settings


@pytest.fixture
async def bus(kafka: KafkaSettings) -> AsyncIterator[KafkaBus]:
    opened = await KafkaBus.open(kafka)
    yield opened
    await opened.close()


async def _drain(
    source: KafkaSource, want: int, *, commit: bool = True, timeout_s: float = GROUP_WAIT_S
) -> list[bytes]:
    """Consume until `want` events arrived (or the time is up), committing each batch."""
    got: list[bytes] = []
    async with asyncio.timeout(timeout_s):
        while len(got) < want:
            batch = await source.next_batch(max_events=7, timeout_s=0.5)
            if batch is None:
                continue
            got.extend(batch.payloads)
            if commit:
                await batch.commit()
    return got


async def _nothing_more(source: KafkaSource, for_s: float) -> list[bytes]:
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + for_s
    while loop.time() < end:
        batch = await source.next_batch(max_events=100, timeout_s=0.5)
        if batch is not None:
            got.extend(batch.payloads)
    return got


async def test_ensure_topics_is_idempotent(kafka: KafkaSettings) -> None:
    await ensure_topics(kafka)
    await ensure_topics(kafka)


async def test_every_event_once_in_key_order_and_committed(
    kafka: KafkaSettings, bus: KafkaBus
) -> None:
    keys, per_key = 12, 5

    # One sequential publisher per key: per-key send order is defined, keys interleave.
    async def publish_key(k: int) -> None:
        for seq in range(per_key):
            await bus.publish(_event(f"txn-{k}", seq))

    await asyncio.gather(*(publish_key(k) for k in range(keys)))
    total = keys * per_key

    metrics = create_metrics()
    source = await KafkaSource.open(kafka, metrics)
    try:
        payloads = await _drain(source, total)
        extra = await _nothing_more(source, 1.0)
    finally:
        await source.close()

    seen = [_key(p) for p in payloads + extra]
    assert len(seen) == total
    assert len(set(seen)) == total
    by_key: dict[str, list[int]] = defaultdict(list)
    for txn, seq in seen:
        by_key[txn].append(seq)
    assert all(seqs == list(range(per_key)) for seqs in by_key.values()), by_key
    assert metrics.consumer_lag._value.get() == 0

    # Same group, new member: everything was committed, nothing comes back.
    again = await KafkaSource.open(kafka, create_metrics())
    try:
        assert await _nothing_more(again, 3.0) == []
    finally:
        await again.close()


async def test_uncommitted_batch_is_redelivered(kafka: KafkaSettings, bus: KafkaBus) -> None:
    for seq in range(6):
        await bus.publish(_event(f"txn-{seq}", seq))
    first = await KafkaSource.open(kafka, create_metrics())
    try:
        # A worker that dies before its store write never commits.
        delivered = await _drain(first, 6, commit=False)
    finally:
        await first.close()

    second = await KafkaSource.open(kafka, create_metrics())
    try:
        redelivered = await _drain(second, 6)
    finally:
        await second.close()
    assert sorted(map(_key, redelivered)) == sorted(map(_key, delivered))


async def test_commit_covers_exactly_its_batch(kafka: KafkaSettings, bus: KafkaBus) -> None:
    for seq in range(9):
        await bus.publish(_event(f"txn-{seq}", seq))
    source = await KafkaSource.open(kafka, create_metrics())
    try:
        batch = await _one_batch(source)
        expected = batch.offsets
        await batch.commit()
    finally:
        await source.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(kafka.group_id)
    finally:
        await admin.close()
    assert {tp: meta.offset for tp, meta in committed.items()} == expected


async def _one_batch(source: KafkaSource) -> KafkaBatch:
    async with asyncio.timeout(GROUP_WAIT_S):
        while True:
            batch = await source.next_batch(max_events=100, timeout_s=0.5)
            if batch is not None:
                return batch


async def test_dead_letter_keeps_key_and_reason(kafka: KafkaSettings, bus: KafkaBus) -> None:
    event = _event("txn-poison", 0)
    await bus.publish(event)
    source = await KafkaSource.open(kafka, create_metrics())
    try:
        batch = await _one_batch(source)
        [payload] = batch.payloads
        await source.dead_letter(payload, "invalid-features")
        await batch.commit()
    finally:
        await source.close()

    reader = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await reader.start()
    try:
        tps = [TopicPartition(kafka.dead_letter_topic, p) for p in range(PARTITIONS)]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        async with asyncio.timeout(GROUP_WAIT_S):
            records: list[ConsumerRecord[bytes, bytes]] = []
            while not records:
                fetched = await reader.getmany(timeout_ms=500)
                records = [r for rs in fetched.values() for r in rs]
    finally:
        await reader.stop()
    [record] = records
    assert record.value == event.to_bytes()
    assert record.key == b"txn-poison"
    headers = dict(record.headers)
    assert headers[REASON_HEADER] == b"invalid-features"
    assert headers[ORIGIN_HEADER].startswith(f"{kafka.topic}/".encode())


async def test_rebalance_commit_failure_is_counted_and_redelivered(
    kafka: KafkaSettings, bus: KafkaBus
) -> None:
    total = 30
    for seq in range(total):
        await bus.publish(_event(f"txn-{seq}", seq))
    metrics = create_metrics()
    # A member whose batch outlives the rebalance (e.g. a store outage) loses its partitions.
    slow = await KafkaSource.open(kafka, metrics, revoke_wait_s=0.2)
    try:
        in_flight = await _batch_over_all_partitions(slow)
        other = await KafkaSource.open(kafka, create_metrics())
        try:
            # The new member's start returns once it is assigned; the old one may lag behind.
            async def moved() -> bool:
                return bool(set(in_flight.offsets) - slow.assignment())

            await _until(moved)
            await in_flight.commit()
            assert metrics.commit_failures._value.get() == 1
        finally:
            await other.close()
    finally:
        await slow.close()

    # Nothing was committed, so the group's next member gets the whole batch again.
    last = await KafkaSource.open(kafka, create_metrics())
    try:
        redelivered = await _drain(last, total)
    finally:
        await last.close()
    assert {_key(p) for p in in_flight.payloads} <= {_key(p) for p in redelivered}


async def test_in_flight_batch_commits_during_a_rebalance(
    kafka: KafkaSettings, bus: KafkaBus
) -> None:
    """The revoke listener holds the rebalance until the in-flight batch is committed."""
    total = 30
    for seq in range(total):
        await bus.publish(_event(f"txn-{seq}", seq))
    metrics = create_metrics()
    first = await KafkaSource.open(kafka, metrics)
    try:
        in_flight = await _batch_over_all_partitions(first)
        joining = asyncio.create_task(KafkaSource.open(kafka, create_metrics()))

        # The broker holds the group in PreparingRebalance while `first` waits to rejoin.
        async def rebalancing() -> bool:
            assert not joining.done()
            return await _group_state(kafka) == "PreparingRebalance"

        await _until(rebalancing)
        await in_flight.commit()
        second = await joining
        try:
            assert metrics.commit_failures._value.get() == 0
            rest = await _drain(second, total - len(in_flight.payloads))
            # Whatever the second member got is only what the batch did not cover.
            assert not {_key(p) for p in rest} & {_key(p) for p in in_flight.payloads}
        finally:
            await second.close()
    finally:
        await first.close()


async def _group_state(kafka: KafkaSettings) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([kafka.group_id])
    finally:
        await admin.close()
    [group] = response.groups
    state: str = group[2]
    return state


async def _batch_over_all_partitions(source: KafkaSource) -> KafkaBatch:
    # One fetch from the single broker covers every partition; retry if it raced the producer.
    async with asyncio.timeout(GROUP_WAIT_S):
        while True:
            batch = await _one_batch(source)
            if len(batch.offsets) == PARTITIONS:
                return batch


async def test_publish_to_refused_bootstrap_fails_within_deadline() -> None:
    settings = KafkaSettings(bootstrap="127.0.0.1:1", publish_timeout_s=1.0)
    bus = KafkaBus(settings)
    try:
        await _assert_unavailable_in_time(bus, settings.publish_timeout_s)
    finally:
        await bus.close()


async def test_publish_to_silent_broker_fails_within_deadline() -> None:
    """A broker that accepts connections and never answers: the #1101 hang, bounded."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = KafkaSettings(bootstrap=f"127.0.0.1:{port}", publish_timeout_s=1.0)
    bus = KafkaBus(settings)
    try:
        await _assert_unavailable_in_time(bus, settings.publish_timeout_s)
        assert accepted, "the client never reached the silent broker"
    finally:
        await bus.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_open_refuses_unreachable_cluster() -> None:
    settings = KafkaSettings(bootstrap="127.0.0.1:1", publish_timeout_s=1.0)
    with pytest.raises(BusUnavailable):
        await KafkaBus.open(settings)


async def _assert_unavailable_in_time(bus: KafkaBus, deadline_s: float) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BusUnavailable):
        await bus.publish(_event("txn-down", 0))
    assert loop.time() - started < deadline_s + 1.0
