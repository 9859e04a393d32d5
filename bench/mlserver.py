"""MLServer 1.7.1 with its XGBoost runtime, the reference server of the gateway benchmark.

    .venv/bin/python -m bench.mlserver     # install it (once) and print where

It is installed into a virtualenv of its own outside the checkout
(${SHAPSTREAM_CACHE_DIR:-~/.cache/shapstream}/mlserver-1.7.1/venv), made with the Python that
runs the project, and reused while its stamp file matches what would be installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import orjson

from deploy.local.services import default_paths

VERSION = "1.7.1"
REQUIREMENTS = (f"mlserver=={VERSION}", f"mlserver-xgboost=={VERSION}")
PIP_TAIL_LINES = 30
# pip's lines worth echoing as progress (and downloads of megabytes, which take a while).
_PROGRESS = ("Collecting ", "Installing collected", "Successfully installed")


class InstallFailed(Exception):
    """The install did not complete; the message says what to look at and what to do."""


def home() -> Path:
    return default_paths().cache / f"mlserver-{VERSION}"


def _stamp_text() -> str:
    python = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return f"python {python}\n" + "\n".join(REQUIREMENTS) + "\n"


def ensure_installed(say: Callable[[str], None] = print) -> Path:
    """The `mlserver` executable, installing MLServer first unless the stamp says it is there."""
    root = home()
    venv = root / "venv"
    binary = venv / "bin" / "mlserver"
    stamp = root / "complete"
    if stamp.is_file() and stamp.read_text() == _stamp_text() and binary.exists():
        return binary
    say(f"installing {' '.join(REQUIREMENTS)} into {venv} (once; a few minutes)")
    stamp.unlink(missing_ok=True)
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "pip.log"
    _run([sys.executable, "-m", "venv", str(venv)], log, say, append=False)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off"]
    _run([*pip, *REQUIREMENTS], log, say, append=True)
    if not binary.exists():
        raise InstallFailed(f"pip finished but {binary} is missing; see {log}")
    stamp.write_text(_stamp_text())
    say(f"MLServer {VERSION} installed: {binary}")
    return binary


def _run(command: list[str], log: Path, say: Callable[[str], None], append: bool) -> None:
    """Run an install step, logging all of it and echoing the package names as they come."""
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=PIP_TAIL_LINES)
    with log.open("a" if append else "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            tail.append(line.rstrip())
            text = line.strip()
            big_download = text.startswith("Downloading") and "MB" in text
            if big_download or text.startswith(_PROGRESS):
                say(f"  [{time.monotonic() - started:4.0f} s] {text[:150]}")
        code = proc.wait()
    if code != 0:
        text = "\n".join(f"  | {t}" for t in tail)
        raise InstallFailed(
            f"installing MLServer failed (exit {code}); the end of {log}:\n{text}\n"
            "What to do: check that PyPI is reachable (pip's index settings, a proxy), then run "
            "the benchmark again (it starts the install over), or pass --skip-mlserver to "
            f"compare without it. To start from scratch: rm -rf {home()}"
        )


def write_repository(
    model_file: Path, dest: Path, name: str, http_port: int, grpc_port: int, metrics_port: int
) -> Path:
    """A model repository serving `model_file` as `name`, with inference in the server process."""
    model_dir = dest / name
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, model_dir / "model.json")
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        # Inference in the server process, like the other servers measured (no worker pool).
        "parallel_workers": 0,
        "model_repository_root": str(dest),
        "load_models_at_startup": True,
        # Not needed for scoring: no metrics endpoint, no compression, no Kafka, no tracing.
        "metrics_endpoint": None,
        "gzip_enabled": False,
        "kafka_enabled": False,
    }
    model_settings = {
        "name": name,
        "implementation": "mlserver_xgboost.XGBoostModel",
        "parameters": {"uri": "./model.json", "version": "v1"},
    }
    (dest / "settings.json").write_bytes(orjson.dumps(settings, option=orjson.OPT_INDENT_2))
    (model_dir / "model-settings.json").write_bytes(
        orjson.dumps(model_settings, option=orjson.OPT_INDENT_2)
    )
    return dest


def infer_body(row: list[float]) -> bytes:
    """A V2 inference request for one row of FP32 features."""
    tensor = {"name": "input-0", "shape": [1, len(row)], "datatype": "FP32", "data": row}
    return orjson.dumps({"inputs": [tensor]})


def infer_path(name: str) -> str:
    return f"/v2/models/{name}/infer"


def main() -> None:
    try:
        print(ensure_installed(lambda m: print(m, file=sys.stderr, flush=True)))
    except InstallFailed as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
