"""The gateway's spool against the real broker: what an earlier run left is replayed, in order."""

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from service.adapters.kafka_bus import KafkaBus, ensure_topics
from service.adapters.outbox import Outbox
from service.adapters.spool import SPOOL_FILE, SpooledKafkaBus
from service.core.records import BinaryPrediction, DecisionEvent, ModelRef
from service.metrics import create_metrics
from service.settings import KafkaSettings, SpoolSettings
from tests.polling import until

LEFT = 40
WAIT_S = 30.0


def event(n: int) -> DecisionEvent:
    return DecisionEvent(
        transaction_id=f"txn-{n % 7}",  # some ids repeat: their order must hold too
        model=ModelRef(name="demo", version="v1"),
        features={"n": n},
        prediction=BinaryPrediction(probability=0.4, margin=-0.4, decision="approve"),
        decided_at=datetime.now(UTC),
    )


async def consume(settings: KafkaSettings, count: int) -> list[DecisionEvent]:
    consumer = AIOKafkaConsumer(
        settings.topic,
        bootstrap_servers=settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    events: list[DecisionEvent] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while len(events) < count:
                fetched = await consumer.getmany(timeout_ms=500)
                for records in fetched.values():
                    events += [DecisionEvent.from_bytes(r.value) for r in records]
    finally:
        await consumer.stop()
    return events


async def test_a_spool_left_by_an_earlier_run_is_replayed_in_order(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    name = f"test-spool-{uuid.uuid4().hex[:12]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic=name, dead_letter_topic=f"{name}.dlq")
    await ensure_topics(settings)
    left = [event(n) for n in range(LEFT)]
    outbox = await Outbox.open(tmp_path / SPOOL_FILE)
    for e in left:
        await outbox.append(e.transaction_id, e.to_bytes(), time.time())
    await outbox.close()

    metrics = create_metrics()
    bus = await SpooledKafkaBus.open(
        KafkaBus(settings), settings, SpoolSettings(), tmp_path, metrics
    )
    try:
        assert bus.status().spooling
        await until(lambda: not bus.status().spooling, WAIT_S)
        assert bus.status().spooled_events == 0
        assert metrics.spool_replayed._value.get() == LEFT
        after = event(LEFT)
        await bus.publish(after)  # Kafka answers: straight there, not through the spool
        assert metrics.spooled._value.get() == 0
    finally:
        await bus.close()

    received = await consume(settings, LEFT + 1)
    # Each transaction id (a Kafka key, so one partition) keeps its spool order.
    for txn in {e.transaction_id for e in left}:
        sent = [e.features["n"] for e in [*left, after] if e.transaction_id == txn]
        got = [e.features["n"] for e in received if e.transaction_id == txn]
        assert got == sent, txn
