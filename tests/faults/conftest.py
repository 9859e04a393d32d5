"""The fault suite: real gateways and workers under load while their dependencies fail.

It runs its own Kafka and Cassandra (tests/faults/servers.py), started once for the package
and stopped after its last test, so its signals never reach the servers other tests use.
Every test here carries the `faults` marker. A server that cannot start fails the tests with
what to do; they never skip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.scenario import say
from tests.faults.servers import FaultServers, ServersFailed, run_paths, session_lock, start_servers

HERE = Path(__file__).resolve().parent
# Per test: waiting for another session's servers, starting ours (first test), one scenario.
TIMEOUT_S = 480


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/faults carries the `faults` marker (and a longer timeout)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.timeout(TIMEOUT_S))


@pytest.fixture(scope="package")
def fault_servers() -> Iterator[FaultServers]:
    """Kafka and Cassandra of the suite's own, on fresh data; stopped after the last test."""
    with contextlib.ExitStack() as cleanup:
        try:
            cleanup.enter_context(session_lock(run_paths(), say))
            servers = start_servers(say)
        except ServersFailed as error:
            failure = str(error)
        else:
            failure = ""
        if failure:
            pytest.fail(failure, pytrace=False)
        cleanup.callback(stop, servers)
        yield servers


def stop(servers: FaultServers) -> None:
    for line in servers.stop():
        say(line)
