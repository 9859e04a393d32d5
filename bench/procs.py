"""Starting and stopping the processes a benchmark measures."""

import asyncio
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

from bench.cpu import is_loopback, pid_listening_on
from deploy.local import services

ROOT = Path(__file__).resolve().parent.parent
SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(
    port: int,
    path: str = "/healthz",
    timeout_s: float = 60.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll until the server answers 200, or fail with what to look at (at once if it exited)."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}{path}"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the server (pid {proc.pid}) exited with {proc.returncode} before "
                f"{url} answered:\n{log_tail(log)}"
            )
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{log_tail(log)}")


def log_tail(log: Path | None, lines: int = 20) -> str:
    """The last lines of a child's log, to show why it failed."""
    if log is None or not log.exists():
        return "(no log)"
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in text) + f"\n(all of it in {log})"


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


def backend_pids() -> dict[str, int | None]:
    """The Kafka and Cassandra JVMs: from the pid files of deploy/local/services.py, else the
    local process listening on their configured address; None for servers elsewhere."""
    kafka, cassandra = services.servers(services.read_versions())
    paths = services.default_paths()
    pids: dict[str, int | None] = {}
    for server in (kafka, cassandra):
        pids[server.key] = None
        with contextlib.suppress(OSError, ValueError):
            pid = int(paths.pid_file(server).read_text().strip())
            if services.is_ours(pid, server, paths):
                pids[server.key] = pid
                continue
        address = services.external_address(server) or server.default_address
        for host, port in services.parse_addresses(address, server.standard_port):
            if pids[server.key] is None and is_loopback(host):
                pids[server.key] = pid_listening_on(port)
    return pids


async def drop_run_data(keyspace: str, topics: list[str]) -> None:
    """Drop a run's keyspace and topics: their compaction and retention would otherwise go on
    in the servers' background and into the CPU counted for the next run."""
    from aiokafka.admin import AIOKafkaAdminClient

    from service.adapters.cassandra_store import build_cluster
    from service.settings import Settings

    settings = Settings()
    cluster = build_cluster(settings.cassandra)
    try:
        session = await asyncio.to_thread(cluster.connect)
        await asyncio.to_thread(session.execute, f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    finally:
        await asyncio.to_thread(cluster.shutdown)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()
