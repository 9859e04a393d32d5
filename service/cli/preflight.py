"""Checks before a long-running command starts, so a missing piece gets a sentence, not a trace."""

import socket
from collections.abc import Sequence
from pathlib import Path

import typer

from service.core.schema import SCHEMA_FILE
from service.hosts import parse_host_ports
from service.settings import Settings

REACH_TIMEOUT_S = 3.0


def require_models(models_dir: Path) -> None:
    """Exit with what to do when there is no model directory to serve."""
    if models_dir.is_dir() and any(models_dir.glob(f"*/{SCHEMA_FILE}")):
        return
    _fail(
        f"No model directory (with a {SCHEMA_FILE}) under {models_dir.resolve()}. Point "
        "SHAPSTREAM_MODELS_DIR at your models, run `shapstream model train-demo`, or turn an "
        "XGBoost file into one with `shapstream model init MODEL_FILE DIR`."
    )


def require_servers(settings: Settings) -> None:
    """Exit with what to do when Kafka or Cassandra does not accept connections."""
    kafka = settings.kafka.bootstrap
    cassandra = settings.cassandra.hosts
    checks = [
        ("Kafka", "SHAPSTREAM_KAFKA_BOOTSTRAP", kafka, parse_host_ports(kafka, 9092, "Kafka")),
        (
            "Cassandra",
            "SHAPSTREAM_CASSANDRA_HOSTS",
            cassandra,
            parse_host_ports(cassandra, 9042, "Cassandra"),
        ),
    ]
    for name, variable, value, points in checks:
        if not _any_reachable(points):
            _fail(
                f"{name} does not answer at {value} ({variable}). Start the local servers with "
                f"`make services`, or set {variable} to a running {name}."
            )


def _any_reachable(points: Sequence[tuple[str, int]]) -> bool:
    for host, port in points:
        try:
            with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
                return True
        except OSError:
            continue
    return False


def _fail(message: str) -> None:
    typer.echo(f"shapstream: {message}", err=True)
    raise typer.Exit(1)
