"""Opening and closing what the gateway needs, for Kafka mode or the embedded mode."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from service.api.deps import AppState
from service.core.breaker import CircuitBreaker, Guard
from service.core.decisions import Decider
from service.core.denials import DenialLog
from service.core.idempotency import RecentIds
from service.core.keys import DevKey, KeyVerifier, ensure_dev_key
from service.core.registry import ModelRegistry
from service.errors import StoreUnavailable
from service.metrics import Metrics
from service.ports import AccessStore, EventBus, ExplanationStore
from service.settings import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_resources(settings: Settings, metrics: Metrics) -> AsyncIterator[AppState]:
    """Registry, store and bus (plus the in-process worker in embedded mode), closed on exit."""
    registry = ModelRegistry.from_settings(settings)
    async with AsyncExitStack() as stack:
        if settings.mode == "kafka":
            bus, store, access = await _open_kafka_mode(settings, metrics, stack)
        else:
            bus, store, access = await _open_embedded_mode(settings, metrics, registry, stack)
        for model in registry.models():
            # Workers load the exact version an event names from here, on any machine.
            await store.put_model(model.artifact())
            log.info("serving %s version %s", model.name, model.version)
            metrics.model_info.labels(name=model.name, version=model.version).set(1)
        state = _state(settings, metrics, registry, bus, store, access)
        # Drained before the store and bus close (the stack unwinds in reverse).
        stack.push_async_callback(state.decider.drain)
        stack.push_async_callback(state.denials.close)
        yield state


def _state(
    settings: Settings,
    metrics: Metrics,
    registry: ModelRegistry,
    bus: EventBus,
    store: ExplanationStore,
    access: AccessStore,
) -> AppState:
    gateway = settings.gateway
    # The embedded store is a local file: only a disk that stopped answering is "stalled".
    timeout_s = settings.cassandra.fast_timeout_s if settings.mode == "kafka" else 5.0
    breaker = CircuitBreaker(gateway.store_failures_to_open, gateway.store_open_s)
    store_guard = Guard("explanation store", breaker, timeout_s, StoreUnavailable)
    security = settings.security
    keys = KeyVerifier(access, security.key_cache_s, security.key_stale_s, store_guard)
    recent = RecentIds(gateway.recent_ids, gateway.recent_ids_ttl_s)
    decider = Decider(
        registry, bus, store, store_guard, recent, metrics, gateway.decision_timeout_s
    )
    denials = DenialLog(access, metrics.denials)
    return AppState(
        settings, registry, bus, store, metrics, access, keys, decider, store_guard, denials
    )


async def _open_kafka_mode(
    settings: Settings, metrics: Metrics, stack: AsyncExitStack
) -> tuple[EventBus, ExplanationStore, AccessStore]:
    from service.adapters.cassandra_access import CassandraAccessStore
    from service.adapters.cassandra_store import CassandraStore
    from service.adapters.kafka_bus import KafkaBus, ensure_topics
    from service.adapters.spool import SpooledKafkaBus

    store = await CassandraStore.from_settings(settings)
    stack.push_async_callback(store.close)
    await store.migrate()
    access = CassandraAccessStore(store)
    await access.migrate()
    await ensure_topics(settings.kafka)
    kafka = await KafkaBus.open(settings.kafka)
    try:
        bus = await SpooledKafkaBus.open(
            kafka, settings.kafka, settings.spool, settings.spool_dir, metrics
        )
    except BaseException:
        await kafka.close()
        raise
    stack.push_async_callback(bus.close)
    return bus, store, access


async def _open_embedded_mode(
    settings: Settings, metrics: Metrics, registry: ModelRegistry, stack: AsyncExitStack
) -> tuple[EventBus, ExplanationStore, AccessStore]:
    from service.adapters.local_bus import open_local_bus
    from service.adapters.sqlite_access import SqliteAccessStore
    from service.adapters.sqlite_store import SqliteStore
    from workers.explainer import ExplainerWorker

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = await SqliteStore.from_settings(settings)
    stack.push_async_callback(store.close)
    await store.migrate()
    access = SqliteAccessStore(store)
    await access.migrate()
    announce_dev_key(await ensure_dev_key(access, settings.data_dir))
    bus = await open_local_bus(settings, metrics)
    stack.push_async_callback(bus.close)
    worker = ExplainerWorker(bus, store, registry, settings.worker, metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop), name="embedded-explainer")
    task.add_done_callback(_report_stopped_worker)

    async def stop_worker() -> None:
        stop.set()
        await task

    stack.push_async_callback(stop_worker)
    return bus, store, access


def _report_stopped_worker(task: "asyncio.Task[None]") -> None:
    # A bug stops the worker (it retries outages only): decisions would go on piling up in
    # the outbox unexplained, so say it loudly; the outbox keeps them for the next start.
    if not task.cancelled() and (error := task.exception()) is not None:
        log.critical(
            "the embedded worker stopped; decisions are kept in the outbox but no longer "
            "explained until a restart",
            exc_info=error,
        )


def announce_dev_key(dev_key: DevKey) -> None:
    """Show the development key on the console, once; later starts say where it is."""
    # print, not log: log lines may be shipped and kept elsewhere, and a key never goes there.
    # The console of the single-process demo is the one place its owner looks.
    if dev_key.new_key is not None:
        print(
            f"Development API key (all scopes; shown once, kept in {dev_key.path}):\n"
            f"  {dev_key.new_key}",
            flush=True,
        )
    else:
        print(f"Development API key in {dev_key.path}", flush=True)
