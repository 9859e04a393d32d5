"""The real Kafka broker through aiokafka: idempotent producer, committed offsets, partitioning."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

MESSAGES = 60
KEYS = 12
PROCESSED_BY_FIRST = 23
RECEIVE_DEADLINE_S = 30.0

Position = tuple[int, int]  # (partition, offset)
TopicFactory = Callable[[int], Coroutine[Any, Any, str]]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def admin(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=30000)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def new_topic(admin: AIOKafkaAdminClient) -> AsyncIterator[TopicFactory]:
    """Creates fresh, uniquely named topics; deletes them after the test."""
    created: list[str] = []

    async def create(partitions: int) -> str:
        name = unique("it-kafka")
        response = await admin.create_topics([NewTopic(name, partitions, 1)])
        assert [error for _, error, *_ in response.topic_errors] == [0]
        created.append(name)
        return name

    yield create
    if created:
        await admin.delete_topics(created)


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all"
    )
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


def consumer(kafka_bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


async def produce(producer: AIOKafkaProducer, topic: str, count: int) -> dict[Position, bytes]:
    """Sends `count` keyed messages; returns where each one landed."""
    landed: dict[Position, bytes] = {}
    for index in range(count):
        value = f"message-{index}".encode()
        meta = await producer.send_and_wait(topic, value, key=f"key-{index % KEYS}".encode())
        landed[(meta.partition, meta.offset)] = value
    return landed


async def take(client: AIOKafkaConsumer, count: int) -> list[Position]:
    """Processes exactly `count` records, one at a time, in delivery order."""
    seen: list[Position] = []
    async with asyncio.timeout(RECEIVE_DEADLINE_S):
        while len(seen) < count:
            record = await client.getone()
            seen.append((record.partition, record.offset))
    return seen


async def test_consumer_group_resumes_exactly_from_committed_offsets(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    admin: AIOKafkaAdminClient,
) -> None:
    topic = await new_topic(3)
    group = unique("it-group")
    produced = await produce(producer, topic, MESSAGES)
    assert len(produced) == MESSAGES  # idempotent producer: no duplicate appends

    first = consumer(kafka_bootstrap, topic, group)
    await first.start()
    try:
        processed = await take(first, PROCESSED_BY_FIRST)
        commits: dict[TopicPartition, int] = {}
        for partition, offset in processed:
            commits[TopicPartition(topic, partition)] = offset + 1  # the next record to read
        await first.commit(commits)
    finally:
        await first.stop()

    stored = await admin.list_consumer_group_offsets(group)
    assert {tp: meta.offset for tp, meta in stored.items()} == commits

    second = consumer(kafka_bootstrap, topic, group)
    await second.start()
    try:
        rest = await take(second, MESSAGES - PROCESSED_BY_FIRST)
        leftovers = await second.getmany(timeout_ms=1000)
    finally:
        await second.stop()

    assert not any(leftovers.values()), "the second consumer saw more than the remainder"
    together = processed + rest
    assert len(set(together)) == len(together), "a message was delivered twice"
    assert set(together) == set(produced), "a message was lost"


async def test_same_key_always_lands_in_the_same_partition(
    kafka_bootstrap: str, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(6)
    keys = [f"customer-{index}".encode() for index in range(20)]
    partitions: dict[bytes, set[int]] = {key: set() for key in keys}
    for _ in range(3):
        for key in keys:
            meta = await producer.send_and_wait(topic, b"x", key=key)
            partitions[key].add(meta.partition)

    other = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    await other.start()
    try:
        for key in keys:
            meta = await other.send_and_wait(topic, b"y", key=key)
            partitions[key].add(meta.partition)
    finally:
        await other.stop()

    assert all(len(found) == 1 for found in partitions.values()), partitions
    assert len({next(iter(found)) for found in partitions.values()}) > 1, "keys never spread"
