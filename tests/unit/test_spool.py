"""The gateway's spool while Kafka does not answer: durable answers, a bound, a restart.

Kafka here is a port nothing listens on, which is what a dead broker looks like to a client;
replaying into a real broker is tests/integration/test_spool.py, stalls of a real broker are
tests/faults/.
"""

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.adapters.kafka_bus import KafkaBus
from service.adapters.outbox import Outbox
from service.adapters.spool import SPOOL_FILE, SpooledKafkaBus, SpoolLocked
from service.core.records import BinaryPrediction, DecisionEvent, ModelRef
from service.errors import BusUnavailable
from service.metrics import Metrics, create_metrics
from service.settings import KafkaSettings, SpoolSettings


def event(n: int) -> DecisionEvent:
    return DecisionEvent(
        transaction_id=f"txn-{n}",
        model=ModelRef(name="demo", version="v1"),
        features={"n": n},
        prediction=BinaryPrediction(probability=0.4, margin=-0.4, decision="approve"),
        decided_at=datetime.now(UTC),
    )


@pytest.fixture
def dead_kafka() -> KafkaSettings:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return KafkaSettings(bootstrap=f"127.0.0.1:{port}", spool_after_s=0.2, publish_timeout_s=0.5)


async def open_bus(
    kafka: KafkaSettings, directory: Path, metrics: Metrics, max_bytes: int = 1 << 20
) -> SpooledKafkaBus:
    spool = SpoolSettings(max_bytes=max_bytes)
    return await SpooledKafkaBus.open(KafkaBus(kafka), kafka, spool, directory, metrics)


@pytest.fixture
async def bus(dead_kafka: KafkaSettings, tmp_path: Path) -> AsyncIterator[SpooledKafkaBus]:
    opened = await open_bus(dead_kafka, tmp_path, create_metrics())
    yield opened
    await opened.close()


async def test_decisions_are_spooled_durably_when_kafka_does_not_ack(
    dead_kafka: KafkaSettings, tmp_path: Path
) -> None:
    metrics = create_metrics()
    bus = await open_bus(dead_kafka, tmp_path, metrics)
    try:
        assert not bus.status().spooling
        await bus.publish(event(1))  # waits for Kafka at most spool_after_s, then spools
        started = time.perf_counter()
        await bus.publish(event(2))  # already spooling: no wait for Kafka
        assert time.perf_counter() - started < 0.15
        status = bus.status()
        assert (status.accepting, status.spooling, status.spooled_events) == (True, True, 2)
        assert metrics.spooled._value.get() == 2
        assert metrics.spooling._value.get() == 1
    finally:
        await bus.close()
    # What the spool holds survives the process, in order, for the next start to replay.
    outbox = await Outbox.open(tmp_path / SPOOL_FILE)
    try:
        assert [e.transaction_id for e in await outbox.read(0, 10)] == ["txn-1", "txn-2"]
    finally:
        await outbox.close()


async def test_a_full_spool_refuses_at_once(dead_kafka: KafkaSettings, tmp_path: Path) -> None:
    metrics = create_metrics()
    size = len(event(1).to_bytes())
    bus = await open_bus(dead_kafka, tmp_path, metrics, max_bytes=2 * size + size // 2)
    try:
        await bus.publish(event(1))
        await bus.publish(event(2))
        started = time.perf_counter()
        with pytest.raises(BusUnavailable, match="spool is full") as refused:
            await bus.publish(event(3))
        assert time.perf_counter() - started < 0.05
        assert 5 <= int(refused.value.response_headers()["Retry-After"]) <= 15
        assert not bus.status().accepting
        assert metrics.spool_refusals._value.get() == 1
    finally:
        await bus.close()


async def test_a_spool_left_by_an_earlier_run_starts_in_spooling_mode(
    dead_kafka: KafkaSettings, tmp_path: Path
) -> None:
    first = await open_bus(dead_kafka, tmp_path, create_metrics())
    await first.publish(event(1))
    await first.close()
    again = await open_bus(dead_kafka, tmp_path, create_metrics())
    try:
        status = again.status()
        assert (status.spooling, status.spooled_events) == (True, 1)
    finally:
        await again.close()


async def test_one_spool_directory_per_gateway_process(
    bus: SpooledKafkaBus, dead_kafka: KafkaSettings, tmp_path: Path
) -> None:
    with pytest.raises(SpoolLocked, match="SHAPSTREAM_SPOOL_DIR"):
        await open_bus(dead_kafka, tmp_path, create_metrics())


async def test_without_a_spool_a_dead_kafka_fails_fast_after_a_few_tries(
    dead_kafka: KafkaSettings, tmp_path: Path
) -> None:
    spool = SpoolSettings(enabled=False)
    bus = await SpooledKafkaBus.open(
        KafkaBus(dead_kafka), dead_kafka, spool, tmp_path, create_metrics()
    )
    try:
        for n in range(3):
            with pytest.raises(BusUnavailable):
                await bus.publish(event(n))
        started = time.perf_counter()
        with pytest.raises(BusUnavailable, match="not answering"):
            await bus.publish(event(9))
        assert time.perf_counter() - started < 0.01
        assert not (tmp_path / SPOOL_FILE).exists()
    finally:
        await asyncio.wait_for(bus.close(), 10)
