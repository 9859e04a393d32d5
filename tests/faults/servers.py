"""The fault suite's own Kafka and Cassandra: signalled at will, never the shared servers.

Same versions, jars and configuration as `make services` (deploy/local/services.py), on other
ports and in another run dir, so stopping, killing and restarting them cannot disturb any
other test, and the suite works the same when the shared servers are someone else's cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from deploy.local import services

# Below Linux's ephemeral range (32768+), so no outgoing connection can hold one of them while
# Kafka is down between a kill and its restart.
PORTS = services.Ports(
    kafka=29092,
    kafka_controller=29093,
    cassandra=29042,
    cassandra_storage=27000,
    cassandra_ssl_storage=27001,
    cassandra_jmx=27199,
)
# Another session of the fault suite in this checkout runs its servers in the same run dir on
# the same ports: wait for it this long (two at once on two cores would miss every bound).
LOCK_WAIT_S = 120.0


class ServersFailed(Exception):
    """The fault suite's servers could not be started; the message says what to do."""


@dataclass
class FaultServers:
    """A running Kafka and Cassandra of the suite's own, and how to hurt them."""

    kafka: services.Server
    cassandra: services.Server
    paths: services.Paths
    processes: dict[str, services.Running] = field(default_factory=dict)
    # Servers stopped with SIGSTOP: resumed before anything else is sent to them.
    paused: set[str] = field(default_factory=set)

    @property
    def kafka_bootstrap(self) -> str:
        return f"{services.HOST}:{self.kafka.port}"

    @property
    def cassandra_hosts(self) -> str:
        return f"{services.HOST}:{self.cassandra.port}"

    def pid(self, server: services.Server) -> int:
        return self.processes[server.key].pid

    def pause(self, server: services.Server) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing (a stall)."""
        os.killpg(self.pid(server), signal.SIGSTOP)
        self.paused.add(server.key)

    def resume(self, server: services.Server) -> None:
        """SIGCONT after `pause`."""
        os.killpg(self.pid(server), signal.SIGCONT)
        self.paused.discard(server.key)

    @contextlib.contextmanager
    def pausing(self, server: services.Server) -> Iterator[None]:
        """Paused for the block, resumed after it even when the block fails."""
        self.pause(server)
        try:
            yield
        finally:
            if server.key in self.paused:
                self.resume(server)

    def kill_kafka(self) -> float:
        """SIGKILL Kafka (no clean shutdown); returns the seconds until the process was gone."""
        started = time.monotonic()
        process = self.processes[self.kafka.key]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGKILL)
        self.paused.discard(self.kafka.key)
        if not services.wait_gone(process, 30.0):
            raise ServersFailed(f"Kafka (pid {process.pid}) survived SIGKILL for 30 s")
        return time.monotonic() - started

    def restart_kafka(self, deadline_s: float) -> float:
        """Start Kafka again on the data of its killed run; the seconds until it is ready."""
        started = time.monotonic()
        try:
            self.processes[self.kafka.key] = services.start_local(
                self.kafka, self.paths, deadline_s, fresh=False
            )
        except services.ServiceError as error:
            raise ServersFailed(failure_text(self, [self.kafka], error)) from error
        return time.monotonic() - started

    def stop(self) -> list[str]:
        """Stop both (resumed first: a stopped process cannot act on SIGTERM)."""
        reports: list[str] = []
        for server in (self.kafka, self.cassandra):
            # Ours from this session (its Popen reaps it), else one an earlier session left.
            process = self.processes.get(server.key) or services.running(server, self.paths)
            if process is None or not process.alive():
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGCONT)
            reports.append(services.terminate(server, self.paths, process))
        self.paused.clear()
        self.processes.clear()
        return reports


def start_timeout() -> float:
    """Seconds a server may take to be ready (SHAPSTREAM_SERVICES_TIMEOUT, as `make services`)."""
    return services.default_timeout()


def run_paths() -> services.Paths:
    """The jar cache of `make services`; a run dir of the suite's own beside its run dir."""
    shared = services.default_paths()
    return services.Paths(cache=shared.cache, run=shared.run / "faults")


@contextlib.contextmanager
def session_lock(paths: services.Paths, say: Callable[[str], None]) -> Iterator[None]:
    """One fault-suite session per checkout at a time; others wait for it."""
    paths.run.mkdir(parents=True, exist_ok=True)
    lock_path = paths.run.parent / "faults.lock"
    with lock_path.open("a+") as handle:
        acquire(handle, lock_path, say)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def acquire(handle: IO[str], lock_path: Path, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + LOCK_WAIT_S
    next_note = time.monotonic()
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ServersFailed(
                    f"another fault-suite session holds {lock_path} (pid "
                    f"{lock_path.read_text().strip() or '?'}) for over {LOCK_WAIT_S:.0f} s; let "
                    "it finish or stop it, then run the tests again"
                ) from None
            if time.monotonic() >= next_note:
                say(f"waiting for another fault-suite session to finish ({lock_path})")
                next_note += 30.0
            time.sleep(1.0)


def failure_text(servers: FaultServers, failed: list[services.Server], error: BaseException) -> str:
    """What went wrong, the end of the failed servers' logs, and what to do."""
    parts = [f"the fault suite's own servers could not start: {error}"]
    # Only a server that was launched and then failed has logs of this session to show.
    shown = failed if isinstance(error, services.ServerFailedError) and error.show_logs else []
    for server in shown:
        for log in (servers.paths.server_log(server), servers.paths.console_log(server)):
            if log.is_file() and log.stat().st_size:
                text = services.tail(log.read_text(errors="replace"), 25)
                parts.append(f"----- last lines of {log} -----\n{text}")
    parts.append(
        "What to do: read the log lines above, if any (every log is under "
        f"{servers.paths.run}); check that ports {', '.join(map(str, ports_of(servers)))} on "
        f"{services.HOST} are free (`ss -ltnp`), that Java 17 and Maven work (`.venv/bin/python "
        "deploy/local/services.py fetch`), and on a slow machine raise the deadline with "
        f"{services.TIMEOUT_ENV}=300."
    )
    return "\n".join(parts)


def ports_of(servers: FaultServers) -> list[int]:
    return [*servers.kafka.ports, *servers.cassandra.ports]


def start_servers(say: Callable[[str], None]) -> FaultServers:
    """Kafka and Cassandra on fresh data, started side by side; ready when this returns."""
    services.quiet_client_logs()
    kafka, cassandra = services.servers(services.read_versions(), PORTS)
    paths = run_paths()
    servers = FaultServers(kafka, cassandra, paths)
    leftovers = servers.stop()  # of an earlier session that died without stopping them
    for line in leftovers:
        say(f"leftover of an earlier fault-suite session: {line}")
    deadline_s = start_timeout()
    abort = threading.Event()
    errors: dict[str, BaseException] = {}

    def bring_up(server: services.Server) -> None:
        try:
            servers.processes[server.key] = services.start_local(server, paths, deadline_s, abort)
        except BaseException as error:
            errors[server.key] = error
            abort.set()

    threads = [threading.Thread(target=bring_up, args=(s,)) for s in (kafka, cassandra)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real = {k: e for k, e in errors.items() if not isinstance(e, services.AbortedError)}
    if real:
        failed = [s for s in (kafka, cassandra) if s.key in real]
        message = failure_text(servers, failed, next(iter(real.values())))
        servers.stop()
        raise ServersFailed(message)
    return servers
