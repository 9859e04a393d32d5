"""Checks before a command starts, and its failures to reach Kafka, Cassandra or the embedded
store, each turned into one sentence saying what to do (exit 1), never a traceback."""

import errno
import logging
import os
import socket
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from service.core.schema import SCHEMA_FILE
from service.errors import BusUnavailable, StoreUnavailable
from service.hosts import parse_host_ports
from service.settings import Settings

REACH_TIMEOUT_S = 3.0
# Longer error texts (a driver's per-host report) are cut: the line says what to do, not all.
SUMMARY_CHARS = 160
DRIVER_LOGGERS = ("cassandra", "aiokafka")

log = logging.getLogger(__name__)


def require_models(models_dir: Path) -> None:
    """Exit with what to do when there is no model directory to serve."""
    if models_dir.is_dir() and any(models_dir.glob(f"*/{SCHEMA_FILE}")):
        return
    fail(
        f"No model directory (with a {SCHEMA_FILE}) under {models_dir.resolve()}. Point "
        "SHAPSTREAM_MODELS_DIR at your models, run `shapstream model train-demo`, or turn an "
        "XGBoost file into one with `shapstream model init MODEL_FILE DIR`."
    )


def require_servable_models(settings: Settings, *, optional: bool = False) -> None:
    """Exit naming the problem unless every model directory loads and the default is settled.

    A broken directory stops the start (serving the others would answer its callers "unknown
    model"). The directories are loaded first in a child process (service/core/model_check.py),
    so a model file that crashes xgboost's C++ costs the child and is named here. `optional`:
    no model directory at all is fine (a worker loads versions from the store).
    """
    models_dir = settings.models_dir
    if optional and not (models_dir.is_dir() and any(models_dir.glob(f"*/{SCHEMA_FILE}"))):
        return
    from service.core.model_check import check_models_dir

    problem = check_models_dir(models_dir, settings.default_model)
    if problem is not None:
        fail("Not starting: " + " ".join(problem.split()))


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
            fail(
                f"{name} does not answer at {value} ({variable}). Start the local servers with "
                f"`make services`, or set {variable} to a running {name}."
            )


def require_data_dir(data_dir: Path) -> None:
    """Exit with what to do when the embedded state cannot be kept in `data_dir`."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    problem = "is not a directory" if not existing.is_dir() else "is not writable"
    fail(
        f"The embedded state cannot be kept in {data_dir}: {existing} {problem}. Set "
        "SHAPSTREAM_DATA_DIR to a directory you can write."
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for the server, or exit at once when that is taken.

    Bound before anything starts, so a port in use costs one line, not a start-up of the
    models, the store and the worker followed by a failure.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a restart does not wait for the previous run's connections to time out.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            fail(
                f"Port {port} on {host} is in use (another shapstream?). Stop what listens "
                f"there, or choose another port: --port, or `make run PORT={port + 1}`."
            )
        fail(f"Cannot listen on {host}:{port} ({error.strerror}). Choose another --host/--port.")
    sock.set_inheritable(True)
    return sock


@contextmanager
def reported(settings: Settings, hint: str = "") -> Iterator[None]:
    """Within: a failure to reach Kafka, Cassandra or the embedded store exits with one line
    saying what to do (then `hint`); any other error goes on as it is."""
    try:
        yield
    except _reach_errors() as error:
        said = unreachable(error, settings)
        if said is None:
            raise
        # The traceback stays within reach: SHAPSTREAM_LOG_LEVEL=DEBUG where logging is set up.
        log.debug("gave up: %s", said, exc_info=error)
        fail(said + hint)


def unreachable(error: BaseException, settings: Settings) -> str | None:
    """What to do about `error`, if it is a failure to reach one of the servers or stores."""
    cassandra, kafka = _cassandra_errors(), _kafka_errors()
    summary = _summary(error)
    if isinstance(error, cassandra) or (
        isinstance(error, StoreUnavailable) and settings.mode == "kafka"
    ):
        hosts = settings.cassandra.hosts
        return (
            f"Cassandra at {hosts} did not answer ({summary}). Start it (`make services`), or "
            "set SHAPSTREAM_CASSANDRA_HOSTS to a running one."
        )
    if isinstance(error, (*kafka, BusUnavailable)):
        bootstrap = settings.kafka.bootstrap
        return (
            f"Kafka at {bootstrap} did not answer ({summary}). Start it (`make services`), or "
            "set SHAPSTREAM_KAFKA_BOOTSTRAP to a running one."
        )
    # Locked, unopenable, read-only, a failing disk, or not a database: not the caller's bug.
    if isinstance(error, sqlite3.OperationalError | StoreUnavailable) or (
        type(error) is sqlite3.DatabaseError
    ):
        return (
            f"The embedded store in {settings.data_dir} cannot be used ({summary}). Stop the "
            "process that holds it, if any, or set SHAPSTREAM_DATA_DIR to another directory."
        )
    if isinstance(error, OSError) and _under(error.filename, settings.data_dir):
        return (
            f"Cannot use {error.filename} ({error.strerror}). Set SHAPSTREAM_DATA_DIR to a "
            "directory you can write."
        )
    return None


def driver_errors_on_one_line() -> None:
    """Log the Kafka and Cassandra clients' errors as their type and text, not a traceback.

    Their tracebacks run through the clients' own connection code and say nothing more: while
    a server is away they only bury the line that says what to do (see `unreachable`).
    """
    flatten = _FlattenDriverErrors()
    for handler in logging.getLogger().handlers:
        handler.addFilter(flatten)


class _FlattenDriverErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.split(".", 1)[0] in DRIVER_LOGGERS:
            error = record.exc_info[1]
            if error is not None:
                record.msg = f"{record.getMessage().rstrip(': ')}: {_summary(error)}"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        return True


def fail(message: str) -> NoReturn:
    """Say `message` on stderr, prefixed with the command's name, and exit 1."""
    typer.echo(f"shapstream: {message}", err=True)
    raise typer.Exit(1)


def _reach_errors() -> tuple[type[BaseException], ...]:
    return (
        *_cassandra_errors(),
        *_kafka_errors(),
        StoreUnavailable,
        BusUnavailable,
        sqlite3.DatabaseError,
        OSError,
    )


def _cassandra_errors() -> tuple[type[BaseException], ...]:
    # Imported here: a command that never talks to Cassandra does not pay for its driver.
    from cassandra import DriverException, RequestExecutionException
    from cassandra.cluster import NoHostAvailable

    return (NoHostAvailable, DriverException, RequestExecutionException)


def _kafka_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError,)


def _summary(error: BaseException) -> str:
    """The error's type and first line; for the driver's "no host", the first host's error."""
    per_host = getattr(error, "errors", None)
    if isinstance(per_host, dict) and per_host:
        inner = next(iter(per_host.values()))
        if isinstance(inner, BaseException):
            error = inner
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    said = text if text.startswith(name) else f"{name}: {text}" if text else name
    return said if len(said) <= SUMMARY_CHARS else said[: SUMMARY_CHARS - 3] + "..."


def _under(filename: object, directory: Path) -> bool:
    if not isinstance(filename, str | os.PathLike):
        return False
    path, root = Path(filename).absolute(), directory.absolute()
    return path == root or root in path.parents


def _any_reachable(points: Sequence[tuple[str, int]]) -> bool:
    for host, port in points:
        try:
            with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
                return True
        except OSError:
            continue
    return False
