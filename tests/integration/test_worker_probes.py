"""A worker's /healthz, /readyz and lag gauges, on real Kafka and Cassandra over real HTTP.

The worker reaches Cassandra through a TCP forwarder the test can cut: its connections are
reset and its port refuses new ones, as when the node goes away, while the test itself keeps
reading the store directly. (A worker pointed at a closed port from the start could not even
start; a missing table is a schema error, not an outage.)
"""

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from cassandra.cluster import Session
from prometheus_client.parser import text_string_to_metric_families

from service.adapters.cassandra_population import CassandraPopulationStore
from service.adapters.cassandra_store import CassandraStore, build_cluster
from service.adapters.kafka_bus import KafkaBus, ensure_topics
from service.core.records import DecisionEvent
from service.core.registry import LoadedModel
from service.metrics import package_version
from service.settings import CassandraSettings, KafkaSettings, Settings, WorkerSettings
from tests.polling import until
from tests.worker_model import demo_or_small_model, make_events
from workers.main import run_worker

RETENTION = timedelta(days=30)
FLOW_TIMEOUT_S = 60.0
POLL_S = 0.05


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    await until(check, FLOW_TIMEOUT_S, POLL_S)


class CuttableForwarder:
    """Forwards TCP connections from a local port to `target` until `cut`, again after `restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            self._handlers.discard(task)
            return
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for transport in pair:
                transport.abort()
            self._transports -= pair
            self._handlers.discard(task)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        assert self._server is not None
        self._server.close()
        for transport in list(self._transports):
            transport.abort()
        await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def restore(self) -> None:
        await self.start()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.transport.abort()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return demo_or_small_model(tmp_path_factory.mktemp("model"))


def _hosts(contact: list[tuple[str, int]]) -> str:
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in contact)


@pytest.fixture
def names(cassandra_contact: list[tuple[str, int]]) -> Iterator[str]:
    """A fresh name for this test's topics, group and keyspace; the keyspace is dropped after."""
    name = uuid.uuid4().hex[:12]
    yield name
    cluster = build_cluster(CassandraSettings(hosts=_hosts(cassandra_contact)))
    session: Session = cluster.connect()
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS test_probes_{name}", timeout=120)
    finally:
        cluster.shutdown()


@pytest.fixture
async def forwarder(cassandra_contact: list[tuple[str, int]]) -> AsyncIterator[CuttableForwarder]:
    opened = CuttableForwarder(cassandra_contact[0])
    await opened.start()
    try:
        yield opened
    finally:
        await opened.cut()


# ---------------------------------------------------------------- helpers


async def _publish_at_once(kafka: KafkaSettings, events: list[DecisionEvent]) -> None:
    """All `events` in one record batch: they land in the log together, in one append."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        batch = producer.create_batch()
        for event in events:
            batch.append(key=event.transaction_id.encode(), value=event.to_bytes(), timestamp=None)
        await (await producer.send_batch(batch, kafka.topic, partition=0))
    finally:
        await producer.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _samples(client: httpx.AsyncClient) -> dict[str, float]:
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


# ---------------------------------------------------------------- the test


async def test_probes_and_lag_through_a_store_outage(
    kafka_bootstrap: str,
    cassandra_contact: list[tuple[str, int]],
    forwarder: CuttableForwarder,
    names: str,
    model: LoadedModel,
    tmp_path: Path,
) -> None:
    kafka = KafkaSettings(
        bootstrap=kafka_bootstrap,
        topic=f"test-probes-{names}",
        dead_letter_topic=f"test-probes-{names}.dlq",
        group_id=f"test-probes-{names}",
        # One partition, so "behind" is a plain count of events.
        partitions=1,
        publish_timeout_s=10.0,
    )
    keyspace = f"test_probes_{names}"
    direct = CassandraSettings(hosts=_hosts(cassandra_contact), keyspace=keyspace)
    store = await CassandraStore.connect(direct, RETENTION)
    # As `shapstream db migrate` does: the worker keeps population aggregates too.
    await store.migrate()
    await CassandraPopulationStore(store).migrate()
    # The worker has no models directory: it loads the version from the store.
    await store.put_model(model.artifact())
    await ensure_topics(kafka)

    settings = Settings(
        mode="kafka",
        models_dir=tmp_path / "no-models",
        kafka=kafka,
        cassandra=direct.model_copy(update={"hosts": f"127.0.0.1:{forwarder.port}"}),
        # One event per batch: the events behind the one in flight are counted as lag.
        worker=WorkerSettings(batch_max=1, batch_timeout_ms=50),
    )
    port = _free_port()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, metrics_port=port, stop=stop))
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0)
    try:

        async def ready() -> bool:
            assert not worker.done(), worker
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False  # not listening yet

        await _until(ready)
        assert (await client.get("/healthz")).json()["status"] == "alive"

        [first, *behind] = make_events(model, 4, "probes")
        bus = await KafkaBus.open(kafka)
        try:
            await bus.publish(first)
        finally:
            await bus.close()

        async def caught_up() -> bool:
            samples = await _samples(client)
            lag = samples["shapstream_worker_lag_events"], samples["shapstream_worker_lag_seconds"]
            return lag == (0, 0) and await store.get(first.transaction_id) is not None

        await _until(caught_up)
        # What the worker runs and explains with, for a dashboard to join on.
        exposition = (await client.get("/metrics")).text
        assert f'shapstream_build_info{{version="{package_version()}"}} 1.0' in exposition
        info = f'shapstream_model_info{{name="{model.name}",version="{model.version}"}} 1.0'
        assert info in exposition

        # Cassandra goes away for the worker; three events arrive meanwhile.
        await forwarder.cut()
        await _publish_at_once(kafka, behind)

        async def store_failing() -> bool:
            return (await client.get("/readyz")).status_code == 503

        await _until(store_failing)
        body = (await client.get("/readyz")).json()
        assert body["status"] == "not ready"
        [problem] = body["problems"]
        assert (problem["check"], problem["step"]) == ("store", "writing to the store")
        assert "Cassandra" in problem["detail"]
        # Retrying is progress: the worker is alive, only not ready. No restart would help.
        assert (await client.get("/healthz")).status_code == 200

        before = await _samples(client)
        assert before["shapstream_worker_ready"] == 0
        # The first of the three is in flight (not written); the two others wait behind it.
        assert before["shapstream_worker_lag_events"] == 2
        assert before["shapstream_worker_lag_seconds"] > 0

        async def growing() -> bool:
            now = await _samples(client)
            return now["shapstream_worker_lag_seconds"] > before["shapstream_worker_lag_seconds"]

        await _until(growing)

        # Cassandra is back: the batch is written, the backlog drained, the worker ready.
        await forwarder.restore()
        await _until(ready)
        await _until(caught_up)
        for event in behind:
            assert await store.get(event.transaction_id) is not None
        assert (await _samples(client))["shapstream_worker_ready"] == 1
    finally:
        stop.set()
        await client.aclose()
        await worker
        await store.close()
