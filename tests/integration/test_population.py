"""Population aggregates on real Kafka and Cassandra: a worker that dies between writing a batch
(records and aggregates) and committing it, and its successor that is handed the same offsets
again, count every decision exactly once."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from cassandra.cluster import Session

from service.adapters.cassandra_population import CassandraPopulationStore
from service.adapters.cassandra_store import CassandraStore, build_cluster
from service.adapters.kafka_bus import KafkaBus, KafkaSource, ensure_topics
from service.core.population import report
from service.core.population.aggregates import Aggregate, Edges
from service.core.ports import ConsumedBatch, EventSource
from service.core.records import DecisionEvent, DecisionRecord
from service.core.registry import LoadedModel, ModelRegistry
from service.metrics import create_metrics
from service.settings import CassandraSettings, KafkaSettings, WorkerSettings
from tests.polling import until
from tests.worker_model import demo_or_small_model, make_events
from workers.explainer import Backoff, ExplainerWorker

RETENTION = timedelta(days=30)
EVENTS = 60
TIMEOUT_S = 120.0


class Crash(Exception):
    """The worker dies: after writing a batch, before committing it."""


class _DyingBatch:
    def __init__(self, batch: ConsumedBatch) -> None:
        self._batch = batch

    @property
    def payloads(self) -> Sequence[bytes]:
        return self._batch.payloads

    @property
    def positions(self) -> Sequence[tuple[str, int]]:
        return self._batch.positions

    async def commit(self) -> None:
        raise Crash


class DiesBeforeCommit:
    """A real Kafka source whose `survive`+1-th batch is written but never committed."""

    def __init__(self, source: KafkaSource, survive: int) -> None:
        self._source = source
        self._left = survive

    async def next_batch(self, max_events: int, timeout_s: float) -> ConsumedBatch | None:
        batch = await self._source.next_batch(max_events, timeout_s)
        if batch is None:
            return None
        if self._left == 0:
            return _DyingBatch(batch)
        self._left -= 1
        return batch

    async def dead_letter(self, payload: bytes, reason: str) -> None:
        await self._source.dead_letter(payload, reason)

    async def close(self) -> None:
        await self._source.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return demo_or_small_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def settings(
    kafka_bootstrap: str, cassandra_contact: list[tuple[str, int]]
) -> Iterator[tuple[KafkaSettings, CassandraSettings]]:
    name = uuid.uuid4().hex[:12]
    hosts = ",".join(f"{h}:{p}" for h, p in cassandra_contact)
    cassandra = CassandraSettings(hosts=hosts, keyspace=f"test_population_{name}")
    kafka = KafkaSettings(
        bootstrap=kafka_bootstrap,
        topic=f"test-population-{name}",
        dead_letter_topic=f"test-population-{name}.dlq",
        group_id=f"test-population-{name}",
        partitions=2,
    )
    yield kafka, cassandra
    cluster = build_cluster(cassandra)
    session: Session = cluster.connect()
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {cassandra.keyspace}", timeout=120)
    finally:
        cluster.shutdown()


@pytest.fixture
async def store(
    settings: tuple[KafkaSettings, CassandraSettings], model: LoadedModel
) -> AsyncIterator[CassandraStore]:
    opened = await CassandraStore.connect(settings[1], RETENTION)
    try:
        await opened.migrate()
        await opened.put_model(model.artifact())
        yield opened
    finally:
        await opened.close()


def _worker(source: EventSource, store: CassandraStore, model: LoadedModel) -> ExplainerWorker:
    return ExplainerWorker(
        source,
        store,
        ModelRegistry([model]),
        WorkerSettings(batch_max=8, batch_timeout_ms=50),
        create_metrics(),
        backoff=Backoff(first_s=0.1, cap_s=0.5),
        population=CassandraPopulationStore(store),
    )


async def _publish(kafka: KafkaSettings, events: list[DecisionEvent]) -> None:
    bus = await KafkaBus.open(kafka)
    try:
        for event in events:
            await bus.publish(event)
    finally:
        await bus.close()


async def _counted(population: CassandraPopulationStore, model: LoadedModel) -> Aggregate | None:
    today = datetime.now(UTC).date()
    days = await report.daily(population, model.version, [today - timedelta(days=1), today])
    aggregates = list(days.values())
    return aggregates[0] if len(aggregates) == 1 else None


async def _until_crash(worker: ExplainerWorker) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            try:
                await worker.process_once()
            except Crash:
                return


async def _committed(kafka: KafkaSettings) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(kafka.group_id)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def _all_stored(store: CassandraStore, ids: list[str]) -> list[DecisionRecord]:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            found = await asyncio.gather(*(store.get(txn) for txn in ids))
            records = [r for r in found if r is not None]
            if len(records) == len(ids):
                return records
            await asyncio.sleep(0.2)


async def test_a_batch_redelivered_after_a_crash_is_counted_once(
    settings: tuple[KafkaSettings, CassandraSettings], store: CassandraStore, model: LoadedModel
) -> None:
    kafka, _ = settings
    await ensure_topics(kafka)
    events = make_events(model, EVENTS, f"population-{uuid.uuid4().hex[:6]}")
    await _publish(kafka, events)
    population = CassandraPopulationStore(store)
    await population.migrate()

    # The first worker writes two batches' records and aggregates, commits one, and dies.
    first = DiesBeforeCommit(await KafkaSource.open(kafka, create_metrics()), survive=1)
    dying = _worker(first, store, model)
    try:
        await _until_crash(dying)
    finally:
        await first.close()
    before = await _counted(population, model)
    assert before is not None, "the dying worker wrote no aggregate: the test proves nothing"
    # Some of what it counted is uncommitted: the successor is handed it again.
    assert sum((await _committed(kafka)).values()) < before.count

    # Its successor is handed the uncommitted batch again, then the rest.
    source = await KafkaSource.open(kafka, create_metrics())
    successor = _worker(source, store, model)
    stop = asyncio.Event()
    running = asyncio.create_task(successor.run(stop))
    try:
        records = await _all_stored(store, [e.transaction_id for e in events])

        async def complete() -> bool:
            counted = await _counted(population, model)
            return counted is not None and counted.count >= EVENTS

        await until(complete, TIMEOUT_S, 0.2)
    finally:
        stop.set()
        await running
        await source.close()

    counted = await _counted(population, model)
    assert counted is not None
    reference = await population.get_reference(model.version)
    assert reference is None
    expected = Aggregate.of_records(records, model.schema, Edges.default(model.schema))
    assert counted.count == EVENTS
    assert (counted.hist == expected.hist).all()
    assert (counted.inputs == expected.inputs).all()
    assert counted.outcomes == expected.outcomes
    assert counted.reasons == expected.reasons
    assert abs(counted.abs_sum - expected.abs_sum).max() < 1e-9
    assert abs(counted.sq_sum - expected.sq_sum).max() < 1e-9
