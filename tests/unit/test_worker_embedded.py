"""The explainer worker on the embedded adapters (SQLite outbox and store), real xgboost model."""

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest

from service.adapters.local_bus import OUTBOX_FILE, LocalBus
from service.adapters.sqlite_store import SqliteStore
from service.core.records import ModelRef
from service.core.registry import LoadedModel, ModelRegistry
from service.metrics import Metrics, create_metrics
from service.settings import WorkerSettings
from tests.worker_model import assert_exact, demo_or_small_model, make_events
from workers.explainer import ExplainerWorker


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return demo_or_small_model(tmp_path_factory.mktemp("model"))


@dataclass
class Embedded:
    bus: LocalBus
    store: SqliteStore
    metrics: Metrics
    outbox: Path


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Embedded]:
    outbox = tmp_path / OUTBOX_FILE
    metrics = create_metrics()
    bus = await LocalBus.open(outbox, metrics)
    store = await SqliteStore.open(tmp_path / "store.sqlite3", timedelta(days=30))
    await store.migrate()
    try:
        yield Embedded(bus, store, metrics, outbox)
    finally:
        await bus.close()
        await store.close()


def _worker(
    env: Embedded, registry: ModelRegistry, engine: Literal["auto", "pred_contribs"] = "auto"
) -> ExplainerWorker:
    settings = WorkerSettings(batch_max=8, batch_timeout_ms=10, engine=engine)
    return ExplainerWorker(env.bus, env.store, registry, settings, env.metrics)


async def _drain(worker: ExplainerWorker) -> int:
    total = 0
    while (count := await worker.process_once()) > 0:
        total += count
    return total


async def test_batches_are_explained_exactly_and_committed(
    embedded: Embedded, model: LoadedModel
) -> None:
    events = make_events(model, 20, "embedded")
    for event in events:
        await embedded.bus.publish(event)

    worker = _worker(embedded, ModelRegistry([model]), engine="pred_contribs")
    assert await _drain(worker) == len(events)

    for event in events:
        record = await embedded.store.get(event.transaction_id)
        assert record is not None
        assert record.engine == "pred_contribs"
        assert_exact(model, event, record)
    assert await embedded.bus.pending() == 0
    assert embedded.metrics.explanations.labels(engine="pred_contribs")._value.get() == 20
    assert embedded.metrics.engine_fallbacks._value.get() == 0
    assert embedded.metrics.batch_size._sum.get() == 20


async def test_auto_engine_matches_pred_contribs(embedded: Embedded, model: LoadedModel) -> None:
    events = make_events(model, 10, "auto")
    for event in events:
        await embedded.bus.publish(event)
    await _drain(_worker(embedded, ModelRegistry([model])))
    for event in events:
        record = await embedded.store.get(event.transaction_id)
        assert record is not None
        assert_exact(model, event, record)


async def test_versions_not_on_disk_load_from_the_store(
    embedded: Embedded, model: LoadedModel
) -> None:
    await embedded.store.put_model(model.artifact())
    events = make_events(model, 5, "from-store")
    for event in events:
        await embedded.bus.publish(event)
    await _drain(_worker(embedded, ModelRegistry([]), engine="pred_contribs"))
    for event in events:
        record = await embedded.store.get(event.transaction_id)
        assert record is not None
        assert_exact(model, event, record)


async def test_poison_is_dead_lettered_and_the_rest_flows(
    embedded: Embedded, model: LoadedModel
) -> None:
    good = make_events(model, 6, "good")
    bad_feature = good[0].model_copy(
        update={"transaction_id": "bad-feature", "features": {**good[0].features, "zzz": 1.0}}
    )
    bad_version = good[1].model_copy(
        update={"transaction_id": "bad-version", "model": ModelRef(name="x", version="f" * 64)}
    )
    await embedded.bus.publish(good[0])
    await embedded.bus.publish(bad_feature)
    # Garbage as it could sit in the outbox file (e.g. written by an older release).
    with sqlite3.connect(embedded.outbox) as raw:
        raw.execute(
            "INSERT INTO outbox (transaction_id, payload, enqueued_at) VALUES (?, ?, 0)",
            ("garbage", b"\x00\x01 not an event"),
        )
    await embedded.bus.publish(bad_version)
    for event in good[1:]:
        await embedded.bus.publish(event)

    await _drain(_worker(embedded, ModelRegistry([model]), engine="pred_contribs"))

    for event in good:
        assert await embedded.store.get(event.transaction_id) is not None
    assert await embedded.store.get("bad-feature") is None
    letters = await embedded.bus.dead_letters()
    assert [d.reason for d in letters] == ["malformed", "invalid-features", "unknown-model-version"]
    assert letters[0].payload == b"\x00\x01 not an event"
    assert letters[1].payload == bad_feature.to_bytes()
    assert await embedded.bus.pending() == 0
    assert embedded.metrics.dead_letters.labels(reason="invalid-features")._value.get() == 1


async def test_run_stops_when_asked(embedded: Embedded, model: LoadedModel) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(_worker(embedded, ModelRegistry([model])).run(stop))
    event = make_events(model, 1, "run")[0]
    await embedded.bus.publish(event)
    async with asyncio.timeout(30):
        while True:
            if await embedded.store.get(event.transaction_id) is not None:
                break
            await asyncio.sleep(0.02)
    stop.set()
    async with asyncio.timeout(5):
        await running


async def test_the_first_event_of_an_id_stands_copies_are_skipped_conflicts_dead_lettered(
    embedded: Embedded, model: LoadedModel
) -> None:
    first, other = make_events(model, 2, "first")
    # The same request decided twice (a race across gateways): same decision, later time.
    later_copy = first.model_copy(update={"decided_at": first.decided_at + timedelta(seconds=1)})
    # Another request under the same id, decided differently.
    conflicting = other.model_copy(update={"transaction_id": first.transaction_id})
    worker = _worker(embedded, ModelRegistry([model]), engine="pred_contribs")
    await embedded.bus.publish(first)
    await embedded.bus.publish(later_copy)  # same batch
    await _drain(worker)
    await embedded.bus.publish(first)  # a spool's replay of a copy, in a later batch
    await embedded.bus.publish(conflicting)
    await _drain(worker)

    record = await embedded.store.get(first.transaction_id)
    assert record is not None
    # Stored to the millisecond; the copy was decided a second later.
    assert abs(record.decided_at - first.decided_at) < timedelta(milliseconds=1)
    assert_exact(model, first, record)
    letters = await embedded.bus.dead_letters()
    assert [(d.reason, d.payload) for d in letters] == [
        ("conflicting-transaction-id", conflicting.to_bytes())
    ]
    assert embedded.metrics.explanations.labels(engine="pred_contribs")._value.get() == 1
    assert embedded.metrics.duplicate_events.labels(kind="same")._value.get() == 2
    assert embedded.metrics.duplicate_events.labels(kind="conflict")._value.get() == 1
    assert await embedded.bus.pending() == 0
