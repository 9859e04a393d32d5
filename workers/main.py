"""Assemble and run one Kafka explainer worker process (used by `shapstream worker`)."""

import asyncio
import logging
import signal
from contextlib import AsyncExitStack

from service.adapters.wiring import open_worker_adapters
from service.core.registry import ModelRegistry
from service.metrics import Metrics, create_metrics, create_worker_probe_metrics
from service.settings import Settings
from workers.explainer import ExplainerWorker
from workers.health import WorkerHealth
from workers.probes import bind, create_probe_app, serving

log = logging.getLogger(__name__)


def _registry(settings: Settings) -> ModelRegistry:
    # A worker needs no local models: it can load every version it meets from the store.
    if settings.models_dir.is_dir():
        return ModelRegistry.from_settings(settings)
    log.info("no models directory at %s: model versions come from the store", settings.models_dir)
    return ModelRegistry([], cache_size=settings.worker.model_cache)


def _expose(health: WorkerHealth, metrics: Metrics) -> None:
    probes = create_worker_probe_metrics(metrics.registry)
    probes.ready.set_function(lambda: float(health.readiness().ok))
    probes.progress_age_seconds.set_function(health.seconds_since_progress)


async def run_worker(
    settings: Settings, *, metrics_port: int | None = None, stop: asyncio.Event | None = None
) -> None:
    """Explain from Kafka into Cassandra until SIGTERM/SIGINT (or `stop`), then leave cleanly.

    On a signal the batch in flight is finished, written and committed before the consumer
    leaves its group; a batch that cannot be written by then stays uncommitted (redelivered).
    With `metrics_port`, GET /metrics, /healthz and /readyz are served on it from the start
    (liveness counts the start-up as progress; readiness waits for the group).
    """
    stop = stop or asyncio.Event()
    metrics = create_metrics()
    health = WorkerHealth(settings.worker.stall_after_s)
    _expose(health, metrics)
    async with AsyncExitStack() as stack:
        if metrics_port is not None:
            sock = bind(metrics_port)
            await stack.enter_async_context(
                serving(create_probe_app(health, metrics.registry), sock)
            )
        registry = _registry(settings)
        adapters = await stack.enter_async_context(open_worker_adapters(settings, metrics))
        health.consumer_started(adapters.in_group)
        stack.callback(health.consumer_stopped)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        population = adapters.population if settings.worker.population else None
        worker = ExplainerWorker(
            adapters.source,
            adapters.store,
            registry,
            settings.worker,
            metrics,
            health=health,
            population=population,
        )
        log.info(
            "explaining %s (group %s) into keyspace %s",
            settings.kafka.topic,
            settings.kafka.group_id,
            settings.cassandra.keyspace,
        )
        await worker.run(stop)
    log.info("worker stopped")
