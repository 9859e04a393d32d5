"""Long-running commands refuse to start with a sentence saying what to do, not a traceback."""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))
# Port 1 on loopback: nothing listens there, so a connection is refused at once.
NOWHERE = "127.0.0.1:1"


@pytest.fixture
def listening() -> Iterator[str]:
    """A loopback port that accepts connections (the check only connects), as host:port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def _refusal(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [SHAPSTREAM, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    return done.stderr


def test_no_models_says_how_to_get_one() -> None:
    said = _refusal(["run", "--port", "1"], {"SHAPSTREAM_MODELS_DIR": "/no/such/dir"})
    assert "SHAPSTREAM_MODELS_DIR" in said
    assert "shapstream model train-demo" in said


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_no_kafka_names_its_variable(command: str) -> None:
    said = _refusal([command], {"SHAPSTREAM_KAFKA_BOOTSTRAP": NOWHERE})
    assert "SHAPSTREAM_KAFKA_BOOTSTRAP" in said
    assert "make services" in said


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_no_cassandra_names_its_variable(command: str, listening: str) -> None:
    env = {"SHAPSTREAM_KAFKA_BOOTSTRAP": listening, "SHAPSTREAM_CASSANDRA_HOSTS": NOWHERE}
    said = _refusal([command], env)
    assert "SHAPSTREAM_CASSANDRA_HOSTS" in said
    assert "make services" in said
