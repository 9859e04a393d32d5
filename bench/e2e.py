"""End to end on one machine: a steady rate of decisions through gateway, Kafka, worker, Cassandra.

    .venv/bin/python -m bench.e2e [--rate 1000] [--seconds 60] [--warmup 10] [--runs 3]

Every request carries the caller's own transaction_id (the configuration users run). Each run
starts a gateway and its workers on a fresh keyspace and topic, sends at --rate for --warmup
seconds, then measures --seconds more. It reports the rate reached (answers 200 per second),
decision latency (from the scheduled send time, so a stalled server cannot hide its queue),
explanation freshness (decided_at to explained_at, as stored), lost or duplicated
explanations (every answered transaction, warm-up included, must be stored exactly once, and
the workers' own count of written explanations must equal the number of decisions), and the
CPU time per decision of each component over the measured window, read from /proc. Medians
over the runs are compared with the goals of the decision-path issue.
Needs Kafka and Cassandra (`make services`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import re
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import orjson

from bench.cpu import fmt_us, per_op_us, read_cpu
from bench.loadgen import Result, median, open_loop, with_transaction_ids
from bench.procs import (
    ROOT,
    SHAPSTREAM,
    backend_pids,
    create_key,
    drop_run_data,
    free_port,
    running,
    wait_http,
)
from service.adapters.cassandra_store import CassandraStore
from service.settings import CassandraSettings, Settings

DATA = ROOT / "data" / "german_credit.csv"
OUT = ROOT / "bench" / "out"
DRAIN_TIMEOUT_S = 300.0
# The budgets of CPU time per decision, in µs, by component (Kafka has none).
CPU_TARGETS_US = {"gateway": 300.0, "worker": 250.0, "cassandra": 350.0}
COMPONENTS = ("gateway", "worker", "kafka", "cassandra")
DECISION_P99_MS = 10.0
FRESHNESS_P99_MS = 200.0
RATE_SHARE = 0.99  # of --rate: 990/s at 1,000/s


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def feature_rows(limit: int = 1000) -> list[dict[str, object]]:
    """German credit rows as request features (numbers as numbers, labels as strings)."""
    with DATA.open(newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    out: list[dict[str, object]] = []
    for row in rows:
        row.pop("creditability", None)
        out.append({k: _number_or_text(v) for k, v in row.items()})
    return out


def _number_or_text(value: str) -> object:
    try:
        return int(value)
    except ValueError:
        return value


def worker_count(metrics_port: int) -> float:
    """Explanations the worker says it wrote (summed over engines)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:  # loopback only
        text = answer.read().decode()
    pattern = r"^shapstream_explanations_total\{[^}]*\} ([0-9.e+]+)$"
    return sum(float(m) for m in re.findall(pattern, text, re.MULTILINE))


async def read_back(keyspace: str, txns: list[str]) -> dict[str, float]:
    """Freshness in seconds of every stored transaction among `txns`."""
    settings = Settings(cassandra=CassandraSettings(keyspace=keyspace))
    store = await CassandraStore.from_settings(settings)
    limit = asyncio.Semaphore(64)
    found: dict[str, float] = {}

    async def one(txn: str) -> None:
        async with limit:
            record = await store.get(txn)
        if record is not None:
            found[txn] = (record.explained_at - record.decided_at).total_seconds()

    try:
        await asyncio.gather(*(one(t) for t in txns))
    finally:
        await store.close()
    return found


@dataclass
class Run:
    """What one run measured."""

    result: Result
    answered: int = 0  # decisions answered 200, warm-up included
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    freshness_ms: list[float] = field(default_factory=list)  # measured window, sorted
    cpu_us: dict[str, float | None] = field(default_factory=dict)  # per decision

    def freshness(self, q: float) -> float:
        ordered = self.freshness_ms
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(args: argparse.Namespace, payloads: list[bytes], index: int) -> Run:
    """One whole run: fresh keyspace and topic, gateway and workers, warm-up, measure, drain."""
    run = uuid.uuid4().hex[:8]
    keyspace = f"bench_e2e_{run}"
    port = free_port()
    metric_ports = [free_port() for _ in range(args.workers)]
    env = {
        "SHAPSTREAM_MODELS_DIR": str(ROOT / "models"),
        "SHAPSTREAM_KAFKA_TOPIC": f"bench-e2e-{run}",
        "SHAPSTREAM_KAFKA_GROUP_ID": f"bench-e2e-{run}",
        "SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC": f"bench-e2e-{run}-dlq",
        "SHAPSTREAM_CASSANDRA_KEYSPACE": keyspace,
        "SHAPSTREAM_LOG_LEVEL": "WARNING",
        # A spool of this run's own: never one an earlier run left behind (another topic).
        "SHAPSTREAM_SPOOL_DIR": str(OUT / f"spool-{run}"),
    }
    log = OUT / "e2e-gateway.log"
    with running([SHAPSTREAM, "serve", "--port", str(port)], env, log) as gateway:
        wait_http(port, "/readyz", proc=gateway, log=log)
        auth = {"Authorization": f"Bearer {create_key(env, f'bench-e2e-{run}')}"}
        with contextlib.ExitStack() as stack:
            workers = []
            for i, p in enumerate(metric_ports):
                command = ["nice", "-n", str(args.worker_nice), SHAPSTREAM, "worker"]
                command += ["--metrics-port", str(p)]
                worker_log = OUT / f"e2e-worker-{i}.log"
                worker = stack.enter_context(running(command, env, worker_log))
                workers.append(worker.pid)
                wait_http(p, "/metrics", proc=worker, log=worker_log)
            pids = {"gateway": gateway.pid, **backend_pids()}
            pids |= {f"worker {i}": pid for i, pid in enumerate(workers)}
            txns: list[str] = []
            for seconds, label in ((args.warmup, "warm-up"), (args.seconds, "measured")):
                _say(
                    f"run {index + 1}/{args.runs} {label}: {args.rate:.0f} decisions/s "
                    f"for {seconds:.0f} s"
                )
                start = read_cpu(pids)
                result = asyncio.run(
                    open_loop(
                        "127.0.0.1",
                        port,
                        "/v1/predictions",
                        with_transaction_ids(f"{run}-{label}-", payloads),
                        args.rate,
                        seconds,
                        keep_bodies=True,
                        progress=_say,
                        headers=auth,
                    )
                )
                cpu = per_op_us(start, read_cpu(pids), result.ok)
                measured = [orjson.loads(b)["transaction_id"] for b in result.bodies]
                # Every decision, warm-up included, must be stored exactly once.
                txns += measured
            _say(f"run {index + 1}/{args.runs}: waiting for the workers to write {len(txns)}")
            written = _drain(metric_ports, len(txns))
    freshness = asyncio.run(read_back(keyspace, txns))
    topics = [env["SHAPSTREAM_KAFKA_TOPIC"], env["SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC"]]
    asyncio.run(drop_run_data(keyspace, topics))
    return Run(
        result=result,
        answered=len(txns),
        stored=len(freshness),
        lost=len(set(txns)) - len(freshness),
        duplicated=int(written) - len(freshness),
        freshness_ms=sorted(1000 * freshness[t] for t in measured if t in freshness),
        cpu_us=_by_component(cpu),
    )


def _by_component(cpu: dict[str, float | None]) -> dict[str, float | None]:
    """Per-process figures as components: the workers' summed, per decision."""
    out = {k: v for k, v in cpu.items() if not k.startswith("worker ")}
    workers = [v for k, v in cpu.items() if k.startswith("worker ")]
    known = [v for v in workers if v is not None]
    out["worker"] = sum(known) if known and len(known) == len(workers) else None
    return out


def _drain(metric_ports: list[int], expected: int) -> float:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    written = 0.0
    while time.monotonic() < deadline:
        written = sum(worker_count(p) for p in metric_ports)
        if written >= expected:
            break
        time.sleep(0.5)
    # A moment more, so a duplicate write in flight would be counted too.
    time.sleep(2)
    return sum(worker_count(p) for p in metric_ports)


def report_run(args: argparse.Namespace, index: int, run: Run) -> None:
    result = run.result
    print(f"\nrun {index + 1}/{args.runs}: gateway {result.summary()}")
    print(f"  rate reached: {result.ok_rate:.0f} decisions/s (answers 200)")
    p50, p99 = result.percentile_ms(0.5), result.percentile_ms(0.99)
    print(f"  decision latency: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(
        f"  freshness: p50 {run.freshness(0.5):.0f} ms, p99 {run.freshness(0.99):.0f} ms, "
        f"max {run.freshness(1.0):.0f} ms"
    )
    print(
        f"  answered {run.answered} (warm-up included), stored {run.stored}, lost {run.lost}, "
        f"written twice {run.duplicated}"
    )
    cpu = ", ".join(f"{k} {fmt_us(run.cpu_us.get(k), 0)}" for k in COMPONENTS)
    print(f"  CPU µs per decision over the measured window: {cpu}", flush=True)


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    workers = f"{args.workers} worker(s) at nice {args.worker_nice}"
    print(
        f"\nend to end, {workers}, target {args.rate:.0f}/s for {args.seconds:.0f} s "
        f"after {args.warmup:.0f} s of warm-up; medians over {len(runs)} run(s)"
    )
    rate = median([r.result.ok_rate for r in runs])
    p99 = median([r.result.percentile_ms(0.99) for r in runs])
    fresh = median([r.freshness(0.99) for r in runs])
    lost = sum(r.lost for r in runs)
    duplicated = sum(r.duplicated for r in runs)
    floor = RATE_SHARE * args.rate
    rows = [
        (f"rate reached >= {floor:.0f}/s", f"{rate:.0f}/s", _verdict(rate >= floor)),
        (
            f"decision p99 <= {DECISION_P99_MS:.0f} ms",
            f"{p99:.2f} ms",
            _verdict(p99 <= DECISION_P99_MS),
        ),
        (
            f"freshness p99 <= {FRESHNESS_P99_MS:.0f} ms",
            f"{fresh:.0f} ms",
            _verdict(fresh <= FRESHNESS_P99_MS),
        ),
        ("lost 0 (all runs)", str(lost), _verdict(lost == 0)),
        ("duplicated 0 (all runs)", str(duplicated), _verdict(duplicated == 0)),
    ]
    for component in COMPONENTS:
        values = [r.cpu_us.get(component) for r in runs]
        known = [v for v in values if v is not None]
        value = median(known) if known and len(known) == len(values) else None
        target = CPU_TARGETS_US.get(component)
        goal = f"{component} CPU per decision"
        if target is None:
            verdict = "(no goal)"
        elif value is None:
            verdict = "n/a (pid unknown: external server)"
        else:
            goal, verdict = (
                f"{component} CPU <= {target:.0f} µs/decision",
                _verdict(value <= target),
            )
        rows.append((goal, f"{fmt_us(value, 0)} µs", verdict))
    print(f"{'goal':34s} {'figure':>10s}  verdict")
    for goal, figure, verdict in rows:
        print(f"{goal:34s} {figure:>10s}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3, help="whole measurements to repeat")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--worker-nice",
        type=int,
        # Measured at 1,000/s: 0 gives p99 predict ~350 ms, 10 starves the worker (freshness
        # p99 ~2 s), 5 keeps both near their budgets.
        default=5,
        help="niceness of the workers: co-located, the gateway's 10 ms budget goes first",
    )
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds at the rate before measuring (JITs)"
    )
    args = parser.parse_args()
    if args.runs < 1 or args.seconds <= 0 or args.rate <= 0:
        parser.error("--runs, --seconds and --rate must be positive")

    features = feature_rows()
    payloads = [orjson.dumps({"features": f}) for f in features]
    runs: list[Run] = []
    for index in range(args.runs):
        runs.append(measure(args, payloads, index))
        report_run(args, index, runs[-1])
    report(args, runs)


if __name__ == "__main__":
    main()
