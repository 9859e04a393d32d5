"""A server refuses to start on models it cannot serve: exit 1, one line naming the problem.

One broken model directory among several stops the start (serving the others would answer its
callers "unknown model"), and so does an unsettled default model. Before, an empty model file
aborted the process (SIGABRT, exit 134) with no file named, and the default was silently the
first directory by name.
"""

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from service.core.schema import SCHEMA_FILE

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "german-credit"
SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))


@pytest.fixture
def listening() -> Iterator[str]:
    """A loopback port that accepts connections (the server checks only connect), host:port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def add_model(models: Path, name: str) -> Path:
    directory = models / name
    shutil.copytree(DEMO, directory)
    schema = orjson.loads((directory / SCHEMA_FILE).read_bytes())
    schema["name"] = name
    (directory / SCHEMA_FILE).write_bytes(orjson.dumps(schema))
    return directory


def refusal(args: list[str], env: dict[str, str]) -> str:
    """The one line a refused start says on stderr (exit 1, nothing on stdout)."""
    done = subprocess.run(
        [SHAPSTREAM, *args, "--port", str(free_port())],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    shutil.copytree(DEMO, directory / "german-credit")
    return directory


def test_run_names_the_broken_model_file(models: Path, tmp_path: Path) -> None:
    broken = add_model(models, "breast-cancer")
    (broken / "model.json").write_bytes(b"")
    env = {
        "SHAPSTREAM_MODELS_DIR": str(models),
        "SHAPSTREAM_DEFAULT_MODEL": "german-credit",
        "SHAPSTREAM_DATA_DIR": str(tmp_path / "data"),
    }
    said = refusal(["run"], env)
    assert said == (
        f"shapstream: Not starting: {broken / 'model.json'} is empty (0 bytes), not an "
        "XGBoost model"
    )


def test_serve_names_the_broken_model_file(models: Path, tmp_path: Path, listening: str) -> None:
    broken = add_model(models, "other")
    (broken / "model.json").write_bytes((DEMO / "model.json").read_bytes()[:1000])
    env = {
        "SHAPSTREAM_MODELS_DIR": str(models),
        "SHAPSTREAM_DEFAULT_MODEL": "german-credit",
        "SHAPSTREAM_KAFKA_BOOTSTRAP": listening,
        "SHAPSTREAM_CASSANDRA_HOSTS": listening,
        "SHAPSTREAM_DATA_DIR": str(tmp_path / "data"),
    }
    said = refusal(["serve"], env)
    assert said.startswith(f"shapstream: Not starting: {broken / 'model.json'} is truncated JSON")


def test_several_models_need_a_named_default(models: Path, tmp_path: Path) -> None:
    add_model(models, "breast-cancer")
    env = {"SHAPSTREAM_MODELS_DIR": str(models), "SHAPSTREAM_DATA_DIR": str(tmp_path / "data")}
    said = refusal(["run"], env)
    assert said == (
        "shapstream: Not starting: 2 models are served (breast-cancer, german-credit) and none "
        "is named the default: set SHAPSTREAM_DEFAULT_MODEL, or write its name in the models "
        "directory's default-model file"
    )
    said = refusal(["run"], {**env, "SHAPSTREAM_DEFAULT_MODEL": "german"})
    assert "the default model 'german' (SHAPSTREAM_DEFAULT_MODEL" in said
    assert "is not a served model" in said
