"""The embedded outbox: durable publish, batch delivery, commit, redelivery after reopen."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.adapters.local_bus import OUTBOX_FILE, LocalBus, open_local_bus
from service.core.records import BinaryPrediction, DecisionEvent, ModelRef
from service.errors import BusUnavailable
from service.metrics import create_metrics
from service.settings import Settings


def _event(n: int) -> DecisionEvent:
    return DecisionEvent(
        transaction_id=f"txn-{n:04d}",
        model=ModelRef(name="demo", version="v1"),
        features={"age": float(n), "purpose": "car"},
        prediction=BinaryPrediction(probability=0.25, margin=-1.1, decision="approve"),
        decided_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _ids(payloads: list[bytes]) -> list[str]:
    return [DecisionEvent.from_bytes(p).transaction_id for p in payloads]


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[LocalBus]:
    opened = await LocalBus.open(tmp_path / OUTBOX_FILE)
    yield opened
    await opened.close()


async def test_publish_then_batches_in_order(bus: LocalBus) -> None:
    for n in range(5):
        await bus.publish(_event(n))
    first = await bus.next_batch(max_events=3, timeout_s=0.1)
    assert first is not None
    assert _ids(list(first.payloads)) == ["txn-0000", "txn-0001", "txn-0002"]
    second = await bus.next_batch(max_events=3, timeout_s=0.1)
    assert second is not None
    assert _ids(list(second.payloads)) == ["txn-0003", "txn-0004"]
    assert await bus.next_batch(max_events=3, timeout_s=0.05) is None


async def test_commit_deletes_only_its_batch(bus: LocalBus) -> None:
    for n in range(4):
        await bus.publish(_event(n))
    first = await bus.next_batch(max_events=2, timeout_s=0.1)
    second = await bus.next_batch(max_events=2, timeout_s=0.1)
    assert first is not None
    assert second is not None
    await second.commit()
    assert await bus.pending() == 2
    await first.commit()
    assert await bus.pending() == 0


async def test_waiting_consumer_is_woken_by_publish(bus: LocalBus) -> None:
    waiting = asyncio.create_task(bus.next_batch(max_events=10, timeout_s=10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    started = asyncio.get_running_loop().time()
    await bus.publish(_event(7))
    batch = await waiting
    assert batch is not None
    assert _ids(list(batch.payloads)) == ["txn-0007"]
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_empty_outbox_returns_none_after_timeout(bus: LocalBus) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await bus.next_batch(max_events=10, timeout_s=0.2) is None
    assert 0.15 <= loop.time() - started < 2.0


async def test_uncommitted_events_survive_reopen(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    metrics = create_metrics()
    bus = await open_local_bus(settings, metrics)
    for n in range(3):
        await bus.publish(_event(n))
    batch = await bus.next_batch(max_events=2, timeout_s=0.1)
    assert batch is not None
    await batch.commit()
    # A delivered but uncommitted event is the worker crashing mid-batch.
    delivered = await bus.next_batch(max_events=10, timeout_s=0.1)
    assert delivered is not None
    assert _ids(list(delivered.payloads)) == ["txn-0002"]
    await bus.close()

    reopened = await open_local_bus(settings, metrics)
    try:
        again = await reopened.next_batch(max_events=10, timeout_s=0.1)
        assert again is not None
        assert _ids(list(again.payloads)) == ["txn-0002"]
        await again.commit()
        assert await reopened.pending() == 0
        assert metrics.consumer_lag._value.get() == 0
    finally:
        await reopened.close()


async def test_dead_letters_are_kept_with_reason(tmp_path: Path) -> None:
    path = tmp_path / OUTBOX_FILE
    bus = await LocalBus.open(path)
    await bus.dead_letter(b"\x00garbage", "malformed")
    await bus.dead_letter(_event(1).to_bytes(), "unknown-model-version")
    await bus.close()

    reopened = await LocalBus.open(path)
    try:
        letters = await reopened.dead_letters()
    finally:
        await reopened.close()
    assert [(d.reason, d.payload) for d in letters] == [
        ("malformed", b"\x00garbage"),
        ("unknown-model-version", _event(1).to_bytes()),
    ]


async def test_closed_bus_refuses_publish(tmp_path: Path) -> None:
    bus = await LocalBus.open(tmp_path / OUTBOX_FILE)
    await bus.close()
    with pytest.raises(BusUnavailable):
        await bus.publish(_event(1))
