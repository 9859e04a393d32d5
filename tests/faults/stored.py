"""What a scenario left behind: the worker's backlog, Cassandra's rows, the gateway's answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from cassandra.query import SimpleStatement

from service.adapters.cassandra_store import build_cluster
from service.settings import CassandraSettings
from tests.faults.load import Answer, Client
from tests.faults.stack import Stack, log_tail

DRAIN_TIMEOUT_S = 120.0
PAGE_ROWS = 1000
EXPLANATION_WAIT_S = 5.0
READ_CONCURRENCY = 16


class DrainFailed(Exception):
    """The gateway's spool or the worker's backlog did not empty in time."""


@dataclass(frozen=True)
class ByTxnRow:
    model_version: str
    prediction: Any
    decided_at: datetime


@dataclass(frozen=True)
class ByDayRow:
    model_version: str
    day: date
    bucket: int
    decided_at: datetime


@dataclass(frozen=True)
class ClaimRow:
    request_hash: str
    response: bytes


@dataclass
class Stored:
    """Every row of the scenario's keyspace that the checks look at, by transaction id."""

    by_txn: dict[str, list[ByTxnRow]]
    by_day: dict[str, list[ByDayRow]]
    claims: dict[str, ClaimRow]
    # GET /v1/explanations/{txn}?wait=... for each transaction answered 200.
    explanations: dict[str, Answer]


async def gateway_spool(stack: Stack) -> dict[str, Any] | None:
    """The gateway's /readyz body, or None when it does not answer."""
    client = Client("127.0.0.1", stack.gateway_port, {})
    try:
        answer = await client.request("GET", "/readyz", timeout_s=2.0)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return None
    finally:
        await client.close()
    body: dict[str, Any] = orjson.loads(answer.body)
    return body


class Backlog:
    """Events of the scenario's topic not yet committed by its consumer group."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self._topic = topic
        self._group = group
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="faults-drain")
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="faults-drain"
        )

    async def __aenter__(self) -> Backlog:
        await self._admin.start()
        await self._consumer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def events(self) -> tuple[int, int]:
        """(events not committed yet, events in the topic)."""
        described = await self._admin.describe_topics([self._topic])
        numbers = [p["partition"] for t in described for p in t["partitions"]]
        if not numbers:
            raise DrainFailed(f"topic {self._topic} has no partitions: {described}")
        partitions = [TopicPartition(self._topic, n) for n in sorted(numbers)]
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(partitions)
        committed = await self._admin.list_consumer_group_offsets(self._group)
        behind = 0
        for tp, end in ends.items():
            done = committed.get(tp)
            behind += end - (done.offset if done is not None and done.offset >= 0 else 0)
        return behind, sum(ends.values())


async def drain(stack: Stack, bootstrap: str, say: Callable[[str], None]) -> tuple[float, int]:
    """Wait until the gateway's spool is empty and the worker committed every event; the
    seconds that took, and the events in the topic."""
    started = time.monotonic()
    deadline = started + DRAIN_TIMEOUT_S
    next_note = started + 5.0
    async with Backlog(bootstrap, stack.topic, stack.group) as backlog:
        while True:
            ready = await gateway_spool(stack)
            spooled = None if ready is None else ready["spool"]["events"]
            behind, total = await backlog.events()
            if spooled == 0 and not ready_spooling(ready) and behind == 0:
                return time.monotonic() - started, total
            now = time.monotonic()
            if now >= deadline:
                tails = "\n".join(
                    f"{p.name}:\n{log_tail(p.log, 5)}" for p in stack.processes if p.alive()
                )
                raise DrainFailed(
                    f"not drained after {DRAIN_TIMEOUT_S:.0f} s: gateway /readyz {ready}, "
                    f"{behind} of {total} events not committed by group {stack.group}; "
                    f"the last log lines:\n{tails}"
                )
            if now >= next_note:
                say(f"draining: spool {spooled}, {behind} of {total} events not committed")
                next_note += 5.0
            await asyncio.sleep(0.5)


def ready_spooling(ready: dict[str, Any] | None) -> bool:
    return ready is None or bool(ready["spooling"])


def _rows(session: Any, cql: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = list(session.execute(SimpleStatement(cql, fetch_size=PAGE_ROWS)))
    return rows


def read_tables(hosts: str, keyspace: str) -> tuple[Any, Any, Any]:
    """Whole tables of the scenario's fresh keyspace (a few thousand rows each)."""
    cluster = build_cluster(CassandraSettings(hosts=hosts, keyspace=keyspace))
    try:
        session = cluster.connect()
        # A claim lives in its decision's by-transaction row (request_hash, response): a row
        # with a claim and no record (no record_hash) would be a stranded claim.
        by_txn = _rows(
            session,
            "SELECT txn_id, model_version, prediction, decided_at, record_hash, request_hash, "
            f"response FROM {keyspace}.decisions_by_txn",
        )
        by_day = _rows(
            session,
            "SELECT model_version, day, bucket, decided_at, txn_id "
            f"FROM {keyspace}.decisions_by_day",
        )
        claims = [row for row in by_txn if row["request_hash"] is not None]
        by_txn = [row for row in by_txn if row["record_hash"] is not None]
    finally:
        cluster.shutdown()
    return by_txn, by_day, claims


async def explanations(stack: Stack, txns: Iterable[str]) -> dict[str, Answer]:
    """GET each transaction's explanation through the gateway, as a client would."""
    client = stack.client()
    limit = asyncio.Semaphore(READ_CONCURRENCY)
    found: dict[str, Answer] = {}

    async def one(txn: str) -> None:
        async with limit:
            path = f"/v1/explanations/{txn}?wait={EXPLANATION_WAIT_S:g}"
            found[txn] = await client.request("GET", path, timeout_s=EXPLANATION_WAIT_S + 5)

    try:
        await asyncio.gather(*(one(txn) for txn in txns))
    finally:
        await client.close()
    return found


async def read_stored(stack: Stack, hosts: str, answered: Iterable[str]) -> Stored:
    """Cassandra's rows and the gateway's explanations, read side by side."""
    tables = asyncio.to_thread(read_tables, hosts, stack.keyspace)
    (by_txn_rows, by_day_rows, claim_rows), got = await asyncio.gather(
        tables, explanations(stack, answered)
    )
    by_txn: dict[str, list[ByTxnRow]] = {}
    for row in by_txn_rows:
        by_txn.setdefault(row["txn_id"], []).append(
            ByTxnRow(row["model_version"], orjson.loads(row["prediction"]), row["decided_at"])
        )
    by_day: dict[str, list[ByDayRow]] = {}
    for row in by_day_rows:
        by_day.setdefault(row["txn_id"], []).append(
            ByDayRow(row["model_version"], row["day"].date(), row["bucket"], row["decided_at"])
        )
    claims = {row["txn_id"]: ClaimRow(row["request_hash"], row["response"]) for row in claim_rows}
    return Stored(by_txn, by_day, claims, got)
