"""The age of a worker's backlog (`shapstream_worker_lag_seconds`): Kafka's bookkeeping without
a broker, and the embedded outbox."""

import time
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from service.adapters.kafka_backlog import OldestUnwritten
from service.adapters.local_bus import LocalBus
from service.adapters.outbox import Outbox
from service.metrics import Metrics, create_metrics

P0 = TopicPartition("decisions", 0)
P1 = TopicPartition("decisions", 1)


class Clock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_zero_when_nothing_was_fetched() -> None:
    assert OldestUnwritten(Clock()).age_s() == 0.0


def test_the_batch_in_flight_ages_until_it_is_written() -> None:
    clock = Clock()
    backlog = OldestUnwritten(clock)
    # Produced 4 s and 3 s ago, on two partitions.
    backlog.fetched({P0: 996_000, P1: 997_000})
    assert backlog.age_s() == 4.0
    # A batch stuck in retries keeps growing: read at scrape time, not at fetch time.
    clock.now += 10
    assert backlog.age_s() == 14.0

    backlog.written({P0: 996_500, P1: 997_500}, behind=set())
    assert backlog.age_s() == 0.0


def test_a_partition_still_behind_ages_from_its_last_written_event() -> None:
    clock = Clock()
    backlog = OldestUnwritten(clock)
    backlog.fetched({P0: 990_000})
    backlog.written({P0: 995_000}, behind={P0})
    # The next event (not fetched yet) came at or after 995 s.
    assert backlog.age_s() == 5.0
    # Fetched: its own timestamp replaces the bound.
    backlog.fetched({P0: 996_000})
    assert backlog.age_s() == 4.0
    backlog.written({P0: 999_000}, behind=set())
    assert backlog.age_s() == 0.0


def test_caught_up_revoked_and_stopped_partitions_leave_the_backlog() -> None:
    clock = Clock()
    backlog = OldestUnwritten(clock)
    backlog.fetched({P0: 990_000, P1: 995_000})
    backlog.caught_up([P0])
    assert backlog.age_s() == 5.0
    backlog.forget({P1})
    assert backlog.age_s() == 0.0
    backlog.fetched({P0: 990_000})
    backlog.clear()
    assert backlog.age_s() == 0.0


def test_a_producer_clock_ahead_of_ours_is_not_a_negative_age() -> None:
    backlog = OldestUnwritten(Clock())
    backlog.fetched({P0: 1_002_000})
    assert backlog.age_s() == 0.0


# ---------------------------------------------------------------- the embedded outbox


def _lag(metrics: Metrics) -> tuple[float | None, float | None]:
    registry = metrics.registry
    return (
        registry.get_sample_value("shapstream_worker_lag_events"),
        registry.get_sample_value("shapstream_worker_lag_seconds"),
    )


async def test_the_outbox_reports_its_oldest_unwritten_event(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    # Published a minute and half a minute ago (by an earlier run of the process).
    earlier = await Outbox.open(path)
    now = time.time()
    await earlier.append("txn-1", b"one", now - 60)
    await earlier.append("txn-2", b"two", now - 30)
    await earlier.close()

    metrics = create_metrics()
    bus = await LocalBus.open(path, metrics)
    try:
        batch = await bus.next_batch(max_events=1, timeout_s=0.1)
        assert batch is not None
        pending, age = _lag(metrics)
        assert pending == 2
        assert age == pytest.approx(60, abs=5)
        # Written and committed: the other one is now the oldest.
        await batch.commit()
        pending, age = _lag(metrics)
        assert pending == 1
        assert age == pytest.approx(30, abs=5)

        batch = await bus.next_batch(max_events=1, timeout_s=0.1)
        assert batch is not None
        await batch.commit()
        assert _lag(metrics) == (0, 0)
    finally:
        await bus.close()
