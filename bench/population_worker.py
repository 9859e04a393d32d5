"""What keeping the population aggregates costs a worker: CPU per decision with and without.

    .venv/bin/python -m bench.population_worker [--pairs 3] [--decisions 20000] [--rate 1000]

The goal (issue 12): a worker keeping the aggregates spends at most 10% more CPU per decision
than one that does not, at 1,000 decisions/s.

A/B: each run starts a `shapstream worker` on a fresh topic (6 partitions) and keyspace (the
demo model and its reference stored, as a gateway stores them at start), with
SHAPSTREAM_WORKER_POPULATION=false (the baseline) or true (what users run). Real German credit
decision events, scored and encoded as the gateway publishes them (caller transaction ids as
Kafka keys), are published to it straight through the Kafka adapter at --rate, so the worker
sees the batches it sees behind a gateway at that rate (~50 events), without a gateway's CPU
on the same 2 cores. The worker's, Cassandra's and Kafka's CPU time (/proc) is read between
the end of a warm-up (--warmup decisions, written) and the moment the worker has written
--decisions more. Each run checks that every decision was written once and, with aggregates,
counted once. Runs alternate off/on, on/off, ... (--pairs of each); printed: each run, then
the medians and the median of the pairs' ratios on/off.

Micro figure, before the runs, in this process: CPU time (process_time, the driver's threads
included) per record of explaining a batch of 50, writing it to Cassandra, and
`PopulationKeeper.add` on it (6 sources, its Cassandra row writes included), and of the
aggregate arithmetic alone (of_records, merged, to_bytes).

Needs Kafka and Cassandra (`make services`).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from bench.cpu import fmt_us, per_op_us, read_cpu
from bench.e2e import worker_count
from bench.german import decision_events, demo_model, reference_edges
from bench.loadgen import median
from bench.procs import ROOT, SHAPSTREAM, backend_pids, drop_run_data, free_port, running, wait_http
from service.adapters.kafka_bus import KafkaBus, ensure_topics
from service.adapters.wiring import open_stores
from service.core.explain import explain_batch
from service.core.population.aggregates import Aggregate
from service.core.records import DecisionEvent
from service.core.registry import LoadedModel
from service.settings import Settings
from workers.explainer import choose_engine
from workers.population import Placed, PopulationKeeper

OUT = ROOT / "bench" / "out"
GOAL_RATIO = 1.10
SOURCES = 6  # Kafka partitions of a topic (KafkaSettings.partitions)
DRAIN_TIMEOUT_S = 300.0
PUBLISH_TIMEOUT_S = 30.0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_settings(run: str) -> tuple[Settings, dict[str, str]]:
    """Settings of a run (its topic, group and keyspace) and the worker's environment for them."""
    env = {
        "SHAPSTREAM_MODELS_DIR": str(ROOT / "models"),
        "SHAPSTREAM_KAFKA_TOPIC": f"bench-popw-{run}",
        "SHAPSTREAM_KAFKA_GROUP_ID": f"bench-popw-{run}",
        "SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC": f"bench-popw-{run}-dlq",
        "SHAPSTREAM_CASSANDRA_KEYSPACE": f"bench_popw_{run}",
        "SHAPSTREAM_LOG_LEVEL": "WARNING",
    }
    base = Settings(mode="kafka")
    kafka = base.kafka.model_copy(
        update={
            "topic": env["SHAPSTREAM_KAFKA_TOPIC"],
            "group_id": env["SHAPSTREAM_KAFKA_GROUP_ID"],
            "dead_letter_topic": env["SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC"],
        }
    )
    cassandra = base.cassandra.model_copy(
        update={"keyspace": env["SHAPSTREAM_CASSANDRA_KEYSPACE"], "request_timeout_s": 30.0}
    )
    return base.model_copy(update={"kafka": kafka, "cassandra": cassandra}), env


async def prepare(settings: Settings, model: LoadedModel) -> None:
    """Topics, schema, the model and its reference, as a gateway leaves them at start."""
    await ensure_topics(settings.kafka)
    assert model.reference is not None
    async with open_stores(settings) as stores:
        await stores.explanations.put_model(model.artifact())
        await stores.population.put_reference(model.version, model.reference)


async def publish(
    settings: Settings, events: list[tuple[bytes, bytes]], rate: float, label: str
) -> None:
    """Send (key, value) pairs at `rate` per second, acknowledged (acks=all) as they go."""
    bus = KafkaBus(settings.kafka)
    try:
        start = time.perf_counter()
        sent, reported = 0, 0.0
        while sent < len(events):
            elapsed = time.perf_counter() - start
            due = min(len(events), int(elapsed * rate) + 1)
            if due > sent:
                await bus.send_many(events[sent:due], PUBLISH_TIMEOUT_S)
                sent = due
            else:
                await asyncio.sleep((sent / rate) - elapsed)
            if elapsed - reported >= 5.0:
                reported = elapsed
                _say(f"  {label}: sent {sent}/{len(events)} ({elapsed:.0f} s)")
    finally:
        await bus.close()


def metric_sum(port: int, name: str) -> float:
    """The sum of a metric's samples on a worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+]+)$"
    return sum(float(m) for m in re.findall(pattern, text, re.MULTILINE))


def wait_written(port: int, expected: int) -> float:
    """Poll the worker's count of written explanations until it reaches `expected`."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        written = worker_count(port)
        if written >= expected:
            return written
        time.sleep(0.05)
    raise SystemExit(f"the worker wrote {worker_count(port):.0f} of {expected} in time")


async def aggregated(settings: Settings, version: str, day: datetime) -> int:
    """Decisions counted in the version's aggregate rows of `day`."""
    async with open_stores(settings) as stores:
        parts = await stores.population.parts(version, [day.date()])
    return sum(Aggregate.from_bytes(p.aggregate).count for p in parts)


@dataclass
class Run:
    population: bool
    cpu_us: dict[str, float | None]  # per decision: worker, kafka, cassandra
    batch: float  # mean events per batch over the measured window
    seconds: float
    counted: int


def measure(
    args: argparse.Namespace,
    model: LoadedModel,
    events: list[tuple[bytes, bytes]],
    decided_at: datetime,
    population: bool,
    label: str,
) -> Run:
    run = uuid.uuid4().hex[:8]
    settings, env = run_settings(run)
    env["SHAPSTREAM_WORKER_POPULATION"] = "true" if population else "false"
    asyncio.run(prepare(settings, model))
    warmup, measured = events[: args.warmup], events[args.warmup :]
    port = free_port()
    log = OUT / "population-worker.log"
    try:
        with running([SHAPSTREAM, "worker", "--metrics-port", str(port)], env, log) as worker:
            wait_http(port, "/readyz", proc=worker, log=log)
            pids = {"worker": worker.pid, **backend_pids()}
            _say(f"{label}: warm-up, {len(warmup)} decisions at {args.rate:.0f}/s")
            asyncio.run(publish(settings, warmup, args.rate, label))
            wait_written(port, len(warmup))
            batches = metric_sum(port, "shapstream_worker_batch_size_count")
            events_in = metric_sum(port, "shapstream_worker_batch_size_sum")
            start, started = read_cpu(pids), time.perf_counter()
            _say(f"{label}: measured, {len(measured)} decisions at {args.rate:.0f}/s")
            asyncio.run(publish(settings, measured, args.rate, label))
            wait_written(port, len(events))
            cpu = per_op_us(start, read_cpu(pids), len(measured))
            seconds = time.perf_counter() - started
            batches = metric_sum(port, "shapstream_worker_batch_size_count") - batches
            events_in = metric_sum(port, "shapstream_worker_batch_size_sum") - events_in
            # A moment more, so a second write of any decision would be counted too.
            time.sleep(1.0)
            written = worker_count(port)
        counted = asyncio.run(aggregated(settings, model.version, decided_at))
    finally:
        topics = [settings.kafka.topic, settings.kafka.dead_letter_topic]
        asyncio.run(drop_run_data(settings.cassandra.keyspace, topics))
    if written != len(events):
        raise SystemExit(f"{label}: the worker wrote {written:.0f} explanations of {len(events)}")
    if counted != (len(events) if population else 0):
        raise SystemExit(f"{label}: the aggregates count {counted} decisions of {len(events)}")
    return Run(population, cpu, events_in / max(batches, 1), seconds, counted)


# ----------------------------------------------------------------------------------- micro


@dataclass
class Micro:
    records: int
    explain_us: float
    write_us: float
    keeper_us: float
    math_us: float


async def micro(settings: Settings, model: LoadedModel, events: list[DecisionEvent]) -> Micro:
    """CPU per record of each step of a worker's batch, in this process (see the docstring)."""
    engine, _ = choose_engine(model, "auto")
    models = {model.version: model}
    batch = 50
    warm = 10 * batch
    spent = {"explain": 0.0, "write": 0.0, "keeper": 0.0}
    offsets = [0] * SOURCES
    written = []
    await prepare(settings, model)
    async with open_stores(settings) as stores:
        keeper = PopulationKeeper(stores.population)
        for first in range(0, len(events), batch):
            chunk = events[first : first + batch]
            t0 = time.process_time()
            result = explain_batch(model, engine, chunk, datetime.now(UTC))
            t1 = time.process_time()
            await stores.explanations.write(result.records, [e.claim() for e in chunk])
            t2 = time.process_time()
            placed = []
            for n, record in enumerate(result.records):
                source = (first + n) % SOURCES
                placed.append(Placed(record, f"bench/{source}", offsets[source]))
                offsets[source] += 1
            await keeper.add(placed, models)
            t3 = time.process_time()
            if first >= warm:
                spent["explain"] += t1 - t0
                spent["write"] += t2 - t1
                spent["keeper"] += t3 - t2
                written.append(placed)
    # The arithmetic alone, on the same batches: a row per source, merged and encoded.
    edges = reference_edges(model)
    rows = {s: Aggregate.empty(model.schema, edges) for s in range(SOURCES)}
    t0 = time.process_time()
    for placed in written:
        for source in range(SOURCES):
            mine = [p.record for p in placed if p.source == f"bench/{source}"]
            rows[source] = rows[source].merged(Aggregate.of_records(mine, model.schema, edges))
            rows[source].to_bytes()
    math_s = time.process_time() - t0
    n = sum(len(p) for p in written)
    return Micro(
        n,
        1e6 * spent["explain"] / n,
        1e6 * spent["write"] / n,
        1e6 * spent["keeper"] / n,
        1e6 * math_s / n,
    )


def run_micro(args: argparse.Namespace, model: LoadedModel) -> Micro:
    settings, _ = run_settings(uuid.uuid4().hex[:8])
    events = decision_events(model, args.micro_records, "bench-popw-micro-")
    _say(f"micro: {args.micro_records} records in batches of 50, in this process")
    try:
        return asyncio.run(micro(settings, model, events))
    finally:
        topics = [settings.kafka.topic, settings.kafka.dead_letter_topic]
        asyncio.run(drop_run_data(settings.cassandra.keyspace, topics))


# ---------------------------------------------------------------------------------- report


def _median_of(runs: list[Run], key: str) -> float | None:
    values = [r.cpu_us.get(key) for r in runs]
    known = [v for v in values if v is not None]
    return median(known) if known and len(known) == len(values) else None


def report(args: argparse.Namespace, m: Micro, pairs: list[tuple[Run, Run]]) -> None:
    base = m.explain_us + m.write_us
    print(f"\nmicro, in-process CPU per record (batches of 50, {SOURCES} sources, {m.records})")
    print(f"  explain {m.explain_us:6.1f} µs + write {m.write_us:6.1f} µs = {base:6.1f} µs")
    print(
        f"  PopulationKeeper.add {m.keeper_us:6.1f} µs ({m.keeper_us / base:.1%} of explain + "
        f"write), of which the aggregate arithmetic {m.math_us:6.1f} µs"
    )
    offs = [off for off, _ in pairs]
    ons = [on for _, on in pairs]
    print(
        f"\nworker with and without population aggregates, {args.decisions} decisions at "
        f"{args.rate:.0f}/s after {args.warmup} of warm-up, medians of {len(pairs)} pairs"
    )
    print(f"{'':10s} {'worker µs':>10s} {'Cassandra µs':>13s} {'Kafka µs':>9s} {'batch':>6s}")
    for name, runs in (("off", offs), ("on", ons)):
        print(
            f"{name:10s} {fmt_us(_median_of(runs, 'worker'), 10)} "
            f"{fmt_us(_median_of(runs, 'cassandra'), 13)} {fmt_us(_median_of(runs, 'kafka'), 9)} "
            f"{median([r.batch for r in runs]):6.1f}"
        )
    for key, name in (("worker", "worker"), ("cassandra", "Cassandra")):
        ratios = _ratios(pairs, key)
        if ratios:
            listed = ", ".join(f"{r:.3f}" for r in ratios)
            print(f"{name} CPU on/off: median {median(ratios):.3f}x (pairs: {listed})")
    ratios = _ratios(pairs, "worker")
    if ratios:
        ratio = median(ratios)
        verdict = "met" if ratio <= GOAL_RATIO else "missed"
        print(
            f"goal: worker CPU per decision <= {GOAL_RATIO:.2f}x without: {ratio:.3f}x, {verdict}"
        )


def _ratios(pairs: list[tuple[Run, Run]], key: str) -> list[float]:
    """on/off of a component's CPU per decision, for the pairs where both are known."""
    ratios = []
    for off, on in pairs:
        a, b = off.cpu_us.get(key), on.cpu_us.get(key)
        if a is not None and b is not None and a > 0:
            ratios.append(b / a)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=3, help="runs without and with, each")
    parser.add_argument("--decisions", type=int, default=20_000, help="measured, per run")
    parser.add_argument("--warmup", type=int, default=2_000, help="decisions before measuring")
    parser.add_argument("--rate", type=float, default=1000.0, help="decisions/s published")
    parser.add_argument("--micro-records", type=int, default=10_000)
    args = parser.parse_args()
    if args.pairs < 1 or args.decisions < 1 or args.rate <= 0 or args.micro_records < 1000:
        parser.error("--pairs, --decisions and --rate must be positive, --micro-records >= 1000")

    OUT.mkdir(parents=True, exist_ok=True)
    model = demo_model()
    m = run_micro(args, model)
    print(
        f"micro: explain {m.explain_us:.1f} µs, write {m.write_us:.1f} µs, "
        f"PopulationKeeper.add {m.keeper_us:.1f} µs per record",
        flush=True,
    )
    decided_at = datetime.now(UTC)
    built = decision_events(model, args.warmup + args.decisions, "bench-popw-", decided_at)
    events = [(e.transaction_id.encode(), e.to_bytes()) for e in built]
    pairs: list[tuple[Run, Run]] = []
    for n in range(args.pairs):
        # ABBA: a drift of the machine over the runs falls on both alike.
        order = (False, True) if n % 2 == 0 else (True, False)
        found: dict[bool, Run] = {}
        for population in order:
            label = f"pair {n + 1}/{args.pairs} {'on' if population else 'off'}"
            run = measure(args, model, events, decided_at, population, label)
            found[population] = run
            print(
                f"{label:14s} worker {fmt_us(run.cpu_us.get('worker'), 5)} µs/decision, "
                f"Cassandra {fmt_us(run.cpu_us.get('cassandra'), 5)}, "
                f"Kafka {fmt_us(run.cpu_us.get('kafka'), 5)}, {run.batch:.0f} events/batch, "
                f"{run.seconds:.1f} s, aggregates count {run.counted}",
                flush=True,
            )
        pairs.append((found[False], found[True]))
    report(args, m, pairs)


if __name__ == "__main__":
    main()
