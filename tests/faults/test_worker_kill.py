"""An explainer worker dies (SIGKILL) under load; a new one takes over its partitions.

Deciding does not depend on workers: callers see nothing. The dead worker's uncommitted batch
is redelivered to its successor, and a record written twice is still one record.
"""

from pathlib import Path

from tests.faults.checks import Bounds
from tests.faults.scenario import Scenario, run_scenario
from tests.faults.servers import FaultServers

# Callers never depend on a worker: not one 503, not one retry.
BOUNDS = Bounds(max_attempts=1, max_503=0)


async def kill_worker(scenario: Scenario) -> None:
    stack = scenario.stack
    worker = next(p for p in stack.processes if p.name.startswith("worker") and p.alive())
    scenario.fault_starts(f"{worker.name} (pid {worker.popen.pid}) SIGKILL")
    stack.kill(worker)
    successor = await stack.start_worker()
    scenario.fault_ends(f"{successor.name} ready (in the consumer group)")
    taken = scenario.timeline.fault_end - scenario.timeline.fault_start
    scenario.note(f"{successor.name} was ready {taken:.1f} s after the kill")


async def test_worker_kill(fault_servers: FaultServers, tmp_path: Path) -> None:
    await run_scenario("worker_kill", fault_servers, tmp_path, kill_worker, lambda _: BOUNDS)
