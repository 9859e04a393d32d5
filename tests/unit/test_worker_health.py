"""A worker's liveness and readiness (driven by an injected clock) and the HTTP app serving them."""

import asyncio
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.adapters.local_bus import LocalBus
from service.adapters.sqlite_store import SqliteStore
from service.core.registry import ModelRegistry
from service.metrics import create_metrics, create_worker_probe_metrics
from service.settings import WorkerSettings
from tests.polling import until
from tests.worker_model import demo_or_small_model, make_events
from workers.explainer import Backoff, ExplainerWorker
from workers.health import WorkerHealth
from workers.probes import PortUnavailable, bind, create_probe_app

STALL_S = 60.0


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _until(check: Callable[[], bool]) -> None:
    await until(check, 30, 0.01)


def _ready_health(clock: Clock) -> WorkerHealth:
    health = WorkerHealth(STALL_S, clock)
    health.consumer_started(lambda: True)
    return health


# ---------------------------------------------------------------- liveness


def test_alive_while_the_loop_progresses_stalled_past_the_limit() -> None:
    clock = Clock()
    health = WorkerHealth(STALL_S, clock)
    # Start-up counts as progress.
    assert health.liveness().ok

    clock.now += STALL_S
    assert health.liveness().ok
    clock.now += 0.5
    stalled = health.liveness()
    assert not stalled.ok
    assert stalled.body["status"] == "stalled"
    assert stalled.body["seconds_since_progress"] == STALL_S + 0.5
    assert "no progress for 60.5 s" in stalled.body["detail"]

    health.progressed()
    assert health.liveness().ok
    assert health.seconds_since_progress() == 0.0


def test_a_failing_step_being_retried_is_progress_not_a_stall() -> None:
    clock = Clock()
    health = _ready_health(clock)
    for _ in range(3):
        clock.now += STALL_S - 1
        health.step_failed("writing to the store", "store", "check Cassandra", TimeoutError())
    assert health.liveness().ok
    assert not health.readiness().ok


# ---------------------------------------------------------------- readiness


def test_not_ready_until_the_consumer_is_in_its_group() -> None:
    clock = Clock()
    health = WorkerHealth(STALL_S, clock)
    verdict = health.readiness()
    assert not verdict.ok
    assert verdict.body["problems"] == [
        {"check": "consumer", "detail": "the consumer is not started"}
    ]

    in_group = False
    health.consumer_started(lambda: in_group)
    verdict = health.readiness()
    assert not verdict.ok
    assert "not a member of its group" in verdict.body["problems"][0]["detail"]

    in_group = True
    assert health.readiness().body == {"status": "ready"}

    health.consumer_stopped()
    assert health.readiness().body["problems"][0]["detail"] == "the consumer is stopped"


def test_a_failing_step_names_its_dependency_until_it_succeeds() -> None:
    clock = Clock()
    health = _ready_health(clock)
    refused = ConnectionError("db-7.internal:9042 refused")
    health.step_failed("writing to the store", "store", "check Cassandra", refused)
    clock.now += 2.0
    health.step_failed("writing to the store", "store", "check Cassandra", TimeoutError())
    clock.now += 0.5

    verdict = health.readiness()
    assert not verdict.ok
    [problem] = verdict.body["problems"]
    assert problem["check"] == "store"
    assert problem["step"] == "writing to the store"
    assert problem["attempts"] == 2
    assert problem["failing_for_s"] == 2.5
    assert problem["error"] == "TimeoutError"
    assert "check Cassandra" in problem["detail"]

    health.step_failed("writing to the store", "store", "check Cassandra", refused)
    # The exception's own text (hosts, internals) stays in the log, out of the body.
    assert "db-7" not in str(health.readiness().body)

    # Another step starts its own count.
    health.step_failed("dead-lettering", "dead-letter topic", "check Kafka", OSError())
    [problem] = health.readiness().body["problems"]
    assert (problem["check"], problem["attempts"], problem["failing_for_s"]) == (
        "dead-letter topic",
        1,
        0.0,
    )

    health.step_succeeded()
    assert health.readiness().ok


# ---------------------------------------------------------------- the HTTP app


async def test_endpoints_answer_200_or_503_with_what_is_wrong() -> None:
    clock = Clock()
    health = WorkerHealth(STALL_S, clock)
    metrics = create_metrics()
    probes = create_worker_probe_metrics(metrics.registry)
    probes.ready.set_function(lambda: float(health.readiness().ok))
    probes.progress_age_seconds.set_function(health.seconds_since_progress)
    app = create_probe_app(health, metrics.registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        assert (await client.get("/healthz")).status_code == 200
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["problems"][0]["check"] == "consumer"

        health.consumer_started(lambda: True)
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

        clock.now += STALL_S + 1
        stalled = await client.get("/healthz")
        assert stalled.status_code == 503
        assert stalled.json()["status"] == "stalled"

        exposition = await client.get("/metrics")
        assert exposition.status_code == 200
        assert exposition.headers["content-type"].startswith("text/plain")
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(exposition.text)
            for sample in family.samples
        }
        assert samples["shapstream_worker_ready"] == 1.0
        assert samples["shapstream_worker_progress_age_seconds"] == STALL_S + 1
        assert samples["shapstream_worker_lag_seconds"] == 0.0

        assert (await client.post("/healthz")).status_code == 405
        assert (await client.get("/nothing")).status_code == 404


# ---------------------------------------------------------------- the explainer drives it


async def test_the_explainer_reports_a_failing_store_and_its_recovery(tmp_path: Path) -> None:
    """The real embedded adapters: writes fail until the store's schema exists."""
    model = demo_or_small_model(tmp_path / "model")
    metrics = create_metrics()
    bus = await LocalBus.open(tmp_path / "outbox.sqlite3", metrics)
    store = await SqliteStore.open(tmp_path / "store.sqlite3", timedelta(days=30))
    clock = Clock()
    health = _ready_health(clock)
    worker = ExplainerWorker(
        bus,
        store,
        ModelRegistry([model]),
        WorkerSettings(batch_max=4, batch_timeout_ms=10),
        metrics,
        backoff=Backoff(first_s=0.01, cap_s=0.05),
        health=health,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        [event] = make_events(model, 1, "health")
        await bus.publish(event)
        await _until(lambda: not health.readiness().ok)
        [problem] = health.readiness().body["problems"]
        assert (problem["check"], problem["step"]) == ("store", "writing to the store")

        # Each retry is progress: time passing between attempts does not stall the worker.
        clock.now += STALL_S * 10
        assert not health.liveness().ok
        await _until(lambda: health.liveness().ok)

        await store.migrate()
        await _until(lambda: health.readiness().ok)
        assert await store.get(event.transaction_id) is not None

        # Empty polls are progress too.
        clock.now += STALL_S * 10
        assert not health.liveness().ok
        await _until(lambda: health.liveness().ok)
    finally:
        stop.set()
        await running
        await bus.close()
        await store.close()


def test_a_taken_port_is_refused_with_a_sentence() -> None:
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(PortUnavailable, match=f"cannot listen on port {port}"):
            bind(port)
