"""Cassandra stalls for 10 s (SIGSTOP, then SIGCONT) under load.

A new caller id needs a quorum read of its claim, so the gateway cannot decide it: it answers
503 fast (0.5 s deadline per Cassandra call, then a circuit breaker) with Retry-After and the
transaction id, and keeps accepting the API key it verified before. Decisions already answered
are not lost: the worker retries its writes until Cassandra answers again.
"""

import asyncio
from pathlib import Path

from tests.faults.checks import Bounds, Timeline
from tests.faults.scenario import Scenario, attempts_for, run_scenario
from tests.faults.servers import FaultServers

STALL_S = 10.0


def bounds(timeline: Timeline) -> Bounds:
    # A caller arriving as the stall begins retries every second until it ends and for the
    # 5 s the gateway may take to recover: 17 attempts at most.
    return Bounds(max_attempts=attempts_for(STALL_S))


async def stall_cassandra(scenario: Scenario) -> None:
    servers = scenario.servers
    with servers.pausing(servers.cassandra):
        scenario.fault_starts(f"Cassandra (pid {servers.pid(servers.cassandra)}) SIGSTOP")
        await asyncio.sleep(STALL_S)
    scenario.fault_ends("Cassandra SIGCONT")


async def test_cassandra_stall(fault_servers: FaultServers, tmp_path: Path) -> None:
    await run_scenario("cassandra_stall", fault_servers, tmp_path, stall_cassandra, bounds)
