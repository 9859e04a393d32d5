"""Kafka dies (SIGKILL, no clean shutdown) under load and is started again on its data.

While Kafka is away the gateway spools decisions to local disk and answers 200; when it is
back, the spool is replayed and the worker carries on from its committed offsets. Nothing
acknowledged may be lost, though the broker was killed without a flush.
"""

import asyncio
from pathlib import Path

from tests.faults.checks import Bounds
from tests.faults.scenario import Scenario, run_scenario
from tests.faults.servers import FaultServers, start_timeout

# As with a stall, the spool answers while Kafka is away: no caller needs a retry.
BOUNDS = Bounds(max_attempts=2, max_503=2)


async def restart_kafka(scenario: Scenario) -> None:
    servers = scenario.servers
    scenario.fault_starts(f"Kafka (pid {servers.pid(servers.kafka)}) SIGKILL")
    gone_s = await asyncio.to_thread(servers.kill_kafka)
    back_s = await asyncio.to_thread(servers.restart_kafka, start_timeout())
    scenario.note(
        f"Kafka gone {gone_s:.1f} s after SIGKILL; restarted on its data, ready {back_s:.1f} s "
        "later (a killed broker's registration must expire first: broker.session.timeout.ms)"
    )
    scenario.fault_ends("Kafka ready again")


async def test_kafka_restart(fault_servers: FaultServers, tmp_path: Path) -> None:
    await run_scenario("kafka_restart", fault_servers, tmp_path, restart_kafka, lambda _: BOUNDS)
