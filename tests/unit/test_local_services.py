"""deploy/local/services.py runs a second pair of servers on other ports, and restarts Kafka
on its data (the fault suite's needs), while `make services` keeps its defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local import services

OTHER = services.Ports(
    kafka=39092,
    kafka_controller=39093,
    cassandra=39042,
    cassandra_storage=37000,
    cassandra_ssl_storage=37001,
    cassandra_jmx=37199,
)


def test_default_ports_are_those_of_make_services() -> None:
    kafka, cassandra = services.servers(services.read_versions())
    assert (kafka.port, kafka.ports) == (19092, (19092, 19093))
    assert (cassandra.port, cassandra.ports) == (19042, (19042, 17000, 17199))
    assert kafka.default_address == "127.0.0.1:19092"


def test_other_ports_reach_every_listener() -> None:
    kafka, cassandra = services.servers(services.read_versions(), OTHER)
    assert (kafka.port, kafka.ports) == (39092, (39092, 39093))
    assert (cassandra.port, cassandra.ports) == (39042, (39042, 37000, 37199))
    paths = services.Paths(cache=Path("/cache"), run=Path("/run"))
    properties = services.cassandra_system_properties(paths, cassandra)
    assert "-Dcassandra.jmx.local.port=37199" in properties
    assert "-Dcom.sun.management.jmxremote.rmi.port=37199" in properties


def test_kafka_restart_needs_the_data_of_an_earlier_start(tmp_path: Path) -> None:
    kafka, _ = services.servers(services.read_versions(), OTHER)
    paths = services.Paths(cache=tmp_path / "cache", run=tmp_path / "run")
    with pytest.raises(services.ServiceError, match="no data of an earlier start"):
        services.launch_kafka(kafka, paths, tmp_path, "java", fresh=False)


def test_cassandra_is_never_restarted_on_its_data(tmp_path: Path) -> None:
    _, cassandra = services.servers(services.read_versions(), OTHER)
    paths = services.Paths(cache=tmp_path / "cache", run=tmp_path / "run")
    with pytest.raises(services.ServiceError, match="unsafesystem"):
        services.launch_cassandra(cassandra, paths, tmp_path, "java", fresh=False)
