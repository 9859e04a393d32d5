"""Opening and closing what the gateway needs, for Kafka mode or the embedded mode."""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from service.adapters.wiring import GatewayAdapters, open_gateway_adapters
from service.api.deps import AppState
from service.core.breaker import CircuitBreaker, Guard
from service.core.decisions import Decider
from service.core.denials import DenialLog
from service.core.idempotency import RecentIds
from service.core.keys import DevKey, KeyVerifier, ensure_dev_key
from service.core.population.gauges import PopulationGauges
from service.core.registry import ModelRegistry
from service.errors import StoreUnavailable
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_resources(settings: Settings, metrics: Metrics) -> AsyncIterator[AppState]:
    """Registry, store and bus (plus the in-process worker in embedded mode), closed on exit."""
    registry = ModelRegistry.from_settings(settings)
    async with AsyncExitStack() as stack:
        adapters = await stack.enter_async_context(open_gateway_adapters(settings, metrics))
        store = adapters.stores.explanations
        if adapters.in_process_source is not None:
            # The whole service in one process: its one user gets a key on this console, and
            # this process explains its own decisions.
            from workers.explainer import ExplainerWorker

            announce_dev_key(await ensure_dev_key(adapters.stores.access, settings.data_dir))
            population = adapters.stores.population if settings.worker.population else None
            worker = ExplainerWorker(
                adapters.in_process_source,
                store,
                registry,
                settings.worker,
                metrics,
                population=population,
            )
            stack.push_async_callback(_run_in_task(worker.run))
        for model in registry.models():
            # Workers load the exact version an event names from here, on any machine.
            await store.put_model(model.artifact())
            if model.reference is not None:
                await adapters.stores.population.put_reference(model.version, model.reference)
            log.info("serving %s version %s", model.name, model.version)
            metrics.model_info.labels(name=model.name, version=model.version).set(1)
        gauges = PopulationGauges(adapters.stores.population, registry.models(), metrics.population)
        stack.push_async_callback(
            _run_in_task(
                lambda stop: gauges.run(stop, settings.gateway.population_refresh_s),
                "population-gauges",
            )
        )
        state = _state(settings, metrics, registry, adapters)
        # Drained before the store and bus close (the stack unwinds in reverse).
        stack.push_async_callback(state.decider.drain)
        stack.push_async_callback(state.denials.close)
        yield state


def _state(
    settings: Settings, metrics: Metrics, registry: ModelRegistry, adapters: GatewayAdapters
) -> AppState:
    gateway = settings.gateway
    bus, store, access = adapters.bus, adapters.stores.explanations, adapters.stores.access
    breaker = CircuitBreaker(gateway.store_failures_to_open, gateway.store_open_s)
    store_guard = Guard("explanation store", breaker, adapters.store_timeout_s, StoreUnavailable)
    security = settings.security
    keys = KeyVerifier(access, security.key_cache_s, security.key_stale_s, store_guard)
    recent = RecentIds(gateway.recent_ids, gateway.recent_ids_ttl_s)
    decider = Decider(
        registry, bus, store, store_guard, recent, metrics, gateway.decision_timeout_s
    )
    denials = DenialLog(access, metrics.denials)
    return AppState(
        settings,
        registry,
        bus,
        store,
        metrics,
        access,
        keys,
        decider,
        store_guard,
        denials,
        adapters.stores.population,
    )


def _run_in_task(
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    name: str = "embedded-explainer",
) -> Callable[[], Awaitable[None]]:
    """Run the embedded worker (or another loop) in a task; the function returned stops it and
    waits for it."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop), name=name)
    if name == "embedded-explainer":
        task.add_done_callback(_report_stopped_worker)

    async def stop_worker() -> None:
        stop.set()
        await task

    return stop_worker


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
