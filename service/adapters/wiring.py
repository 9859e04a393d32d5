"""The one place that chooses the adapters: `settings.mode` names them, every caller asks here.

kafka     Cassandra holds the explanations, API keys and access log; the gateway publishes to
          Kafka through its local spool, and workers are processes of their own that consume
          Kafka in a consumer group.
embedded  One SQLite file holds the stores; the gateway publishes to an outbox on disk, which
          a worker in the same process consumes.

The adapters' modules are imported only once chosen: a process of one mode never loads the
other mode's drivers.
"""

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from service.core.ports import (
    AccessStore,
    EventBus,
    EventSource,
    ExplanationStore,
    PopulationStore,
)
from service.core.records import DecisionRecord
from service.settings import Settings

if TYPE_CHECKING:
    from service.metrics import Metrics

# How long a call to the embedded store may take before it counts as stalled: the store is a
# local file, so only a disk that stopped answering takes this long.
EMBEDDED_STORE_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Stores:
    """The explanation store, and the access and population stores on its connection."""

    explanations: ExplanationStore
    access: AccessStore
    population: PopulationStore


@dataclass(frozen=True, slots=True)
class GatewayAdapters:
    """What a gateway stores in and publishes to."""

    stores: Stores
    bus: EventBus
    # The seconds a store call may take before the gateway counts it as stalled.
    store_timeout_s: float
    # Embedded mode, the whole service in one process: the outbox behind `bus`, for the worker
    # of this process to consume. None in Kafka mode, whose workers run apart.
    in_process_source: EventSource | None


@dataclass(frozen=True, slots=True)
class WorkerAdapters:
    """What a worker process consumes from and writes to."""

    store: ExplanationStore
    population: PopulationStore
    source: EventSource
    # Whether the consumer is a member of its group now (the worker's readiness).
    in_group: Callable[[], bool]


def embedded_store_exists(settings: Settings) -> bool:
    """Whether `settings.data_dir` holds an embedded store (as once `shapstream run` started)."""
    from service.adapters.sqlite_store import DB_FILE

    return (settings.data_dir / DB_FILE).is_file()


def describe_stores(settings: Settings) -> str:
    """The stores `settings` name, in a few words."""
    if settings.mode == "kafka":
        cassandra = settings.cassandra
        return f"Cassandra at {cassandra.hosts}, keyspace {cassandra.keyspace}"
    return f"the embedded store in {settings.data_dir}"


@asynccontextmanager
async def open_stores(settings: Settings) -> AsyncIterator[Stores]:
    """Cassandra (kafka mode) or the SQLite file in `data_dir`, schema ensured, closed on exit."""
    async with AsyncExitStack() as stack:
        if settings.mode == "kafka":
            from service.adapters.cassandra_access import CassandraAccessStore
            from service.adapters.cassandra_population import CassandraPopulationStore
            from service.adapters.cassandra_store import CassandraStore

            cassandra = await CassandraStore.from_settings(settings)
            stack.push_async_callback(cassandra.close)
            await cassandra.migrate()
            stores = Stores(
                cassandra, CassandraAccessStore(cassandra), CassandraPopulationStore(cassandra)
            )
        else:
            from service.adapters.sqlite_access import SqliteAccessStore
            from service.adapters.sqlite_population import SqlitePopulationStore
            from service.adapters.sqlite_store import SqliteStore

            sqlite = await SqliteStore.from_settings(settings)
            stack.push_async_callback(sqlite.close)
            await sqlite.migrate()
            stores = Stores(sqlite, SqliteAccessStore(sqlite), SqlitePopulationStore(sqlite))
        await stores.access.migrate()
        await stores.population.migrate()
        yield stores


@asynccontextmanager
async def open_gateway_adapters(
    settings: Settings, metrics: "Metrics"
) -> AsyncIterator[GatewayAdapters]:
    """The stores (schema ensured) and the bus of a gateway; the bus is closed first on exit."""
    async with AsyncExitStack() as stack:
        stores = await stack.enter_async_context(open_stores(settings))
        if settings.mode == "kafka":
            bus = await _open_spooled_kafka(settings, metrics)
            stack.push_async_callback(bus.close)
            yield GatewayAdapters(stores, bus, settings.cassandra.fast_timeout_s, None)
        else:
            from service.adapters.local_bus import open_local_bus

            outbox = await open_local_bus(settings, metrics)
            stack.push_async_callback(outbox.close)
            yield GatewayAdapters(stores, outbox, EMBEDDED_STORE_TIMEOUT_S, outbox)


async def _open_spooled_kafka(settings: Settings, metrics: "Metrics") -> EventBus:
    from service.adapters.kafka_bus import KafkaBus, ensure_topics
    from service.adapters.spool import SpooledKafkaBus

    await ensure_topics(settings.kafka)
    kafka = await KafkaBus.open(settings.kafka)
    try:
        return await SpooledKafkaBus.open(
            kafka, settings.kafka, settings.spool, settings.spool_dir, metrics
        )
    except BaseException:
        await kafka.close()
        raise


@asynccontextmanager
async def open_worker_adapters(
    settings: Settings, metrics: "Metrics"
) -> AsyncIterator[WorkerAdapters]:
    """The explanation store and the Kafka consumer of a worker process, closed on exit.

    Kafka mode only: the embedded mode's worker runs inside the gateway's process, on
    `GatewayAdapters.in_process_source`. The schema is not ensured here: a worker started
    before `shapstream db migrate` waits for it (writes retried as an outage).
    """
    if settings.mode != "kafka":
        raise ValueError(
            "a worker process needs SHAPSTREAM_MODE=kafka: the embedded mode's worker runs "
            "inside `shapstream run`"
        )
    from service.adapters.cassandra_population import CassandraPopulationStore
    from service.adapters.cassandra_store import CassandraStore
    from service.adapters.kafka_bus import KafkaSource, ensure_topics

    # Before the first consumer: a consumer on a missing topic would auto-create it with the
    # broker's default partition count.
    await ensure_topics(settings.kafka)
    async with AsyncExitStack() as stack:
        store = await CassandraStore.from_settings(settings)
        stack.push_async_callback(store.close)
        source = await KafkaSource.open(settings.kafka, metrics)
        stack.push_async_callback(source.close)
        population = CassandraPopulationStore(store)
        yield WorkerAdapters(store, population, source, source.in_group)


ScanProgress = tuple[Callable[[DecisionRecord], int], int]


def scan_progress(
    settings: Settings, versions: Sequence[str], start: datetime, end: datetime
) -> ScanProgress:
    """Where a record stands in the store's scan of `versions` over [start, end), and the end
    of that scale (for a progress bar).

    Cassandra reads (version, day, bucket) partitions in order, and a record's bucket follows
    from its transaction id; SQLite reads each version in time order.
    """
    from service.adapters.record_codec import to_epoch_ms

    index = {version: position for position, version in enumerate(versions)}
    start_ms, end_ms = to_epoch_ms(start), to_epoch_ms(end)
    if settings.mode == "kafka":
        from service.adapters.cassandra_store import day_bucket
        from service.adapters.record_codec import utc_days

        days = {day: position for position, day in enumerate(utc_days(start_ms, end_ms))}
        buckets = settings.cassandra.day_buckets

        def partition(record: DecisionRecord) -> int:
            day = days[record.decided_at.astimezone(UTC).date()]
            bucket = day_bucket(record.transaction_id, buckets)
            return (index[record.model.version] * len(days) + day) * buckets + bucket + 1

        return partition, max(len(index) * len(days) * buckets, 1)
    span = end_ms - start_ms

    def moment(record: DecisionRecord) -> int:
        return index[record.model.version] * span + to_epoch_ms(record.decided_at) - start_ms

    return moment, max(len(index) * span, 1)
