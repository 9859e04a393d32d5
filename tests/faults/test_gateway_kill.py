"""A gateway dies (SIGKILL) while its spool holds decisions; a new one starts on that spool.

Kafka is stalled first (SIGSTOP) so the gateway spools; then the gateway is killed, Kafka
resumes, and a new gateway starts on the same port and the same SHAPSTREAM_SPOOL_DIR: it
replays what the dead one left there. Requests in flight at the kill lose their connection and
are retried with the same id: each is still decided once.
"""

import asyncio
import time
from pathlib import Path

from tests.faults.checks import Bounds, Timeline
from tests.faults.scenario import Scenario, attempts_for, run_scenario
from tests.faults.servers import FaultServers
from tests.faults.stack import StackFailed
from tests.faults.stored import gateway_spool

# Decisions the gateway must hold in its spool before it is killed.
SPOOLED_AT_LEAST = 100
SPOOL_WAIT_S = 15.0


def bounds(timeline: Timeline) -> Bounds:
    # Callers retry every second while no gateway listens; no 503 beyond that.
    down_s = sum(end - start for start, end in timeline.gateway_down)
    return Bounds(max_attempts=attempts_for(down_s), max_503=2)


async def wait_spooled(scenario: Scenario, at_least: int) -> int:
    deadline = time.monotonic() + SPOOL_WAIT_S
    while time.monotonic() < deadline:
        ready = await gateway_spool(scenario.stack)
        if ready is not None and ready["spool"]["events"] >= at_least:
            return int(ready["spool"]["events"])
        await asyncio.sleep(0.1)
    raise StackFailed(
        f"the gateway did not spool {at_least} decisions within {SPOOL_WAIT_S:.0f} s of a Kafka "
        f"stall (last /readyz: {await gateway_spool(scenario.stack)}); {scenario.stack.where()}"
    )


async def kill_gateway_with_spool(scenario: Scenario) -> None:
    servers, stack = scenario.servers, scenario.stack
    gateway = next(p for p in stack.processes if p.name.startswith("gateway") and p.alive())
    with servers.pausing(servers.kafka):
        scenario.fault_starts("Kafka SIGSTOP, so that the gateway spools")
        spooled = await wait_spooled(scenario, SPOOLED_AT_LEAST)
        killed = time.monotonic()
        stack.kill(gateway)
        scenario.note(
            f"{gateway.name} (pid {gateway.popen.pid}) SIGKILL at {scenario.timeline.at(killed)} "
            f"holding {spooled}+ spooled decisions"
        )
    successor = await stack.start_gateway()
    ready = time.monotonic()
    scenario.timeline.gateway_down.append((killed, ready))
    replaying = await gateway_spool(stack)
    scenario.note(
        f"{successor.name} ready on the same port and spool {ready - killed:.1f} s after the "
        f"kill; its /readyz then: {replaying}"
    )
    scenario.fault_ends(f"{successor.name} ready")


async def test_gateway_kill(fault_servers: FaultServers, tmp_path: Path) -> None:
    await run_scenario("gateway_kill", fault_servers, tmp_path, kill_gateway_with_spool, bounds)
