"""Deciding once per caller transaction id without a consensus round, on the embedded adapters.

Two `Decider`s over one store and one bus stand for two gateway processes (or one restarted).
"""

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from service.adapters.local_bus import OUTBOX_FILE, LocalBus
from service.adapters.sqlite_store import SqliteStore
from service.core.breaker import CircuitBreaker, Guard
from service.core.decisions import Decider
from service.core.idempotency import RecentIds
from service.core.registry import LoadedModel, ModelRegistry
from service.errors import Conflict, InvalidRequest, Overloaded, StoreUnavailable
from service.metrics import Metrics, create_metrics
from service.settings import WorkerSettings
from tests.api_client import MODELS, german_rows
from tests.worker_model import train_small_model
from workers.explainer import ExplainerWorker

ROWS = german_rows(3)


@dataclass
class Gateway:
    bus: LocalBus
    store: SqliteStore
    metrics: Metrics
    registry: ModelRegistry
    outbox: Path

    def decider(self, *, timeout_s: float = 5.0, store_timeout_s: float = 5.0) -> Decider:
        """A gateway process: its own memory of ids and its own breaker, shared store and bus."""
        guard = Guard("store", CircuitBreaker(3, 30.0), store_timeout_s, StoreUnavailable)
        recent = RecentIds(capacity=100, ttl_s=60.0)
        return Decider(self.registry, self.bus, self.store, guard, recent, self.metrics, timeout_s)

    async def published(self) -> int:
        """Events in the bus, not yet taken by a worker."""
        return await self.bus.pending()

    async def explain(self) -> None:
        """Run a worker until the bus is empty: records and claims are written."""
        settings = WorkerSettings(batch_max=64, batch_timeout_ms=10, engine="pred_contribs")
        worker = ExplainerWorker(self.bus, self.store, self.registry, settings, self.metrics)
        while await worker.process_once():
            pass

    def count(self, metric: str, **labels: str) -> float:
        value: float = getattr(self.metrics, metric).labels(**labels)._value.get()
        return value


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry([LoadedModel.from_directory(MODELS / "german-credit")])


@pytest.fixture
async def gateway(tmp_path: Path, registry: ModelRegistry) -> AsyncIterator[Gateway]:
    metrics = create_metrics()
    bus = await LocalBus.open(tmp_path / OUTBOX_FILE, metrics)
    store = await SqliteStore.open(tmp_path / "store.sqlite3", timedelta(days=800))
    await store.migrate()
    try:
        yield Gateway(bus, store, metrics, registry, tmp_path / OUTBOX_FILE)
    finally:
        await bus.close()
        await store.close()


async def test_a_repeat_is_answered_from_memory_with_no_new_event(gateway: Gateway) -> None:
    decider = gateway.decider()
    first = await decider.decide(ROWS[0], None, "loan-1")
    again = await decider.decide(ROWS[0], None, "loan-1")
    assert again == first
    assert orjson.loads(first)["transaction_id"] == "loan-1"
    assert await gateway.published() == 1
    assert gateway.count("idempotent_replays", source="memory") == 1


async def test_a_repeat_at_another_gateway_is_answered_from_the_claim(gateway: Gateway) -> None:
    first = await gateway.decider().decide(ROWS[0], None, "loan-1")
    await gateway.explain()  # the worker writes the record and the id's claim
    elsewhere = await gateway.decider().decide(ROWS[0], None, "loan-1")
    assert elsewhere == first  # byte for byte, rebuilt by the worker from the event
    assert await gateway.published() == 0
    assert gateway.count("idempotent_replays", source="store") == 1


async def test_another_request_under_a_used_id_is_a_conflict(gateway: Gateway) -> None:
    decider = gateway.decider()
    await decider.decide(ROWS[0], None, "loan-1")
    await gateway.explain()
    with pytest.raises(Conflict):
        await decider.decide(ROWS[1], None, "loan-1")
    with pytest.raises(Conflict):
        await gateway.decider().decide(ROWS[1], None, "loan-1")
    with pytest.raises(Conflict):
        await decider.decide(ROWS[0], "german-credit", "loan-1")  # the model named: not the same
    assert await gateway.published() == 0


async def test_concurrent_requests_with_one_id_make_one_decision(gateway: Gateway) -> None:
    decider = gateway.decider()
    answers = await asyncio.gather(*(decider.decide(ROWS[0], None, "loan-1") for _ in range(10)))
    assert len(set(answers)) == 1
    assert await gateway.published() == 1


async def test_the_race_across_gateways_gives_one_answer_and_stores_one_decision(
    gateway: Gateway,
) -> None:
    # Two gateways take the same request before either decision reached the worker: both
    # decide, with identical answers; the worker keeps the first event and skips the copy.
    one, other = gateway.decider(), gateway.decider()
    answers = await asyncio.gather(
        one.decide(ROWS[0], None, "loan-1"), other.decide(ROWS[0], None, "loan-1")
    )
    assert answers[0] == answers[1]
    assert await gateway.published() == 2
    await gateway.explain()
    assert gateway.count("explanations", engine="pred_contribs") == 1
    assert gateway.count("duplicate_events", kind="same") == 1


async def test_ids_the_gateway_makes_are_new_each_time(gateway: Gateway) -> None:
    decider = gateway.decider()
    answers = [orjson.loads(await decider.decide(ROWS[0], None, None)) for _ in range(3)]
    assert len({a["transaction_id"] for a in answers}) == 3
    assert await gateway.published() == 3


async def _occupy(store: SqliteStore, seconds: float) -> "asyncio.Future[None]":
    """Keep the store's only thread busy, as a stalled disk would."""
    busy = threading.Event()

    def stall(_: sqlite3.Connection) -> None:
        busy.set()
        time.sleep(seconds)

    stalled = asyncio.ensure_future(store.run_with_connection(stall))
    await asyncio.to_thread(busy.wait)
    return stalled


async def test_a_stalled_store_is_a_fast_503_naming_the_transaction(gateway: Gateway) -> None:
    decider = gateway.decider(store_timeout_s=0.05)
    stall = await _occupy(gateway.store, 1.0)
    for n in range(3):
        with pytest.raises(StoreUnavailable) as refused:
            await decider.decide(ROWS[0], None, f"loan-{n}")
        assert refused.value.extra["transaction_id"] == f"loan-{n}"
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable) as refused:
        await decider.decide(ROWS[0], None, "loan-9")  # the breaker is open now
    assert time.perf_counter() - started < 0.02
    assert int(refused.value.response_headers()["Retry-After"]) >= 1
    await stall
    assert await gateway.published() == 0  # nothing was decided


async def test_past_its_deadline_a_decision_is_a_503_and_its_retry_is_the_same_decision(
    gateway: Gateway,
) -> None:
    decider = gateway.decider(timeout_s=0.2)
    # Another connection holds the outbox's write lock: publishing waits for it.
    holder = sqlite3.connect(gateway.outbox, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Overloaded) as late:
            await decider.decide(ROWS[0], None, "loan-1")
        assert late.value.extra["transaction_id"] == "loan-1"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The late publish still lands; the retry decides again, with the same answer, and the
    # worker stores the first of the two events only.
    again = await decider.decide(ROWS[0], None, "loan-1")
    assert orjson.loads(again)["transaction_id"] == "loan-1"
    await gateway.explain()
    stored = await gateway.store.find_claims(["loan-1"])
    assert stored["loan-1"].response == again
    assert gateway.count("explanations", engine="pred_contribs") == 1


async def test_a_retry_resolves_to_the_model_that_decided_it(
    gateway: Gateway, tmp_path: Path
) -> None:
    # Decided by the default model; then another model is added and made the default: the
    # request is invalid for it (other features), yet its retry gets its stored answer.
    first = await gateway.decider().decide(ROWS[0], None, "loan-1")
    await gateway.explain()
    other = train_small_model(tmp_path / "other")
    german = gateway.registry.active()
    gateway.registry = ModelRegistry([german, other], default_model=other.name)
    assert await gateway.decider().decide(ROWS[0], None, "loan-1") == first
    with pytest.raises(Conflict):
        await gateway.decider().decide(ROWS[1], None, "loan-1")
    with pytest.raises(InvalidRequest):  # a new id gets the new default's verdict
        await gateway.decider().decide(ROWS[0], None, "loan-2")
    assert gateway.count("idempotent_replays", source="store") == 1
