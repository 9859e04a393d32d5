"""Starting and stopping the processes a benchmark measures."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(port: int, path: str = "/healthz", timeout_s: float = 60.0) -> None:
    """Poll until the server answers 200, or fail with what to look at."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}{path}"
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s; see the bench logs")


@contextlib.contextmanager
def running(
    args: list[str], env: Mapping[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process for the duration of the block, then stop it (SIGTERM, then SIGKILL)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            yield proc
        finally:
            stop(proc)


def create_key(env: Mapping[str, str], name: str, scopes: str = "predict") -> str:
    """A new key from `shapstream keys create`, in the store that `env` points at."""
    done = subprocess.run(
        [SHAPSTREAM, "keys", "create", "--name", name, "--scopes", scopes],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return done.stdout.strip()


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
