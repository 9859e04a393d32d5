"""Importance, drift and reasons over 30 days at 1,000 decisions/s: latency through the gateway.

    .venv/bin/python -m bench.population_queries [--days 30] [--requests 200] [--warmup 20]

The goal (issue 12): p99 under 100 ms for each of the three population queries over a window
of 30 days at 1,000 decisions/s, since no record is read, only the window's aggregate rows.

A fresh keyspace gets what 30 days x 86.4 M decisions of the demo model german-credit leave
there: `shapstream serve` is started on it (it stores the model version and its reference, as
at any start), then this process writes the version's `population_parts` rows, one per day and
source (6, a topic's partitions). Each source's row is a real aggregate: `Aggregate.of_records`
of 160 real German credit decisions, explained by the worker's engine and binned on the
reference's edges, with every count and sum scaled so that a day totals 86.4 M decisions (a
row's size does not depend on its counts). One of those records is stored too.

Then GET .../importance, .../drift and .../reasons over the 30 days, and as the baseline of
this run GET /v1/explanations/{id} of the stored record, are sent one at a time on a keep-alive
connection, round-robin (so the noise of a shared machine falls on all alike): --warmup rounds,
then --requests measured. Printed: p50, p99 and max per query and the ratios to the baseline;
and where the drift query's time goes, timed in this process (medians of 20): reading the
window's rows from Cassandra, decoding and merging them, computing the drift figures of the
window and of each day (the rest of its HTTP time is building and serialising the answer).

Needs Kafka and Cassandra (`make services`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta

import orjson

from bench.german import decision_events, demo_model, explained, reference_edges
from bench.loadgen import median
from bench.procs import ROOT, SHAPSTREAM, create_key, drop_run_data, free_port, running, wait_http
from service.adapters.wiring import open_stores
from service.core.population import report as population
from service.core.population.aggregates import Aggregate, merge_all
from service.core.population.drift import DriftRule
from service.core.population.reference import Reference
from service.core.ports import AggregatePart
from service.core.records import DecisionEvent, DecisionRecord
from service.core.registry import LoadedModel
from service.settings import Settings

OUT = ROOT / "bench" / "out"
SOURCES = 6  # Kafka partitions of a topic (KafkaSettings.partitions)
PER_SOURCE = 160  # real records behind each source's aggregate
GOAL_P99_MS = 100.0
BASELINE = "explanation"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scaled(aggregate: Aggregate, factor: int) -> Aggregate:
    """The aggregate of `factor` copies of its decisions: every count and sum times `factor`."""
    return dataclasses.replace(
        aggregate,
        count=aggregate.count * factor,
        sum=aggregate.sum * factor,
        abs_sum=aggregate.abs_sum * factor,
        sq_sum=aggregate.sq_sum * factor,
        hist=aggregate.hist * factor,
        inputs=aggregate.inputs * factor,
        outcomes={k: v * factor for k, v in aggregate.outcomes.items()},
        denials=aggregate.denials * factor,
        reasons={k: v * factor for k, v in aggregate.reasons.items()},
        shares=aggregate.shares * factor,
    )


async def fill(
    settings: Settings,
    model: LoadedModel,
    days: list[date],
    factor: int,
    records: list[DecisionRecord],
    event: DecisionEvent,
) -> int:
    """Write a day's rows for each of `days`, and records[0]; the bytes of one row."""
    edges = reference_edges(model)
    rows = [
        scaled(
            Aggregate.of_records(
                records[s * PER_SOURCE : (s + 1) * PER_SOURCE], model.schema, edges
            ),
            factor,
        ).to_bytes()
        for s in range(SOURCES)
    ]
    per_source = PER_SOURCE * factor
    async with open_stores(settings) as stores:
        for n, day in enumerate(days):
            await stores.population.put_parts(
                [
                    AggregatePart(
                        model.version,
                        day,
                        f"{settings.kafka.topic}/{s}",
                        (n + 1) * per_source - 1,
                        row,
                    )
                    for s, row in enumerate(rows)
                ]
            )
        await stores.explanations.write([records[0]], [event.claim()])
    return len(rows[0])


async def drift_steps(
    settings: Settings, model: LoadedModel, days: list[date], rounds: int
) -> dict[str, list[float]]:
    """The drift query's steps in this process (ms): reading the window's rows, decoding and
    merging them by day and over the window, the drift figures of the window and each day."""
    assert model.reference is not None
    reference = Reference.from_bytes(model.reference)
    rule = DriftRule()
    steps: dict[str, list[float]] = {"read rows": [], "decode+merge": [], "drift figures": []}
    async with open_stores(settings) as stores:
        for _ in range(rounds):
            t0 = time.perf_counter()
            parts = await stores.population.parts(model.version, days)
            t1 = time.perf_counter()
            by_day: dict[date, list[Aggregate]] = {}
            for part in parts:
                by_day.setdefault(part.day, []).append(Aggregate.from_bytes(part.aggregate))
            daily = [merge_all(a) for a in by_day.values()]
            total = merge_all(a for a in daily if a is not None)
            t2 = time.perf_counter()
            assert total is not None
            for aggregate in [total, *daily]:
                assert aggregate is not None
                population.drift(aggregate, reference, model.schema, rule)
            t3 = time.perf_counter()
            for name, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                steps[name].append(1000 * seconds)
    return steps


class Client:
    """GETs on one keep-alive connection, timed from sending to the last byte read."""

    def __init__(self, port: int, headers: Mapping[str, str]) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._headers = dict(headers)

    def get(self, path: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        self._connection.request("GET", path, headers=self._headers)
        answer = self._connection.getresponse()
        body = answer.read()
        elapsed = time.perf_counter() - started
        if answer.status != 200:
            raise SystemExit(f"GET {path} answered {answer.status}: {body[:500]!r}")
        return elapsed, body

    def close(self) -> None:
        self._connection.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def check(paths: dict[str, str], client: Client, expected: int) -> dict[str, int]:
    """Each query once: it must count every decision of the window; the answers' sizes."""
    sizes = {}
    for name, path in paths.items():
        _, body = client.get(path)
        sizes[name] = len(body)
        if name == BASELINE:
            continue
        answer = orjson.loads(body)
        counted = answer["total"]["decisions"] if name == "drift" else answer["decisions"]
        if counted != expected:
            raise SystemExit(f"{name} counts {counted:,} decisions, not {expected:,}")
    return sizes


def measure(
    paths: dict[str, str], client: Client, warmup: int, requests: int
) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in paths}
    for n in range(warmup + requests):
        for name, path in paths.items():
            elapsed, _ = client.get(path)
            if n >= warmup:
                timings[name].append(1000 * elapsed)
        done = n - warmup + 1
        if n + 1 == warmup:
            _say(f"warm-up: {warmup} rounds done")
        elif done > 0 and done % 50 == 0:
            figures = ", ".join(f"{k} p50 {median(v):.1f} ms" for k, v in timings.items())
            _say(f"measured {done}/{requests} rounds: {figures}")
    return timings


def report(
    args: argparse.Namespace,
    timings: dict[str, list[float]],
    sizes: dict[str, int],
    per_day: int,
    row_bytes: int,
    steps: dict[str, list[float]],
) -> None:
    print(
        f"\npopulation queries over {args.days} days x {per_day:,} decisions "
        f"({args.days * SOURCES} rows of {row_bytes:,} bytes), {args.requests} requests each "
        f"after {args.warmup} of warm-up, one at a time (ms)"
    )
    base = timings[BASELINE]
    base_p50, base_p99 = median(base), percentile(base, 0.99)
    print(
        f"{'query':12s} {'p50':>8s} {'p99':>8s} {'max':>8s} {'bytes':>8s} "
        f"{'p50 x base':>11s} {'p99 x base':>11s}  goal p99 < {GOAL_P99_MS:.0f} ms"
    )
    for name, values in timings.items():
        p50, p99 = median(values), percentile(values, 0.99)
        goal = "(baseline)" if name == BASELINE else "met" if p99 < GOAL_P99_MS else "missed"
        print(
            f"{name:12s} {p50:8.2f} {p99:8.2f} {max(values):8.2f} {sizes[name]:8,d} "
            f"{p50 / base_p50:10.2f}x {p99 / base_p99:10.2f}x  {goal}"
        )
    figures = ", ".join(f"{name} {median(ms):.1f} ms" for name, ms in steps.items())
    rounds = len(next(iter(steps.values())))
    print(f"drift's steps in-process (medians of {rounds}): {figures}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rate", type=float, default=1000.0, help="decisions/s of the days")
    parser.add_argument("--requests", type=int, default=200, help="measured, per query")
    parser.add_argument("--warmup", type=int, default=20, help="rounds before measuring")
    args = parser.parse_args()
    if not 1 <= args.days <= 366 or args.requests < 1 or args.warmup < 0 or args.rate <= 0:
        parser.error("--days 1..366, --requests positive, --warmup not negative, --rate > 0")

    OUT.mkdir(parents=True, exist_ok=True)
    model = demo_model()
    factor = max(1, round(args.rate * 86_400 / (SOURCES * PER_SOURCE)))
    per_day = factor * SOURCES * PER_SOURCE
    end = datetime.now(UTC).date()
    days = [end - timedelta(days=n) for n in reversed(range(args.days))]
    run = uuid.uuid4().hex[:8]
    env = {
        "SHAPSTREAM_MODELS_DIR": str(ROOT / "models"),
        "SHAPSTREAM_KAFKA_TOPIC": f"bench-popq-{run}",
        "SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC": f"bench-popq-{run}-dlq",
        "SHAPSTREAM_CASSANDRA_KEYSPACE": f"bench_popq_{run}",
        "SHAPSTREAM_LOG_LEVEL": "WARNING",
        "SHAPSTREAM_SPOOL_DIR": str(OUT / f"spool-popq-{run}"),
    }
    base = Settings(mode="kafka")
    settings = base.model_copy(
        update={
            "kafka": base.kafka.model_copy(update={"topic": env["SHAPSTREAM_KAFKA_TOPIC"]}),
            "cassandra": base.cassandra.model_copy(
                update={"keyspace": env["SHAPSTREAM_CASSANDRA_KEYSPACE"]}
            ),
        }
    )
    _say(f"explaining {SOURCES} x {PER_SOURCE} German credit decisions")
    events = decision_events(model, SOURCES * PER_SOURCE, f"bench-popq-{run}-")
    records = explained(model, events)
    port = free_port()
    log = OUT / "population-queries-gateway.log"
    try:
        with running([SHAPSTREAM, "serve", "--port", str(port)], env, log) as gateway:
            wait_http(port, "/readyz", proc=gateway, log=log)
            _say(f"writing {args.days} days x {SOURCES} rows of {per_day:,} decisions a day")
            row_bytes = asyncio.run(fill(settings, model, days, factor, records, events[0]))
            key = create_key(env, f"bench-popq-{run}", "explanations:read,audit:export")
            client = Client(port, {"Authorization": f"Bearer {key}"})
            window = f"?start={days[0].isoformat()}&end={days[-1].isoformat()}"
            prefix = f"/v1/models/{model.name}/versions/{model.version}"
            paths = {
                BASELINE: f"/v1/explanations/{records[0].transaction_id}",
                "importance": f"{prefix}/importance{window}",
                "drift": f"{prefix}/drift{window}",
                "reasons": f"{prefix}/reasons{window}",
            }
            try:
                sizes = check(paths, client, per_day * args.days)
                timings = measure(paths, client, args.warmup, args.requests)
            finally:
                client.close()
            _say("the drift query's steps, in this process")
            steps = asyncio.run(drift_steps(settings, model, days, 20))
    finally:
        topics = [env["SHAPSTREAM_KAFKA_TOPIC"], env["SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC"]]
        asyncio.run(drop_run_data(env["SHAPSTREAM_CASSANDRA_KEYSPACE"], topics))
        shutil.rmtree(env["SHAPSTREAM_SPOOL_DIR"], ignore_errors=True)
    report(args, timings, sizes, per_day, row_bytes, steps)


if __name__ == "__main__":
    main()
