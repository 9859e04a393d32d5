"""One fault scenario from start to verdict, shared by every test of the suite.

Timeline: a gateway and a worker of the scenario's own start; open-loop load begins; after
PRE_FAULT_S the fault runs (it marks its own start and end); load goes on for POST_FAULT_S
after the fault's end; then every caller finishes its retries, the spool and the worker's
backlog drain, and the checks judge the attempts and what was stored.

Rate: 50 new decisions per second, the smallest that shows every behaviour clearly. A 10 s
fault catches 500 callers (a Cassandra stall then sheds 2,700-3,600 retries, up to ~500
requests/s at its end), the 5 s recovery window holds 250 first attempts (its p99 is their
third slowest), and the stack (two JVMs, gateway, worker, this client) leaves headroom on the
two shared cores, so latency measures the fault rather than CPU contention. At 100/s the stack
alone took most of both cores here (Cassandra ~65 %, Kafka ~35 %, gateway and worker ~20 %
each, plus other people's tests), and the p99 of one-second windows reached 350 ms with no
fault at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.core.schema import SCHEMA_FILE, ModelSchema
from tests.api_client import MODELS, german_rows
from tests.faults.checks import Bounds, Timeline, Verdict, judge
from tests.faults.load import RETRIED, Load, Policy, Transaction
from tests.faults.servers import FaultServers, ServersFailed
from tests.faults.stack import Stack, StackFailed, log_tail, prepare
from tests.faults.stored import DrainFailed, drain, read_stored

RATE_PER_S = 50.0
PRE_FAULT_S = 5.0
POST_FAULT_S = 10.0
PROGRESS_EVERY_S = 5.0
# One request in this many carries missing values (null features).
WITH_NULLS_EVERY = 5
LOG_PROBLEM = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b")


def say(message: str) -> None:
    """A progress line (shown with `pytest -s`, captured otherwise)."""
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Scenario:
    """What a fault needs: the servers and processes to hurt, and the clock to mark."""

    name: str
    servers: FaultServers
    stack: Stack
    timeline: Timeline
    load: Load

    def fault_starts(self, what: str) -> None:
        self.timeline.fault_start = time.monotonic()
        say(f"{self.name}: fault at {self.timeline.at(self.timeline.fault_start)}: {what}")

    def fault_ends(self, what: str) -> None:
        self.timeline.fault_end = time.monotonic()
        say(f"{self.name}: fault over at {self.timeline.at(self.timeline.fault_end)}: {what}")

    def note(self, text: str) -> None:
        self.timeline.notes.append(text)
        say(f"{self.name}: {text}")


Fault = Callable[[Scenario], Awaitable[None]]
# A scenario's bounds, from its timeline: some faults last as long as a restart takes.
BoundsOf = Callable[[Timeline], Bounds]


def attempts_for(fault_s: float, retry_s: float = Policy().retry_s) -> int:
    """Attempts a caller may need: one per retry interval while the fault lasts and while the
    service may still be recovering (Bounds.recovery_s), plus two (the first, and the one
    that succeeds)."""
    return math.ceil((fault_s + Bounds.recovery_s) / retry_s) + 2


def request_bodies(prefix: str) -> Callable[[int], tuple[str, bytes]]:
    """Decision i: its own transaction id and a German-credit applicant, some with nulls."""
    rows = german_rows()
    # Only features the demo model lets be missing: a required one null is a 422.
    schema = ModelSchema.model_validate_json((MODELS / "german-credit" / SCHEMA_FILE).read_bytes())
    optional = sorted(f.name for f in schema.features if f.nullable)

    def make(index: int) -> tuple[str, bytes]:
        txn = f"{prefix}-{index:06d}"
        features: dict[str, Any] = dict(rows[index % len(rows)])
        if index % WITH_NULLS_EVERY == 0:
            chosen = random.Random(index).sample(optional, k=2)
            features.update(dict.fromkeys(chosen))
        return txn, orjson.dumps({"transaction_id": txn, "features": features})

    return make


async def report_progress(scenario: Scenario) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        timeline = scenario.timeline
        now = time.monotonic()
        phase = (
            "before the fault"
            if now < timeline.fault_start
            else "FAULT"
            if now < timeline.fault_end
            else "after the fault"
        )
        counts = scenario.load.snapshot()
        say(f"{scenario.name} {timeline.at(now)} {phase}: {counts}")


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def run_scenario(
    name: str, servers: FaultServers, work: Path, fault: Fault, bounds: BoundsOf
) -> None:
    """Run the timeline around `fault`; fail the test with every broken guarantee."""
    try:
        verdict, stack = await _run(name, servers, work, fault, bounds)
    except (StackFailed, DrainFailed, ServersFailed) as error:
        failure = f"{name}: {error}"
    else:
        failure = ""
    if failure:
        pytest.fail(failure, pytrace=False)
    lines = [f"{name}:"] + [f"  {key}: {value}" for key, value in verdict.figures.items()]
    say("\n".join(lines))
    if verdict.failures:
        failures = "\n".join(f"- {failure}" for failure in verdict.failures)
        pytest.fail(
            f"{name}: {len(verdict.failures)} guarantees broken:\n{failures}\n"
            + "\n".join(lines)
            + f"\n{stack.where()}; every attempt: {work / 'attempts.jsonl'}",
            pytrace=False,
        )


async def _run(
    name: str, servers: FaultServers, work: Path, fault: Fault, bounds: BoundsOf
) -> tuple[Verdict, Stack]:
    stack = await asyncio.to_thread(prepare, servers, work, name)
    try:
        await asyncio.gather(stack.start_worker(), stack.start_gateway())
        prefix = f"{name.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        client = stack.client()
        load = Load(client, Policy(rate_per_s=RATE_PER_S), request_bodies(prefix))
        scenario = Scenario(name, servers, stack, Timeline(), load)
        sending = asyncio.create_task(load.run())
        progress = asyncio.create_task(report_progress(scenario))
        try:
            await asyncio.sleep(0)  # the load's clock starts now
            scenario.timeline.started = load.started or time.monotonic()
            await sleep_until(scenario.timeline.started + PRE_FAULT_S)
            await fault(scenario)
            await sleep_until(scenario.timeline.fault_end + POST_FAULT_S)
            load.stop_sending()
            say(f"{name}: no new decisions; waiting for the callers' retries")
            transactions = await sending
        finally:
            load.stop_sending()
            progress.cancel()
            if not sending.done():
                sending.cancel()
            for task in (progress, sending):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await client.close()
        record_attempts(work / "attempts.jsonl", scenario.timeline, transactions)
        verdict = Verdict()
        check_processes(stack, verdict)
        drained_s, events = await drain(stack, servers.kafka_bootstrap, say)
        answered = [t.txn for t in transactions if t.ok is not None]
        stored = await read_stored(stack, servers.cassandra_hosts, answered)
        judged = judge(transactions, scenario.timeline, bounds(scenario.timeline), stored)
        judged.failures[:0] = verdict.failures
        judged.figures["drained after the load"] = f"{drained_s:.1f} s"
        judged.figures["events in Kafka (copies included)"] = str(events)
        unfinished = [t for t in transactions if t.final is None or t.final.status in RETRIED]
        judged.figures["callers still retrying at the end"] = str(len(unfinished))
        judged.figures.update(log_problems(stack))
        return judged, stack
    finally:
        stack.stop()


def record_attempts(path: Path, timeline: Timeline, transactions: list[Transaction]) -> None:
    """Every attempt as a JSON line (times in seconds from the load's start), for post-mortems."""
    start = timeline.started
    with path.open("wb") as out:
        marks = {
            "fault_start": timeline.fault_start - start,
            "fault_end": timeline.fault_end - start,
            "gateway_down": [(a - start, b - start) for a, b in timeline.gateway_down],
            "notes": timeline.notes,
        }
        out.write(orjson.dumps({"timeline": marks}) + b"\n")
        for t in transactions:
            for a in t.attempts:
                line = {
                    "txn": t.txn,
                    "attempt": a.number,
                    "sent": round(a.sent - start, 4),
                    "latency": round(a.latency_s, 4),
                    "status": a.status,
                    "error": a.error,
                    "retry_after": a.retry_after,
                    "body": a.body[:300].decode(errors="replace"),
                }
                out.write(orjson.dumps(line) + b"\n")


def check_processes(stack: Stack, verdict: Verdict) -> None:
    """Every gateway and worker not killed on purpose is still running."""
    for process in stack.processes:
        if not process.killed and not process.alive():
            verdict.fail(
                f"{process.name} exited by itself with code {process.popen.returncode}:\n"
                f"{log_tail(process.log)}"
            )


def log_problems(stack: Stack) -> dict[str, str]:
    """ERROR lines and tracebacks in the processes' logs (WARNING level and up)."""
    found: dict[str, str] = {}
    for process in stack.processes:
        if not process.log.is_file():
            continue
        lines = process.log.read_text(errors="replace").splitlines()
        bad = [line[:200] for line in lines if LOG_PROBLEM.search(line)]
        warnings = sum(" WARNING " in line for line in lines)
        summary = f"{warnings} warnings, {len(bad)} errors"
        if bad:
            summary += f" (first: {bad[0]})"
        found[f"log {process.name}"] = summary
    return found
