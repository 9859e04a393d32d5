"""Shared fixtures for the integration tests: they run against real Kafka and Cassandra.

The servers come from `make services` (deploy/local/services.py) or from wherever
SHAPSTREAM_KAFKA_BOOTSTRAP / SHAPSTREAM_CASSANDRA_HOSTS point. A server that does not answer
fails the test: integration tests never turn into skips.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from service.hosts import parse_host_ports

KAFKA_ENV = "SHAPSTREAM_KAFKA_BOOTSTRAP"
CASSANDRA_ENV = "SHAPSTREAM_CASSANDRA_HOSTS"
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:19092"
DEFAULT_CASSANDRA_HOSTS = "127.0.0.1:19042"
REACH_TIMEOUT_S = 5.0

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration carries the `integration` marker."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


def require_reachable(name: str, env_var: str, addresses: list[tuple[str, int]]) -> None:
    errors: list[str] = []
    for host, port in addresses:
        try:
            with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
                return
        except OSError as error:
            errors.append(f"{host}:{port}: {error}")
    pytest.fail(
        f"{name} is not reachable ({'; '.join(errors) or 'no address'}; from {env_var} or its "
        f"default). Start them with `make services`, or point {env_var} at a running {name} "
        "(host:port,...).",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Kafka bootstrap servers, 'host:port[,host:port...]'; fails if Kafka does not answer."""
    value = os.environ.get(KAFKA_ENV, "").strip() or DEFAULT_KAFKA_BOOTSTRAP
    require_reachable("Kafka", KAFKA_ENV, parse_host_ports(value, 9092, "Kafka"))
    return value


@pytest.fixture(scope="session")
def cassandra_contact() -> list[tuple[str, int]]:
    """Cassandra contact points as (host, port); fails if Cassandra does not answer."""
    value = os.environ.get(CASSANDRA_ENV, "").strip() or DEFAULT_CASSANDRA_HOSTS
    contact = parse_host_ports(value, 9042, "Cassandra")
    require_reachable("Cassandra", CASSANDRA_ENV, contact)
    return contact
