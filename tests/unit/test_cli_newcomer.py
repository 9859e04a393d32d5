"""A newcomer's path through the CLI: which store a command acts on, a failure to reach one as
a single line saying what to do, and help that shows plain flags and names the settings."""

import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from service.adapters.sqlite_store import DB_FILE
from service.cli import build_app
from service.cli.preflight import driver_errors_on_one_line
from service.cli.stores import store_settings

SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))
# Port 1 on loopback: nothing listens there, so a connection is refused at once.
NOWHERE = "127.0.0.1:1"
# Settings a user would change, that each command's --help must name.
NAMED_SETTINGS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("run",): ("SHAPSTREAM_DATA_DIR", "SHAPSTREAM_MODELS_DIR", "SHAPSTREAM_LOG_LEVEL"),
    ("serve",): (
        "SHAPSTREAM_KAFKA_BOOTSTRAP",
        "SHAPSTREAM_CASSANDRA_HOSTS",
        "SHAPSTREAM_CASSANDRA_KEYSPACE",
        "SHAPSTREAM_MODELS_DIR",
        "SHAPSTREAM_DATA_DIR",
        "SHAPSTREAM_SPOOL_DIR",
    ),
    ("worker",): (
        "SHAPSTREAM_KAFKA_BOOTSTRAP",
        "SHAPSTREAM_CASSANDRA_HOSTS",
        "SHAPSTREAM_MODELS_DIR",
        "SHAPSTREAM_WORKER_STALL_AFTER_S",
    ),
    ("db", "migrate"): (
        "SHAPSTREAM_CASSANDRA_HOSTS",
        "SHAPSTREAM_CASSANDRA_KEYSPACE",
        "SHAPSTREAM_RETENTION_DAYS",
    ),
    **{
        command: (
            "SHAPSTREAM_MODE",
            "SHAPSTREAM_DATA_DIR",
            "SHAPSTREAM_CASSANDRA_HOSTS",
            "SHAPSTREAM_CASSANDRA_KEYSPACE",
        )
        for command in [("keys", "create"), ("keys", "list"), ("keys", "revoke")]
    },
    **{
        command: ("SHAPSTREAM_MODE", "SHAPSTREAM_DATA_DIR", "SHAPSTREAM_CASSANDRA_HOSTS")
        for command in [
            ("audit", "export"),
            ("report", "importance"),
            ("report", "drift"),
            ("report", "reasons"),
            ("model", "freeze-reference"),
        ]
    },
}
# Commands that read no setting a user would change (files and options only).
READ_NO_SETTINGS = {
    ("audit", "verify"),
    ("model", "init"),
    ("model", "train-demo"),
}


def _commands(*, groups: bool = True) -> list[tuple[str, ...]]:
    """Every command (and group, the root being `()`) of the tree, as argv prefixes."""
    found: list[tuple[str, ...]] = []

    def walk(command: object, path: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands is None or groups:
            found.append(path)
        for name, sub in sorted((subcommands or {}).items()):
            walk(sub, (*path, name))

    walk(get_command(build_app()), ())
    return found


def _help(path: tuple[str, ...]) -> str:
    done = CliRunner().invoke(build_app(), [*path, "--help"], env={"COLUMNS": "120"})
    assert done.exit_code == 0, done.output
    return " ".join(done.output.split())


@pytest.fixture
def own_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment without any SHAPSTREAM_* of the caller (`make test` sets some); the
    state directory is a fresh one."""
    for name in list(os.environ):
        if name.upper().startswith("SHAPSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHAPSTREAM_DATA_DIR", str(tmp_path / "state"))
    return {**os.environ}


@pytest.fixture
def silent() -> Iterator[str]:
    """A loopback port that accepts connections and never answers, as host:port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def _shapstream(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SHAPSTREAM, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _said(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command ends with; nothing else is a traceback or a log."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    return done.stderr.strip().splitlines()[-1]


# --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "shapstream")
def test_flags_take_no_value_in_help(path: tuple[str, ...]) -> None:
    # typer 0.29 rendered every flag with its type, as if it took a value: `--help <bool>`.
    shown = _help(path)
    assert "<bool>" not in shown
    assert re.search(r"--help\s+Show this message", shown)


def test_a_boolean_option_is_a_plain_flag() -> None:
    assert re.search(r"--force\s+Overwrite --out if it exists", _help(("audit", "export")))


def test_every_command_is_checked_for_the_settings_it_names() -> None:
    # A new command must say which settings it reads, here and in its help.
    assert set(_commands(groups=False)) == set(NAMED_SETTINGS) | READ_NO_SETTINGS


@pytest.mark.parametrize("path", sorted(NAMED_SETTINGS), ids=" ".join)
def test_help_names_the_settings_a_command_reads(path: tuple[str, ...]) -> None:
    shown = _help(path)
    missing = [name for name in NAMED_SETTINGS[path] if name not in shown]
    assert not missing, f"`shapstream {' '.join(path)} --help` does not name {missing}"


@pytest.mark.parametrize("path", [("keys",), ("keys", "create"), ("audit",)], ids=" ".join)
def test_help_states_which_store_the_commands_use(path: tuple[str, ...]) -> None:
    shown = _help(path)
    assert "SHAPSTREAM_MODE" in shown
    assert "the embedded store when SHAPSTREAM_DATA_DIR holds one" in shown


# Which store ---------------------------------------------------------------------------------


def _embedded_database(own_env: dict[str, str]) -> None:
    state = Path(own_env["SHAPSTREAM_DATA_DIR"])
    state.mkdir(parents=True)
    (state / DB_FILE).touch()


@pytest.mark.usefixtures("own_env")
def test_without_an_embedded_database_the_commands_use_cassandra() -> None:
    assert store_settings().mode == "kafka"


def test_next_to_make_run_the_commands_use_its_state(own_env: dict[str, str]) -> None:
    _embedded_database(own_env)
    settings = store_settings()
    assert settings.mode == "embedded"
    assert settings.data_dir == Path(own_env["SHAPSTREAM_DATA_DIR"])


@pytest.mark.parametrize(
    ("variable", "value", "mode"),
    [
        ("SHAPSTREAM_MODE", "kafka", "kafka"),
        ("SHAPSTREAM_MODE", "embedded", "embedded"),
        ("SHAPSTREAM_CASSANDRA_HOSTS", "10.0.0.7:9042", "kafka"),
        ("SHAPSTREAM_CASSANDRA_KEYSPACE", "prod", "kafka"),
    ],
)
def test_a_named_store_wins_over_a_found_one(
    own_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, variable: str, value: str, mode: str
) -> None:
    _embedded_database(own_env)
    monkeypatch.setenv(variable, value)
    assert store_settings().mode == mode


def test_keys_act_on_the_state_of_make_run_unasked(own_env: dict[str, str]) -> None:
    runner, cli = CliRunner(), build_app()
    # The state `make run` leaves: an embedded database in SHAPSTREAM_DATA_DIR.
    made = runner.invoke(
        cli,
        ["keys", "create", "--name", "loan-ui", "--scopes", "predict"],
        env={"SHAPSTREAM_MODE": "embedded"},
    )
    assert made.exit_code == 0, made.output
    listed = runner.invoke(cli, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    assert "loan-ui  predict" in listed.stdout
    assert f"using the embedded store in {own_env['SHAPSTREAM_DATA_DIR']}" in listed.stderr


# Failures to reach a store, as one line --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "create", "--name", "loan-ui", "--scopes", "predict"],
        ["keys", "list"],
        ["keys", "revoke", "loan-ui"],
        [
            "audit",
            "export",
            "--start",
            "2026-03-01T00:00:00Z",
            "--end",
            "2026-03-02T00:00:00Z",
            "--out",
            "OUT",
        ],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_no_cassandra_is_one_line_naming_both_ways_out(
    own_env: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    argv = [str(tmp_path / "march.jsonl") if arg == "OUT" else arg for arg in args]
    done = _shapstream(argv, {**own_env, "SHAPSTREAM_CASSANDRA_HOSTS": NOWHERE})
    said = _said(done)
    assert said.startswith(f"shapstream: Cassandra at {NOWHERE} did not answer (Connection refused")
    assert "make services" in said
    assert "SHAPSTREAM_CASSANDRA_HOSTS" in said
    assert "SHAPSTREAM_MODE=embedded" in said
    assert done.stderr.splitlines() == [
        f"shapstream: using Cassandra at {NOWHERE}, keyspace shapstream",
        said,
    ]
    assert done.stdout == ""


def test_db_migrate_without_cassandra_is_one_line(own_env: dict[str, str]) -> None:
    done = _shapstream(["db", "migrate"], {**own_env, "SHAPSTREAM_CASSANDRA_HOSTS": NOWHERE})
    said = _said(done)
    assert said.startswith(f"shapstream: Cassandra at {NOWHERE} did not answer")
    assert done.stderr.strip() == said


def test_serve_whose_cassandra_never_answers_is_one_line(
    own_env: dict[str, str], silent: str
) -> None:
    # The port accepts (the pre-flight check passes) and never answers: the app's start-up
    # fails inside uvicorn, which would log the traceback.
    env = {
        **own_env,
        "SHAPSTREAM_KAFKA_BOOTSTRAP": silent,
        "SHAPSTREAM_CASSANDRA_HOSTS": silent,
        "SHAPSTREAM_CASSANDRA_REQUEST_TIMEOUT_S": "1",
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    said = _said(_shapstream(["serve", "--port", str(port)], env))
    assert said.startswith(f"shapstream: Cassandra at {silent} did not answer")
    assert "SHAPSTREAM_CASSANDRA_HOSTS" in said


def test_run_on_a_busy_port_stops_at_once(own_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = _shapstream(["run", "--port", str(port)], own_env)
        elapsed = time.monotonic() - started
    said = _said(done)
    assert done.stderr.strip() == said
    assert said.startswith(f"shapstream: Port {port} on 127.0.0.1 is in use")
    assert f"make run PORT={port + 1}" in said
    assert done.stdout == ""  # nothing started: no banner, no key
    assert not Path(own_env["SHAPSTREAM_DATA_DIR"]).exists()
    assert elapsed < 20


def test_run_whose_state_cannot_be_kept_is_one_line(
    own_env: dict[str, str], tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.touch()
    done = _shapstream(["run", "--port", "1"], {**own_env, "SHAPSTREAM_DATA_DIR": str(a_file)})
    said = _said(done)
    assert done.stderr.strip() == said
    assert "SHAPSTREAM_DATA_DIR" in said


def test_driver_errors_are_logged_without_their_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = logging.Handler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    driver_errors_on_one_line()
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        record = logging.getLogger("cassandra.cluster").makeRecord(
            "cassandra.cluster",
            logging.WARNING,
            __file__,
            1,
            "Error connecting to %s:",
            ("127.0.0.1:1",),
            sys.exc_info(),
        )
    assert handler.filter(record)
    assert record.exc_info is None
    assert record.getMessage() == "Error connecting to 127.0.0.1:1: Connection refused"


async def test_requests_go_to_the_app_once_it_has_started() -> None:
    import uvicorn
    from starlette.applications import Starlette

    from service.cli.serve import _StartupReport
    from service.settings import Settings

    app = Starlette()
    watcher = _StartupReport(app, Settings())
    config = uvicorn.Config(watcher)
    config.loaded_app = watcher  # as uvicorn's load() sets it, before the start-up
    watcher.hand_over_to_app(config)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await watcher({"type": "lifespan", "state": {}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert config.loaded_app is app
    assert watcher.failure is None
