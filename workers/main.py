"""Assemble and run one Kafka explainer worker process (used by `shapstream worker`)."""

import asyncio
import logging
import signal

from prometheus_client import start_http_server

from service.adapters.cassandra_store import CassandraStore
from service.adapters.kafka_bus import KafkaSource, ensure_topics
from service.core.registry import ModelRegistry
from service.metrics import create_metrics
from service.settings import Settings
from workers.explainer import ExplainerWorker

log = logging.getLogger(__name__)


def _registry(settings: Settings) -> ModelRegistry:
    # A worker needs no local models: it can load every version it meets from the store.
    if settings.models_dir.is_dir():
        return ModelRegistry.from_settings(settings)
    log.info("no models directory at %s: model versions come from the store", settings.models_dir)
    return ModelRegistry([], cache_size=settings.worker.model_cache)


async def run_worker(
    settings: Settings, *, metrics_port: int | None = None, stop: asyncio.Event | None = None
) -> None:
    """Explain from Kafka into Cassandra until SIGTERM/SIGINT (or `stop`), then leave cleanly.

    On a signal the batch in flight is finished, written and committed before the consumer
    leaves its group; a batch that cannot be written by then stays uncommitted (redelivered).
    """
    stop = stop or asyncio.Event()
    metrics = create_metrics()
    if metrics_port is not None:
        start_http_server(metrics_port, registry=metrics.registry)
        log.info("metrics on http://0.0.0.0:%d/metrics", metrics_port)
    registry = _registry(settings)
    # Before the first consumer: a consumer on a missing topic would auto-create it with the
    # broker's default partition count.
    await ensure_topics(settings.kafka)
    store = await CassandraStore.from_settings(settings)
    try:
        source = await KafkaSource.open(settings.kafka, metrics)
        try:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            worker = ExplainerWorker(source, store, registry, settings.worker, metrics)
            log.info(
                "explaining %s (group %s) into keyspace %s",
                settings.kafka.topic,
                settings.kafka.group_id,
                settings.cassandra.keyspace,
            )
            await worker.run(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().remove_signal_handler(sig)
            await source.close()
    finally:
        await store.close()
    log.info("worker stopped")
