"""docker-compose.yml runs the same server versions, on the same host ports, as services.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def read_versions() -> dict[str, str]:
    lines = (REPO / "deploy" / "versions.env").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture(scope="module")
def services() -> ModuleType:
    """deploy/local/services.py, imported without running anything (it is a script)."""
    spec = importlib.util.spec_from_file_location(
        "shapstream_local_services", REPO / "deploy" / "local" / "services.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (REPO / "docker-compose.yml").open() as handle:
        loaded: dict[str, Any] = yaml.safe_load(handle)
    return loaded


def published_host_ports(service: dict[str, Any]) -> set[int]:
    """Host ports of 'host_ip:published:target' / 'published:target' port entries."""
    return {int(str(entry).split(":")[-2]) for entry in service["ports"]}


@pytest.mark.parametrize(
    ("service", "image", "version_key"),
    [("kafka", "apache/kafka", "KAFKA_VERSION"), ("cassandra", "cassandra", "CASSANDRA_VERSION")],
)
def test_image_tags_match_versions_env(
    compose: dict[str, Any], service: str, image: str, version_key: str
) -> None:
    assert compose["services"][service]["image"] == f"{image}:{read_versions()[version_key]}"


def test_script_reads_the_same_versions(services: ModuleType) -> None:
    kafka, cassandra = services.servers(services.read_versions())
    versions = read_versions()
    assert (kafka.version, cassandra.version) == (
        versions["KAFKA_VERSION"],
        versions["CASSANDRA_VERSION"],
    )


def test_published_ports_match_script_defaults(
    compose: dict[str, Any], services: ModuleType
) -> None:
    kafka, cassandra = compose["services"]["kafka"], compose["services"]["cassandra"]
    assert published_host_ports(kafka) == {services.KAFKA_PORT}
    assert published_host_ports(cassandra) == {services.CASSANDRA_PORT}
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert advertised == f"PLAINTEXT://{services.HOST}:{services.KAFKA_PORT}"


@pytest.mark.parametrize("service", ["kafka", "cassandra"])
def test_every_service_has_a_health_check(compose: dict[str, Any], service: str) -> None:
    assert compose["services"][service]["healthcheck"]["test"]


def test_the_image_carries_the_system_libraries_the_frameworks_link() -> None:
    """The runtime stage of the Dockerfile (python:3.11-slim) installs the OpenMP runtime that
    LightGBM's library links from the system: without it the image cannot import lightgbm."""
    import lightgbm

    library = Path(lightgbm.__file__).parent / "lib" / "lib_lightgbm.so"
    linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True)
    system_gomp = [
        line
        for line in linked.stdout.splitlines()
        if "libgomp.so.1" in line and ".libs" not in line
    ]
    assert system_gomp, "lightgbm no longer links the system libgomp: revisit the Dockerfile"
    runtime_stage = (REPO / "Dockerfile").read_text().rsplit("FROM ", 1)[1]
    assert "libgomp1" in runtime_stage
