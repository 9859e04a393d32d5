"""Kafka stalls for 10 s (SIGSTOP, then SIGCONT) under load.

The gateway waits at most SHAPSTREAM_KAFKA_SPOOL_AFTER_S (0.5 s) for an acknowledgement, then
spools that decision and every one after it to local disk and answers 200; the spool is
replayed when Kafka answers again. Callers should hardly notice the stall.
"""

import asyncio
from pathlib import Path

from tests.faults.checks import Bounds
from tests.faults.scenario import Scenario, run_scenario
from tests.faults.servers import FaultServers
from tests.faults.stored import gateway_spool

STALL_S = 10.0
# Spooling keeps answering 200: no caller needs a retry, and a 503 or two (a decision caught
# by its deadline while the stall began) is the most the spool may let through.
BOUNDS = Bounds(max_attempts=2, max_503=2)


async def stall_kafka(scenario: Scenario) -> None:
    servers = scenario.servers
    with servers.pausing(servers.kafka):
        scenario.fault_starts(f"Kafka (pid {servers.pid(servers.kafka)}) SIGSTOP")
        await asyncio.sleep(STALL_S / 2)
        scenario.note(f"gateway /readyz mid-stall: {await gateway_spool(scenario.stack)}")
        await asyncio.sleep(STALL_S / 2)
    scenario.fault_ends("Kafka SIGCONT")


async def test_kafka_stall(fault_servers: FaultServers, tmp_path: Path) -> None:
    await run_scenario("kafka_stall", fault_servers, tmp_path, stall_kafka, lambda _: BOUNDS)
