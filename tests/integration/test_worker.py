"""The explainer worker on real Kafka, real Cassandra and a real XGBoost model.

Covers: exact explanations (equal to xgboost's own `pred_contribs`), poison events reaching the
dead-letter topic without blocking their partition, a store outage retried without committing,
and a worker process killed with SIGKILL mid-stream.
"""

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from cassandra.cluster import Session

from service.adapters.cassandra_population import CassandraPopulationStore
from service.adapters.cassandra_store import CassandraStore, build_cluster
from service.adapters.kafka_bus import REASON_HEADER, KafkaBus, KafkaSource, ensure_topics
from service.core.records import DecisionEvent, DecisionRecord, ModelRef
from service.core.registry import LoadedModel, ModelRegistry
from service.metrics import Metrics, create_metrics
from service.settings import CassandraSettings, KafkaSettings, WorkerSettings
from tests.polling import until
from tests.worker_model import ROOT, assert_exact, demo_or_small_model, make_events
from workers.explainer import Backoff, ExplainerWorker

RETENTION = timedelta(days=30)
# Generous: a new member waits for a SIGKILLed one's session (10 s) to expire.
FLOW_TIMEOUT_S = 120.0
POLL_S = 0.1


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    await until(check, FLOW_TIMEOUT_S, POLL_S)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return demo_or_small_model(tmp_path_factory.mktemp("model"))


# ---------------------------------------------------------------- Kafka and Cassandra


@dataclass(frozen=True)
class Env:
    kafka: KafkaSettings
    cassandra: CassandraSettings


def _hosts(contact: list[tuple[str, int]]) -> str:
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in contact)


@pytest.fixture(scope="module")
def cql(cassandra_contact: list[tuple[str, int]]) -> Iterator[tuple[Session, list[str]]]:
    """A plain driver session; drops every keyspace the tests created."""
    cluster = build_cluster(CassandraSettings(hosts=_hosts(cassandra_contact)))
    session = cluster.connect()
    created: list[str] = []
    try:
        yield session, created
    finally:
        for keyspace in created:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        cluster.shutdown()


@pytest.fixture
def env(
    kafka_bootstrap: str,
    cassandra_contact: list[tuple[str, int]],
    cql: tuple[Session, list[str]],
) -> Env:
    """Topics, group and keyspace of this test only."""
    name = uuid.uuid4().hex[:12]
    keyspace = f"test_worker_{name}"
    cql[1].append(keyspace)
    return Env(
        kafka=KafkaSettings(
            bootstrap=kafka_bootstrap,
            topic=f"test-worker-{name}",
            dead_letter_topic=f"test-worker-{name}.dlq",
            group_id=f"test-worker-{name}",
            partitions=3,
            publish_timeout_s=10.0,
        ),
        cassandra=CassandraSettings(
            hosts=_hosts(cassandra_contact), keyspace=keyspace, request_timeout_s=30.0
        ),
    )


@pytest.fixture
async def store(env: Env, model: LoadedModel) -> AsyncIterator[CassandraStore]:
    opened = await CassandraStore.connect(env.cassandra, RETENTION)
    try:
        # As `shapstream db migrate` does: the workers keep population aggregates too.
        await opened.migrate()
        await CassandraPopulationStore(opened).migrate()
        await opened.put_model(model.artifact())
        yield opened
    finally:
        await opened.close()


async def _publish(kafka: KafkaSettings, events: list[DecisionEvent]) -> None:
    bus = await KafkaBus.open(kafka)
    try:
        for event in events:
            await bus.publish(event)
    finally:
        await bus.close()


async def _publish_raw(kafka: KafkaSettings, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        await producer.send_and_wait(kafka.topic, value=value, key=key)
    finally:
        await producer.stop()


@dataclass(frozen=True)
class Consumed:
    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


async def _read_topic(kafka: KafkaSettings, topic: str, expect: int) -> list[Consumed]:
    """Every record of `topic` (made by `ensure_topics`) from the start, once `expect` arrived."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await reader.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        found: list[Consumed] = []
        async with asyncio.timeout(FLOW_TIMEOUT_S):
            while len(found) < expect:
                fetched = await reader.getmany(timeout_ms=500)
                for tp, records in fetched.items():
                    found.extend(
                        Consumed(tp, r.offset, r.key, r.value, dict(r.headers)) for r in records
                    )
        return found
    finally:
        await reader.stop()


async def _committed(kafka: KafkaSettings) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(kafka.group_id)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def _wait_committed(kafka: KafkaSettings, total: int) -> None:
    """Until the group's committed offsets cover `total` events (all partitions start at 0)."""

    async def covered() -> bool:
        return sum((await _committed(kafka)).values()) >= total

    await _until(covered)


async def _records(store: CassandraStore, ids: list[str]) -> dict[str, DecisionRecord]:
    found = await asyncio.gather(*(store.get(txn) for txn in ids))
    return {txn: r for txn, r in zip(ids, found, strict=True) if r is not None}


async def _wait_for_records(
    store: CassandraStore, ids: list[str], at_least: int | None = None
) -> dict[str, DecisionRecord]:
    want = len(ids) if at_least is None else at_least
    async with asyncio.timeout(FLOW_TIMEOUT_S):
        while True:
            records = await _records(store, ids)
            if len(records) >= want:
                return records
            await asyncio.sleep(0.2)


def _worker(
    source: KafkaSource, store: CassandraStore, model: LoadedModel, metrics: Metrics
) -> ExplainerWorker:
    return ExplainerWorker(
        source,
        store,
        ModelRegistry([model]),
        WorkerSettings(batch_max=16, batch_timeout_ms=50),
        metrics,
        backoff=Backoff(first_s=0.1, cap_s=0.5),
    )


# ---------------------------------------------------------------- in-process worker


async def test_explains_exactly_and_poison_does_not_block(
    env: Env, store: CassandraStore, model: LoadedModel
) -> None:
    kafka = env.kafka.model_copy(update={"partitions": 1})
    await ensure_topics(kafka)
    before = make_events(model, 20, "before")
    after = make_events(model, 20, "after")
    unknown_feature = before[0].model_copy(
        update={"transaction_id": "poison-feature", "features": {**before[0].features, "x": 1.0}}
    )
    unknown_version = before[1].model_copy(
        update={"transaction_id": "poison-version", "model": ModelRef(name="m", version="0" * 64)}
    )
    # One partition: the poison sits between good events, which must all get through.
    await _publish(kafka, before)
    await _publish_raw(kafka, b"poison-bytes", b"\xff not json")
    await _publish(kafka, [unknown_feature, unknown_version])
    await _publish(kafka, after)

    metrics = create_metrics()
    source = await KafkaSource.open(kafka, metrics)
    stop = asyncio.Event()
    try:
        running = asyncio.create_task(_worker(source, store, model, metrics).run(stop))
        good = before + after
        records = await _wait_for_records(store, [e.transaction_id for e in good])
        await _wait_committed(kafka, len(good) + 3)
        stop.set()
        await running
    finally:
        await source.close()

    for event in good:
        assert_exact(model, event, records[event.transaction_id])
    assert await store.get("poison-feature") is None
    assert await store.get("poison-version") is None

    dead = await _read_topic(kafka, kafka.dead_letter_topic, 3)
    reasons = {d.key: d.headers[REASON_HEADER] for d in dead}
    assert reasons == {
        b"poison-bytes": b"malformed",
        b"poison-feature": b"invalid-features",
        b"poison-version": b"unknown-model-version",
    }
    assert metrics.dead_letters.labels(reason="malformed")._value.get() == 1
    engines = {r.engine for r in records.values()}
    assert sum(metrics.explanations.labels(engine=e)._value.get() for e in engines) == len(good)


async def test_store_outage_retries_the_batch_without_committing(
    env: Env, model: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes into a keyspace that does not exist yet fail on the real node, like an outage."""
    await ensure_topics(env.kafka)
    events = make_events(model, 12, "outage")
    await _publish(env.kafka, events)

    metrics = create_metrics()
    store = await CassandraStore.connect(env.cassandra, RETENTION)
    source = await KafkaSource.open(env.kafka, metrics)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="workers.explainer")
    try:
        running = asyncio.create_task(_worker(source, store, model, metrics).run(stop))

        async def retried_twice() -> bool:
            return sum("writing to the store failed" in r.getMessage() for r in caplog.records) >= 2

        await _until(retried_twice)
        assert await _committed(env.kafka) == {}, "committed before the write succeeded"

        await store.migrate()
        records = await _wait_for_records(store, [e.transaction_id for e in events])
        await _wait_committed(env.kafka, len(events))
        stop.set()
        await running
    finally:
        await source.close()
        await store.close()
    for event in events:
        assert_exact(model, event, records[event.transaction_id])


# ---------------------------------------------------------------- a worker killed mid-stream


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_worker(
    env: Env, models_dir: Path, log_file: Path, metrics_port: int
) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "SHAPSTREAM_MODE": "kafka",
        "SHAPSTREAM_MODELS_DIR": str(models_dir),
        "SHAPSTREAM_KAFKA_BOOTSTRAP": env.kafka.bootstrap,
        "SHAPSTREAM_KAFKA_TOPIC": env.kafka.topic,
        "SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC": env.kafka.dead_letter_topic,
        "SHAPSTREAM_KAFKA_GROUP_ID": env.kafka.group_id,
        "SHAPSTREAM_KAFKA_PARTITIONS": str(env.kafka.partitions),
        "SHAPSTREAM_CASSANDRA_HOSTS": env.cassandra.hosts,
        "SHAPSTREAM_CASSANDRA_KEYSPACE": env.cassandra.keyspace,
        "SHAPSTREAM_WORKER_BATCH_MAX": "5",
        "SHAPSTREAM_WORKER_BATCH_TIMEOUT_MS": "20",
        "SHAPSTREAM_LOG_LEVEL": "INFO",
    }
    with log_file.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli.worker", "--metrics-port", str(metrics_port)],
            cwd=ROOT,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _read_log(log_file: Path) -> str:
    return log_file.read_text(errors="replace")


async def _wait_for_log(proc: subprocess.Popen[bytes], log_file: Path, text: str) -> None:
    async def logged() -> bool:
        assert proc.poll() is None, _read_log(log_file)
        return text in await asyncio.to_thread(_read_log, log_file)

    await _until(logged)


def _explanations_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(r"^shapstream_explanations_total\{[^}]*\} (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_killed_worker_loses_nothing_and_rewrites_only_its_uncommitted_batch(
    env: Env, store: CassandraStore, model: LoadedModel, tmp_path: Path
) -> None:
    """SIGKILL a worker process mid-stream, start another: no loss, no double explanation.

    Writes are idempotent upserts keyed by transaction id, so "written twice" cannot show up
    as a second row. It shows up as a record re-explained later: same attributions, a new
    `explained_at` (set per batch). The honest claims are therefore:
      * no loss: every published event has a stored record equal to `pred_contribs`;
      * nothing committed is explained again: every record whose offset the killed worker had
        committed keeps the `explained_at` it had at the moment of the kill;
      * the only records rewritten are the killed worker's written-but-uncommitted tail (at
        most one batch: it processes one batch at a time) - the at-least-once window the
        design accepts - and they are rewritten with identical attributions;
      * the second worker explains each uncommitted event exactly once: its
        `shapstream_explanations_total` equals the number of events past the committed
        offsets, read once everything is committed (a duplicate would push it higher).
    The store is given the model version only through Cassandra (`put_model`): the workers'
    models directory is empty, so they also prove loading the exact version from the store.
    """
    await ensure_topics(env.kafka)
    batch_max = 5
    events = make_events(model, 400, "kill")
    ids = [e.transaction_id for e in events]
    models_dir = tmp_path / "no-models"
    models_dir.mkdir()

    first_log, second_log = tmp_path / "worker-1.log", tmp_path / "worker-2.log"
    first = _start_worker(env, models_dir, first_log, _free_port())
    try:
        await _wait_for_log(first, first_log, "assigned partitions")

        async def publish_slowly() -> None:
            bus = await KafkaBus.open(env.kafka)
            try:
                for event in events:
                    await bus.publish(event)
                    await asyncio.sleep(0.01)
            finally:
                await bus.close()

        publishing = asyncio.create_task(publish_slowly())
        await _wait_for_records(store, ids[:100], at_least=40)
        first.kill()
        first.wait()
        assert not publishing.done(), "the stream was over before the kill"
        await publishing
    finally:
        _stop(first)

    # What the killed worker left behind: its records and its group's committed offsets.
    at_kill = await _records(store, ids)
    committed = await _committed(env.kafka)
    where = {
        DecisionEvent.from_bytes(c.value).transaction_id: (c.tp, c.offset)
        for c in await _read_topic(env.kafka, env.kafka.topic, len(events))
    }
    was_committed = {txn for txn, (tp, off) in where.items() if off < committed.get(tp, 0)}
    uncommitted = set(ids) - was_committed
    assert was_committed, "the kill came before any commit"
    assert uncommitted, "the kill came after the stream was over"
    assert was_committed <= set(at_kill), "an offset was committed before its record was written"

    port = _free_port()
    second = _start_worker(env, models_dir, second_log, port)
    try:
        final = await _wait_for_records(store, ids)
        await _wait_committed(env.kafka, len(events))
        assert second.poll() is None, _read_log(second_log)
        explained_by_second = _explanations_total(port)
    finally:
        _stop(second)
    assert second.returncode == 0, _read_log(second_log)

    for event in events:
        assert_exact(model, event, final[event.transaction_id])
    rewritten = {
        txn for txn, record in at_kill.items() if final[txn].explained_at != record.explained_at
    }
    assert not rewritten & was_committed, "a committed event was explained again"
    assert rewritten == set(at_kill) & uncommitted
    assert len(rewritten) <= batch_max
    assert explained_by_second == len(uncommitted)
