"""One scenario's gateway and worker processes, on a keyspace and topics of their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.load import Client
from tests.faults.servers import FaultServers

ROOT = Path(__file__).resolve().parents[2]
SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
# Ports for gateways and workers: below Linux's ephemeral range, so nothing else takes a
# killed gateway's port before its successor binds it.
PORT_RANGE = (28000, 28999)


class StackFailed(Exception):
    """A gateway, worker or command of the scenario failed; the message says where to look."""


def free_port(taken: Collection[int] = ()) -> int:
    """A free loopback port in PORT_RANGE, none of `taken` (ports chosen but not bound yet)."""
    low, high = PORT_RANGE
    start = random.randint(low, high)
    for offset in range(high - low + 1):
        port = low + (start - low + offset) % (high - low + 1)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise StackFailed(f"no free port in {low}-{high} on 127.0.0.1")


def log_tail(log: Path, lines: int = 30) -> str:
    if not log.is_file():
        return f"(no log at {log})"
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in text) + f"\n  (whole log: {log})"


@dataclass
class Process:
    """A gateway or worker this scenario started."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    killed: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Stack:
    """The scenario's settings, key and processes."""

    name: str
    work: Path
    env: dict[str, str]
    keyspace: str
    topic: str
    group: str
    gateway_port: int
    worker_port: int
    key: str = ""
    processes: list[Process] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=dict)

    @property
    def spool_dir(self) -> Path:
        return Path(self.env["SHAPSTREAM_SPOOL_DIR"])

    @property
    def logs(self) -> list[Path]:
        return [p.log for p in self.processes]

    def where(self) -> str:
        """Where to look when something failed: every log of the scenario."""
        return "logs: " + ", ".join(str(log) for log in self.logs)

    def client(self) -> Client:
        return Client("127.0.0.1", self.gateway_port, {"Authorization": f"Bearer {self.key}"})

    def run(self, *args: str, timeout_s: float = 120.0) -> str:
        """A `shapstream` command with the scenario's settings; its stdout."""
        done = subprocess.run(
            [SHAPSTREAM, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise StackFailed(
                f"`shapstream {' '.join(args)}` failed with exit code {done.returncode}:\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def spawn(self, name: str, *args: str) -> Process:
        """Start `shapstream ARGS` in the background, its output in NAME-N.log."""
        count = self._counts[name] = self._counts.get(name, 0) + 1
        log = self.work / f"{name}-{count}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [SHAPSTREAM, *args],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = Process(f"{name}-{count}", popen, log)
        self.processes.append(process)
        return process

    async def start_gateway(self) -> Process:
        process = self.spawn("gateway", "serve", "--port", str(self.gateway_port))
        await wait_ready(process, self.gateway_port)
        # The 200 must be this gateway's: its readiness names its spool (a worker's probes, or
        # anything else on the port, would send the whole load elsewhere).
        client = Client("127.0.0.1", self.gateway_port, {})
        try:
            answer = await client.request("GET", "/readyz", timeout_s=5.0)
        finally:
            await client.close()
        if b'"spool"' not in answer.body:
            raise StackFailed(
                f"port {self.gateway_port} answers, but not as {process.name}: {answer.body!r}"
                f"\n{log_tail(process.log)}"
            )
        return process

    async def start_worker(self) -> Process:
        process = self.spawn("worker", "worker", "--metrics-port", str(self.worker_port))
        await wait_ready(process, self.worker_port)
        return process

    def kill(self, process: Process) -> None:
        """SIGKILL: no shutdown, no flush, nothing finished."""
        process.killed = True
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait()

    def stop(self) -> None:
        """SIGTERM every process still running; SIGKILL what outlives the grace period."""
        running = [p for p in self.processes if p.alive()]
        for process in running:
            process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            try:
                process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()


def prepare(servers: FaultServers, work: Path, name: str) -> Stack:
    """A keyspace and topics of the scenario's own (migrated), and a key; nothing running."""
    suffix = uuid.uuid4().hex[:8]
    keyspace = f"faults_{name}_{suffix}"
    topic = f"faults-{name}-{suffix}"
    spool = work / "spool"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAPSTREAM_")}
    env.update(
        {
            "SHAPSTREAM_KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
            "SHAPSTREAM_CASSANDRA_HOSTS": servers.cassandra_hosts,
            "SHAPSTREAM_CASSANDRA_KEYSPACE": keyspace,
            "SHAPSTREAM_KAFKA_TOPIC": topic,
            "SHAPSTREAM_KAFKA_DEAD_LETTER_TOPIC": f"{topic}-dead-letter",
            "SHAPSTREAM_KAFKA_GROUP_ID": f"faults-{name}-{suffix}",
            "SHAPSTREAM_SPOOL_DIR": str(spool),
            "SHAPSTREAM_DATA_DIR": str(work / "data"),
            "SHAPSTREAM_MODELS_DIR": str(ROOT / "models"),
            "SHAPSTREAM_LOG_LEVEL": "WARNING",
        }
    )
    gateway_port = free_port()
    stack = Stack(
        name=name,
        work=work,
        env=env,
        keyspace=keyspace,
        topic=topic,
        group=env["SHAPSTREAM_KAFKA_GROUP_ID"],
        gateway_port=gateway_port,
        # Never the gateway's: both are chosen before either binds. The same port once made the
        # worker's probe server answer the gateway's requests (404 "Not Found" from Starlette).
        worker_port=free_port(taken={gateway_port}),
    )
    stack.run("db", "migrate")
    scopes = "predict,explanations:read"
    stack.key = stack.run("keys", "create", "--name", f"faults-{name}", "--scopes", scopes).strip()
    return stack


async def http_status(port: int, path: str) -> int | None:
    """The status of GET path on 127.0.0.1:port, or None when nothing answers."""
    client = Client("127.0.0.1", port, {})
    try:
        answer = await client.request("GET", path, timeout_s=2.0)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return None
    finally:
        await client.close()
    return answer.status


async def wait_ready(process: Process, port: int) -> None:
    """Poll GET /readyz until 200; fail at once if the process exits, with its log."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not process.alive():
            raise StackFailed(
                f"{process.name} exited with {process.popen.returncode} before it was "
                f"ready:\n{log_tail(process.log)}"
            )
        if await http_status(port, "/readyz") == 200:
            return
        await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        process.popen.kill()
    raise StackFailed(
        f"{process.name} was not ready (GET /readyz on port {port}) within "
        f"{START_TIMEOUT_S:.0f} s:\n{log_tail(process.log)}"
    )
