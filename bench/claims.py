"""What idempotency costs per caller-id decision in Cassandra, for the designs weighed.

    .venv/bin/python -m bench.claims [--rounds 5] [--decisions 5000] [--concurrency 16]

Each design's statements for one new transaction id, run for many ids with `concurrency`
requests in flight (as a gateway under load sends them), rounds interleaved, medians:

- lwt:        INSERT ... IF NOT EXISTS (the claim), then UPDATE published = true: the design
              this project had, one Paxos round per decision.
- read+write: SELECT the claim at LOCAL_QUORUM, then INSERT it, one request each: the gateway
              reading and writing claims itself.
- chosen:     what service/core/decisions.py and the worker do (docs/decision-path.md): reads
              coalesced, READ_IDS ids per `IN` query (what the gateway reached at 1,000/s);
              the worker writes the claim as two more columns of the decision's row, in the
              statement it sends anyway, so no request or row of its own.

Reported: Cassandra's CPU per decision (its JVM's /proc counters; the baseline of the run is
the chosen design), this client's CPU per decision (what gateway and worker processes pay in
the driver), and throughput. Needs Cassandra (`make services`). The Paxos variant the node runs
is printed; to compare v1 with v2, start Cassandra with `paxos_variant: v2` in its
cassandra.yaml and run again.
"""

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent
from cassandra.query import PreparedStatement, Statement

from bench.cpu import fmt_us, process_cpu_s
from bench.procs import backend_pids
from service.adapters.cassandra_store import build_cluster
from service.settings import CassandraSettings

KEYSPACE = "shapstream_bench_claims"
TTL_S = 7 * 365 * 24 * 3600
RESPONSE = os.urandom(180)
EVENT = os.urandom(1000)

SCHEMA = (
    f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
    "{'class': 'SimpleStrategy', 'replication_factor': 1}",
    # The claims table of the chosen design.
    f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.claims "
    "(txn_id text PRIMARY KEY, request_hash text, response blob)",
    # The transactions table of the LWT design (it also held the event, for a republish).
    f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.transactions (txn_id text PRIMARY KEY, "
    "request_hash text, response blob, event blob, published boolean)",
)


# Ids per coalesced read in the chosen design (5.4 measured in the gateway at 1,000/s).
READ_IDS = 5

Request = tuple[Statement, tuple[Any, ...] | None]


@dataclass(frozen=True)
class Step:
    statement: PreparedStatement
    args: Callable[[list[str]], tuple[Any, ...]]
    # Ids a request carries (an IN list); 1 for single-row statements.
    ids_per_request: int = 1

    def requests(self, ids: list[str]) -> list[Request]:
        size = self.ids_per_request
        chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
        return [(self.statement, self.args(chunk)) for chunk in chunks]


@dataclass
class Figures:
    cassandra_us: list[float]
    client_us: list[float]
    rate: list[float]


def designs(session: Session) -> dict[str, list[Step]]:
    def prepare(cql: str, idempotent: bool) -> PreparedStatement:
        statement: PreparedStatement = session.prepare(cql)
        statement.is_idempotent = idempotent
        return statement

    lwt_claim = prepare(
        f"INSERT INTO {KEYSPACE}.transactions (txn_id, request_hash, response, event, published) "
        "VALUES (?, ?, ?, ?, false) IF NOT EXISTS USING TTL ?",
        idempotent=False,
    )
    published = prepare(
        f"UPDATE {KEYSPACE}.transactions USING TTL ? SET published = true WHERE txn_id = ?",
        idempotent=True,
    )
    read = prepare(f"SELECT request_hash, response FROM {KEYSPACE}.claims WHERE txn_id = ?", True)
    reads = prepare(
        f"SELECT txn_id, request_hash, response FROM {KEYSPACE}.claims WHERE txn_id IN ?", True
    )
    write = prepare(
        f"INSERT INTO {KEYSPACE}.claims (txn_id, request_hash, response) VALUES (?, ?, ?) "
        "USING TTL ?",
        idempotent=True,
    )
    claim = Step(write, lambda t: (t[0], "h" * 64, RESPONSE, TTL_S))
    return {
        "chosen": [Step(reads, lambda t: (t,), ids_per_request=READ_IDS)],
        "read+write": [Step(read, lambda t: (t[0],)), claim],
        "lwt": [
            Step(lwt_claim, lambda t: (t[0], "h" * 64, RESPONSE, EVENT, TTL_S)),
            Step(published, lambda t: (TTL_S, t[0])),
        ],
    }


def run(
    session: Session, steps: Sequence[Step], decisions: int, concurrency: int
) -> tuple[float, float, float]:
    """(seconds, Cassandra CPU s, client CPU s) for `decisions` new ids through `steps`."""
    ids = [uuid.uuid4().hex for _ in range(decisions)]
    cassandra = backend_pids()["cassandra"]
    if cassandra is None:
        raise SystemExit("no local Cassandra process found: start it with `make services`")
    c0, p0, t0 = process_cpu_s(cassandra), time.process_time(), time.perf_counter()
    for step in steps:
        # Steps of one decision are sequential (a read, then the write); decisions overlap.
        results = execute_concurrent(session, step.requests(ids), concurrency=concurrency)
        failed = [r for r in results if not r.success]
        if failed:
            raise SystemExit(f"{len(failed)} statements failed, e.g. {failed[0].result_or_exc}")
    c1, p1, t1 = process_cpu_s(cassandra), time.process_time(), time.perf_counter()
    assert c0 is not None
    assert c1 is not None
    return t1 - t0, c1 - c0, p1 - p0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    hosts = os.environ.get("SHAPSTREAM_CASSANDRA_HOSTS", CassandraSettings().hosts)
    cluster = build_cluster(CassandraSettings(hosts=hosts))
    session = cluster.connect()
    try:
        for cql in SCHEMA:
            session.execute(cql, timeout=60)
        variant = session.execute(
            "SELECT value FROM system_views.settings WHERE name = 'paxos_variant'"
        ).one()
        print(f"Cassandra paxos_variant: {variant['value'] if variant else 'unknown'}")
        plans = designs(session)
        figures = {name: Figures([], [], []) for name in plans}
        # A warm-up round per design: the JIT and the driver's pools, not the measurement.
        for steps in plans.values():
            run(session, steps, args.decisions // 5, args.concurrency)
        for n in range(args.rounds):
            for name, steps in plans.items():
                seconds, cassandra_s, client_s = run(
                    session, steps, args.decisions, args.concurrency
                )
                figures[name].cassandra_us.append(1e6 * cassandra_s / args.decisions)
                figures[name].client_us.append(1e6 * client_s / args.decisions)
                figures[name].rate.append(args.decisions / seconds)
                print(
                    f"round {n + 1}/{args.rounds} {name:11s} "
                    f"{args.decisions / seconds:7.0f} decisions/s, Cassandra "
                    f"{1e6 * cassandra_s / args.decisions:5.0f} us/decision",
                    flush=True,
                )
        report(figures, args)
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {KEYSPACE}", timeout=60)
        cluster.shutdown()


def report(figures: dict[str, Figures], args: argparse.Namespace) -> None:
    print(
        f"\nidempotency claims, {args.decisions} new ids per round, {args.concurrency} in flight, "
        f"medians of {args.rounds} rounds"
    )
    print(
        f"{'design':11s} {'decisions/s':>12s} {'Cassandra us':>13s} {'client us':>10s} "
        f"{'x chosen':>9s}"
    )
    base = statistics.median(figures["chosen"].cassandra_us)
    for name, f in figures.items():
        cassandra = statistics.median(f.cassandra_us)
        print(
            f"{name:11s} {statistics.median(f.rate):12.0f} {fmt_us(cassandra, 13)} "
            f"{fmt_us(statistics.median(f.client_us), 10)} {cassandra / base:8.2f}x"
        )


if __name__ == "__main__":
    main()
