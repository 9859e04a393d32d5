"""Real Apache Kafka and Apache Cassandra for local runs and the integration tests.

    .venv/bin/python deploy/local/services.py fetch    # jars from Maven Central into the cache
    .venv/bin/python deploy/local/services.py start    # both servers, fresh data, wait until ready
    .venv/bin/python deploy/local/services.py stop     # SIGTERM, grace period, SIGKILL
    .venv/bin/python deploy/local/services.py status   # running / ready per server
    .venv/bin/python deploy/local/services.py env      # `export ...` lines for `eval`

No Docker: the servers run as plain `java` processes on 127.0.0.1 from jars that Maven fetches
once into ${SHAPSTREAM_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/shapstream}. Versions come from
deploy/versions.env, config templates from deploy/local/{kafka,cassandra}/. Pid files, logs and
data live in ${SHAPSTREAM_RUN_DIR:-<repo>/.run}. Set SHAPSTREAM_KAFKA_BOOTSTRAP and/or
SHAPSTREAM_CASSANDRA_HOSTS (host:port,...) to use existing servers instead: `start` then only
checks that they answer. SHAPSTREAM_SERVICES_TIMEOUT (seconds, default 180) bounds the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VERSIONS_FILE = REPO / "deploy" / "versions.env"

HOST = "127.0.0.1"
# The ports of `make services` (and of docker-compose.yml); another `Ports` runs a second pair.
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093
CASSANDRA_PORT = 19042
CASSANDRA_STORAGE_PORT = 17000
CASSANDRA_SSL_STORAGE_PORT = 17001  # configured so nothing points at 7001; not opened
CASSANDRA_JMX_PORT = 17199

KAFKA_ENV = "SHAPSTREAM_KAFKA_BOOTSTRAP"
CASSANDRA_ENV = "SHAPSTREAM_CASSANDRA_HOSTS"
TIMEOUT_ENV = "SHAPSTREAM_SERVICES_TIMEOUT"
DEFAULT_TIMEOUT_S = 180.0
STOP_GRACE_S = 20.0
PROGRESS_EVERY_S = 5.0
POLL_EVERY_S = 0.5
LOG_TAIL_LINES = 40

MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
KAFKA_LOG_BACKEND = (
    ("org.slf4j", "slf4j-reload4j", "1.7.36"),
    ("ch.qos.reload4j", "reload4j", "1.2.25"),
)
PROBE_TOPIC = "shapstream-readiness-probe"
PROBE_GROUP = "shapstream-readiness-probe"
RUN_MARKER = ".shapstream-run"

Address = tuple[str, int]


class ServiceError(Exception):
    """A failure with a message that tells the user what to do."""


class AbortedError(Exception):
    """Raised in one server's thread when another server failed."""


@dataclass(frozen=True)
class Ports:
    """Where one Kafka and one Cassandra listen on HOST; the defaults are `make services`'s.

    Another set runs a second, independent pair next to it (the fault-injection tests do).
    """

    kafka: int = KAFKA_PORT
    kafka_controller: int = KAFKA_CONTROLLER_PORT
    cassandra: int = CASSANDRA_PORT
    cassandra_storage: int = CASSANDRA_STORAGE_PORT
    cassandra_ssl_storage: int = CASSANDRA_SSL_STORAGE_PORT
    cassandra_jmx: int = CASSANDRA_JMX_PORT


DEFAULT_PORTS = Ports()


@dataclass(frozen=True)
class Server:
    key: str
    title: str
    version: str
    env_var: str
    port: int
    standard_port: int
    # Every port the server listens on (checked free before a start, closed after a stop).
    ports: tuple[int, ...]
    artifacts: tuple[tuple[str, str, str], ...]
    # The whole port set of its pair, for its configuration (controller, storage, JMX ports).
    layout: Ports = DEFAULT_PORTS

    @property
    def default_address(self) -> str:
        return f"{HOST}:{self.port}"


@dataclass(frozen=True)
class Paths:
    cache: Path
    run: Path

    def cache_dir(self, server: Server) -> Path:
        return self.cache / f"{server.key}-{server.version}"

    def lib(self, server: Server) -> Path:
        return self.cache_dir(server) / "lib"

    def run_dir(self, server: Server) -> Path:
        return self.run / server.key

    def conf(self, server: Server) -> Path:
        return self.run_dir(server) / "conf"

    def data(self, server: Server) -> Path:
        return self.run_dir(server) / "data"

    def logs(self, server: Server) -> Path:
        return self.run_dir(server) / "logs"

    def server_log(self, server: Server) -> Path:
        return self.logs(server) / "server.log"

    def console_log(self, server: Server) -> Path:
        return self.logs(server) / "console.log"

    def pid_file(self, server: Server) -> Path:
        return self.run / f"{server.key}.pid"


@dataclass
class Running:
    """A server process this script manages: launched now, or found through its pid file."""

    pid: int
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)


# --------------------------------------------------------------------------- configuration


def say(message: str) -> None:
    print(message, flush=True)


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ServiceError(f"{path}: expected KEY=VALUE, got {raw!r}")
            versions[key.strip()] = value.strip()
    return versions


def servers(versions: dict[str, str], ports: Ports = DEFAULT_PORTS) -> tuple[Server, Server]:
    """Kafka and Cassandra as this script runs them, on `ports`."""
    try:
        kafka_version, cassandra_version = versions["KAFKA_VERSION"], versions["CASSANDRA_VERSION"]
    except KeyError as missing:
        raise ServiceError(f"{VERSIONS_FILE} lacks {missing}") from None
    kafka = Server(
        key="kafka",
        title="Kafka",
        version=kafka_version,
        env_var=KAFKA_ENV,
        port=ports.kafka,
        standard_port=9092,
        ports=(ports.kafka, ports.kafka_controller),
        artifacts=(("org.apache.kafka", "kafka_2.13", kafka_version), *KAFKA_LOG_BACKEND),
        layout=ports,
    )
    cassandra = Server(
        key="cassandra",
        title="Cassandra",
        version=cassandra_version,
        env_var=CASSANDRA_ENV,
        port=ports.cassandra,
        standard_port=9042,
        ports=(ports.cassandra, ports.cassandra_storage, ports.cassandra_jmx),
        artifacts=(("org.apache.cassandra", "cassandra-all", cassandra_version),),
        layout=ports,
    )
    return kafka, cassandra


def default_paths() -> Paths:
    cache = os.environ.get("SHAPSTREAM_CACHE_DIR")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = str(Path(xdg) / "shapstream")
    run = os.environ.get("SHAPSTREAM_RUN_DIR") or str(REPO / ".run")
    return Paths(cache=Path(cache).expanduser().resolve(), run=Path(run).expanduser().resolve())


def default_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ServiceError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def external_address(server: Server) -> str | None:
    value = os.environ.get(server.env_var, "").strip()
    return value or None


def parse_addresses(value: str, default_port: int) -> list[Address]:
    """'h1:p1,h2' -> [('h1', p1), ('h2', default_port)]; IPv6 as [addr]:port."""
    addresses: list[Address] = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        match = re.fullmatch(
            r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:]+)(?::(?P<p>\d+))?", item
        )
        if match is None:
            raise ServiceError(f"cannot parse {item!r} as host:port")
        host = match["v6"] or match["h"]
        port = match["p6"] or match["p"]
        addresses.append((host, int(port) if port else default_port))
    if not addresses:
        raise ServiceError(f"no host:port in {value!r}")
    return addresses


def env_lines(kafka: Server, cassandra: Server) -> list[str]:
    return [
        f"export {server.env_var}={shlex.quote(external_address(server) or server.default_address)}"
        for server in (kafka, cassandra)
    ]


# --------------------------------------------------------------------------- fetch


def render_pom(server: Server) -> str:
    dependencies = "\n".join(
        "    <dependency>"
        f"<groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version>"
        "</dependency>"
        for group, artifact, version in server.artifacts
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/local/services.py from deploy/versions.env: only the dependencies. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.shapstream</groupId>
  <artifactId>{server.key}-server</artifactId>
  <version>{server.version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise fetches of one server between processes (two CI jobs on one machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tail(text: str, lines: int = LOG_TAIL_LINES, width: int = 400) -> str:
    """The last lines, each cut to `width` (Cassandra logs its whole config on one line)."""
    cut = (line if len(line) <= width else line[:width] + " [...]" for line in text.splitlines())
    return "\n".join(list(cut)[-lines:])


def maven() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Maven (mvn) is not on PATH: install it (e.g. `apt-get install maven`).")
    return mvn


def fetch(server: Server, paths: Paths) -> Path:
    """The server's runtime jars, fetched by Maven on first use; returns the lib directory."""
    cache, lib = paths.cache_dir(server), paths.lib(server)
    pom = render_pom(server)
    stamp, digest = cache / ".fetched", hashlib.sha256(pom.encode()).hexdigest()
    with file_lock(cache / ".lock"):
        if lib.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
            return lib
        say(
            f"fetching {server.title} {server.version} jars from Maven Central (first time only)..."
        )
        started = time.monotonic()
        stamp.unlink(missing_ok=True)
        partial = cache / "lib.partial"
        for stale in (lib, partial):
            shutil.rmtree(stale, ignore_errors=True)
        (cache / "pom.xml").write_text(pom)
        run_maven(cache / "pom.xml", partial, server)
        partial.rename(lib)
        stamp.write_text(digest + "\n")
        jars = list(lib.glob("*.jar"))
        size_mb = sum(jar.stat().st_size for jar in jars) / 1e6
        say(
            f"{server.title} {server.version}: {len(jars)} jars ({size_mb:.0f} MB) fetched in "
            f"{time.monotonic() - started:.1f} s into {lib}"
        )
        return lib


def run_maven(pom: Path, output: Path, server: Server) -> None:
    command = [
        maven(),
        "-B",
        "-q",
        "-f",
        str(pom),
        f"{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={output}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        group, artifact, version = server.artifacts[0]
        raise ServiceError(
            f"fetching {server.title} {server.version} jars failed "
            f"(mvn exit {result.returncode}):\n"
            f"{tail(result.stdout + result.stderr)}\n"
            "Check that Maven Central answers: "
            f"`mvn -B dependency:get -Dartifact={group}:{artifact}:{version}`, then retry."
        )


# --------------------------------------------------------------------------- processes


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    binary = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if binary is None:
        raise ServiceError("no `java` on PATH (or JAVA_HOME): install OpenJDK 17.")
    result = subprocess.run([binary, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)', result.stderr)
    if match is None or int(match[1]) < 17:
        raise ServiceError(
            f"{binary} is not Java 17+ ({result.stderr.strip()!r}): install OpenJDK 17."
        )
    return binary


def pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps our own exited children (no zombies)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def command_line(pid: int) -> str:
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.exists():
        with contextlib.suppress(OSError):
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    result = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout


def is_ours(pid: int, server: Server, paths: Paths) -> bool:
    """Our servers are the processes whose command line names their config in our run dir."""
    return pid_alive(pid) and str(paths.conf(server)) in command_line(pid)


def orphans(server: Server, paths: Paths) -> list[int]:
    """Our server processes whose pid file is gone (Linux only: scans /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    pids = (int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())
    return sorted(pid for pid in pids if pid != os.getpid() and is_ours(pid, server, paths))


def running(server: Server, paths: Paths) -> Running | None:
    """The server from the pid file (or a lost one) if alive and ours; cleans stale pid files."""
    pid_file = paths.pid_file(server)
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(pid_file.read_text().strip())
        if is_ours(pid, server, paths):
            return Running(pid)
    pid_file.unlink(missing_ok=True)
    lost = orphans(server, paths)
    return Running(lost[0]) if lost else None


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_ports_free(server: Server) -> None:
    busy = [port for port in server.ports if port_open(HOST, port)]
    if busy:
        ports = ", ".join(map(str, busy))
        raise ServiceError(
            f"cannot start {server.title}: port(s) {ports} on {HOST} are taken by a process this "
            f"script did not start (see `ss -ltnp`). Stop it, or use that server instead with "
            f"{server.env_var}=host:port."
        )


def fresh_run_dir(server: Server, paths: Paths) -> None:
    run_dir = paths.run_dir(server)
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / RUN_MARKER).exists():
        raise ServiceError(f"refusing to wipe {run_dir}: it was not created by this script")
    shutil.rmtree(run_dir, ignore_errors=True)
    for directory in (paths.conf(server), paths.data(server), paths.logs(server)):
        directory.mkdir(parents=True)
    (run_dir / RUN_MARKER).touch()


def render(template: str, target: Path, values: dict[str, str]) -> Path:
    text = (HERE / template).read_text()
    target.write_text(string.Template(text).substitute(values))
    return target


def spawn(server: Server, paths: Paths, command: list[str]) -> Running:
    with paths.console_log(server).open("ab") as console:
        popen = subprocess.Popen(
            command,
            cwd=paths.run_dir(server),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: `stop` signals the whole group
        )
    paths.pid_file(server).write_text(f"{popen.pid}\n")
    return Running(popen.pid, popen)


def kafka_cluster_id() -> str:
    while True:  # Kafka's own rule: no id may start with '-' (it would read as a CLI flag)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def kept_run_dir(server: Server, paths: Paths, formatted: str) -> None:
    """Check that an earlier start of this script left the run dir a restart needs."""
    run_dir = paths.run_dir(server)
    if not (run_dir / RUN_MARKER).exists() or not (paths.data(server) / formatted).exists():
        raise ServiceError(
            f"cannot restart {server.title} on its data: {run_dir} holds no data of an earlier "
            "start by this script; start it fresh instead"
        )


def launch_kafka(
    server: Server, paths: Paths, lib: Path, java_bin: str, *, fresh: bool = True
) -> Running:
    """Start Kafka: on a wiped, newly formatted run dir, or (`fresh=False`) on the data of
    its previous run there, as a broker restart does."""
    if fresh:
        fresh_run_dir(server, paths)
    else:
        kept_run_dir(server, paths, "meta.properties")
    values = {
        "host": HOST,
        "port": str(server.port),
        "controller_port": str(server.layout.kafka_controller),
        "data_dir": str(paths.data(server)),
        "log_file": str(paths.server_log(server)),
    }
    properties = render("kafka/server.properties", paths.conf(server) / "server.properties", values)
    log4j = render("kafka/log4j.properties", paths.conf(server) / "log4j.properties", values)
    common = [f"-Dlog4j.configuration={log4j.as_uri()}", "-cp", f"{lib}/*"]
    if fresh:
        format_command = [java_bin, "-Xmx256m", *common, "kafka.tools.StorageTool", "format"]
        format_command += ["-t", kafka_cluster_id(), "-c", str(properties)]
        result = subprocess.run(format_command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ServiceError(
                f"formatting Kafka storage failed:\n{tail(result.stdout + result.stderr)}\n"
                f"See {paths.server_log(server)}."
            )
    heap_and_gc = ["-Xms512m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    command = [
        java_bin,
        *heap_and_gc,
        "-Djava.awt.headless=true",
        "-Djava.net.preferIPv4Stack=true",
    ]
    command += common
    return spawn(server, paths, [*command, "kafka.Kafka", str(properties)])


def jvm_options(path: Path) -> list[str]:
    options: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        options += line.split()
    return options


def cassandra_system_properties(paths: Paths, server: Server) -> list[str]:
    jmx_port = server.layout.cassandra_jmx
    return [
        f"-Dcassandra.config={(paths.conf(server) / 'cassandra.yaml').as_uri()}",
        f"-Dlogback.configurationFile={paths.conf(server) / 'logback.xml'}",
        f"-Dcassandra.storagedir={paths.data(server)}",
        f"-Dcassandra.logdir={paths.logs(server)}",
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.jmx.local.port={jmx_port}",  # nodetool -p 17199 (the default)
        f"-Dcom.sun.management.jmxremote.rmi.port={jmx_port}",  # no random RMI port
        f"-Dcassandra.triggers_dir={paths.conf(server) / 'triggers'}",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.net.preferIPv4Stack=true",
        # a fresh single test node: no fsync of system tables, no gossip/ring waits
        "-Dcassandra.unsafesystem=true",
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=0",
        "-Dcassandra.superuser_setup_delay_ms=0",
        "-Dcassandra.shutdown_announce_in_ms=0",
        "-Dchronicle.announcer.disable=true",
    ]


def without_memory_locking() -> list[str]:
    """Cassandra always mlockall()s its heap, which as root (CAP_IPC_LOCK) means touching the
    whole 1 GiB first: ~3 s of startup a swap-free test node does not need. Without the
    capability the call fails at once and Cassandra just logs it."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return []
    return [setpriv, "--bounding-set", "-ipc_lock", "--"]


def launch_cassandra(
    server: Server, paths: Paths, lib: Path, java_bin: str, *, fresh: bool = True
) -> Running:
    """Start Cassandra on a wiped run dir. Never on old data: -Dcassandra.unsafesystem=true
    (below) makes a restarted node forget the keyspaces created after it booted."""
    if not fresh:
        raise ServiceError(
            "Cassandra cannot be restarted on its data here: it runs with "
            "-Dcassandra.unsafesystem=true, which loses the schema created since its start"
        )
    fresh_run_dir(server, paths)
    values = {
        "host": HOST,
        "port": str(server.port),
        "storage_port": str(server.layout.cassandra_storage),
        "ssl_storage_port": str(server.layout.cassandra_ssl_storage),
        "data_dir": str(paths.data(server)),
        "log_file": str(paths.server_log(server)),
    }
    render("cassandra/cassandra.yaml", paths.conf(server) / "cassandra.yaml", values)
    render("cassandra/logback.xml", paths.conf(server) / "logback.xml", values)
    (paths.conf(server) / "triggers").mkdir()
    jamm = sorted(lib.glob("jamm-*.jar"))
    if not jamm:
        raise ServiceError(f"no jamm-*.jar in {lib}: delete {lib.parent} and run `fetch` again")
    command = [*without_memory_locking(), java_bin, "-Xms1g", "-Xmx1g", "-Xss256k"]
    command += jvm_options(HERE / "cassandra" / "jvm17-server.options")
    command += [f"-javaagent:{jamm[-1]}", *cassandra_system_properties(paths, server)]
    command += ["-cp", f"{lib}/*", "org.apache.cassandra.service.CassandraDaemon"]
    return spawn(server, paths, command)


def signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def wait_gone(process: Running, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while process.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def terminate(server: Server, paths: Paths, process: Running) -> str:
    """SIGTERM the process group, SIGKILL after the grace period; returns what happened."""
    started = time.monotonic()
    signal_group(process.pid, signal.SIGTERM)
    how = "SIGTERM"
    if not wait_gone(process, STOP_GRACE_S):
        signal_group(process.pid, signal.SIGKILL)
        how = f"SIGKILL after {STOP_GRACE_S:.0f} s grace"
        if not wait_gone(process, 10.0):
            raise ServiceError(f"{server.title} (pid {process.pid}) survived SIGKILL")
    signal_group(process.pid, signal.SIGKILL)  # leftovers in the group, if any
    paths.pid_file(server).unlink(missing_ok=True)
    return f"stopped {server.title} (pid {process.pid}, {how}, {time.monotonic() - started:.1f} s)"


def wait_ports_closed(ports: Sequence[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        still_open = [port for port in ports if port_open(HOST, port, timeout=0.2)]
        if not still_open or time.monotonic() >= deadline:
            return still_open
        time.sleep(0.2)


# --------------------------------------------------------------------------- readiness probes


def quiet_client_logs() -> None:
    """The client libraries log every refused connection while a server boots."""
    for name in ("aiokafka", "kafka", "cassandra"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cassandra_connection_class() -> Any:
    """libev when the driver's C extension is there; never the deprecated asyncore loop."""
    try:
        from cassandra.io.libevreactor import LibevConnection
    except ImportError:
        from cassandra.io.asyncioreactor import AsyncioConnection

        return AsyncioConnection
    return LibevConnection


async def probe_kafka_async(bootstrap: str, timeout_s: float) -> str:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="shapstream-services",
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
    )
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        response = await admin.create_topics([NewTopic(PROBE_TOPIC, 1, 1)])
        for topic, error_code, *_ in response.topic_errors:
            if error_code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (an earlier probe)
                raise RuntimeError(f"creating probe topic {topic} failed with error {error_code}")
        await admin.find_coordinator(PROBE_GROUP)  # consumer groups are served, too
        return f"cluster id {cluster.get('cluster_id')}"
    finally:
        await admin.close()


def probe_kafka(addresses: Sequence[Address], timeout_s: float) -> str:
    bootstrap = ",".join(f"{host}:{port}" for host, port in addresses)
    return asyncio.run(asyncio.wait_for(probe_kafka_async(bootstrap, timeout_s), timeout_s * 2))


def probe_cassandra(addresses: Sequence[Address], timeout_s: float) -> str:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        request_timeout=timeout_s,
    )
    cluster = Cluster(
        contact_points=list(addresses),
        port=addresses[0][1],
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connection_class=cassandra_connection_class(),
        connect_timeout=timeout_s,
        control_connection_timeout=timeout_s,
    )
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local").one()
        return f"release {row.release_version}"
    finally:
        cluster.shutdown()


def probe(server: Server, addresses: Sequence[Address], timeout_s: float = 5.0) -> str | None:
    """A short description when the server answers like a ready server, else None."""
    check = probe_kafka if server.key == "kafka" else probe_cassandra
    try:
        return check(addresses, timeout_s)
    except Exception:  # noqa: BLE001 - whatever goes wrong, the answer is "not ready yet"
        return None


# --------------------------------------------------------------------------- start / stop


class ServerFailedError(ServiceError):
    def __init__(self, server: Server, message: str, show_logs: bool) -> None:
        super().__init__(message)
        self.server = server
        self.show_logs = show_logs


def describe(addresses: Sequence[Address]) -> str:
    return ",".join(f"{host}:{port}" for host, port in addresses)


def wait_ready(
    server: Server,
    addresses: Sequence[Address],
    process: Running | None,
    deadline_s: float,
    abort: threading.Event,
    started: float | None = None,
) -> float:
    """Polls until the server answers; returns the seconds since `started` (default: now)."""
    started = time.monotonic() if started is None else started
    next_progress = started + PROGRESS_EVERY_S
    where = describe(addresses)
    while True:
        if process is not None and not process.alive():
            code = process.popen.returncode if process.popen is not None else "unknown"
            message = f"{server.title} exited during startup (exit code {code})"
            raise ServerFailedError(server, message, show_logs=True)
        answer = probe(server, addresses)
        elapsed = time.monotonic() - started
        if answer is not None:
            say(f"{server.title} ready on {where} ({answer}) after {elapsed:.1f} s")
            return elapsed
        if elapsed >= deadline_s:
            message = f"{server.title} on {where} did not become ready within {deadline_s:.0f} s"
            if process is None:
                message += f" (from {server.env_var}; unset it to start a local {server.title})"
            raise ServerFailedError(server, message, show_logs=process is not None)
        if time.monotonic() >= next_progress:
            say(f"waiting for {server.title} on {where} ... {elapsed:.0f} s")
            next_progress += PROGRESS_EVERY_S
        if abort.wait(POLL_EVERY_S):
            raise AbortedError


def bring_up(server: Server, paths: Paths, deadline_s: float, abort: threading.Event) -> None:
    external = external_address(server)
    if external is not None:
        addresses = parse_addresses(external, server.standard_port)
        say(f"{server.env_var}={external}: using that {server.title}, not starting one")
        wait_ready(server, addresses, None, deadline_s, abort)
        return
    addresses = [(HOST, server.port)]
    process = running(server, paths)
    if process is not None:
        if probe(server, addresses) is not None:
            say(
                f"{server.title} already running (pid {process.pid}), ready on {HOST}:{server.port}"
            )
            return
        say(f"{server.title} already running (pid {process.pid}), waiting until it is ready")
        wait_ready(server, addresses, process, deadline_s, abort)
        return
    start_local(server, paths, deadline_s, abort)


def start_local(
    server: Server,
    paths: Paths,
    deadline_s: float,
    abort: threading.Event | None = None,
    *,
    fresh: bool = True,
) -> Running:
    """Start the server on HOST at its ports and wait until it is ready; returns its process.

    A server of this script's own, whatever `server.env_var` says. `fresh=False` restarts Kafka
    on the data its previous run left in `paths` (see `launch_kafka`).
    """
    abort = abort if abort is not None else threading.Event()
    check_ports_free(server)
    lib = fetch(server, paths)
    if abort.is_set():
        raise AbortedError
    launch = launch_kafka if server.key == "kafka" else launch_cassandra
    launched = time.monotonic()  # ready times include Kafka's storage format step
    process = launch(server, paths, lib, java(), fresh=fresh)
    say(
        f"started {server.title} {server.version} (pid {process.pid}), logs in {paths.logs(server)}"
    )
    try:
        wait_ready(server, [(HOST, server.port)], process, deadline_s, abort, started=launched)
    except BaseException:
        # Not left behind half-started; its logs stay in the run dir.
        with contextlib.suppress(ServiceError):
            terminate(server, paths, process)
        raise
    return process


def print_log_tails(server: Server, paths: Paths) -> None:
    for log in (paths.server_log(server), paths.console_log(server)):
        if log.is_file() and log.stat().st_size:
            say(f"----- last {LOG_TAIL_LINES} lines of {log} -----")
            say(tail(log.read_text(errors="replace")))
            say(f"----- end of {log} -----")


def run_concurrently(
    work: Sequence[Callable[[], None]], abort: threading.Event | None = None
) -> list[BaseException]:
    """Runs the jobs in threads; on Ctrl-C sets `abort` so they wind down, then re-raises."""
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        futures = [pool.submit(job) for job in work]
        try:
            return [error for future in futures if (error := future.exception()) is not None]
        except BaseException:
            if abort is not None:
                abort.set()
            raise


def start(kafka: Server, cassandra: Server, paths: Paths, deadline_s: float) -> int:
    quiet_client_logs()
    paths.run.mkdir(parents=True, exist_ok=True)
    abort = threading.Event()

    def job(server: Server) -> Callable[[], None]:
        def run() -> None:
            try:
                bring_up(server, paths, deadline_s, abort)
            except BaseException:
                abort.set()
                raise

        return run

    try:
        errors = run_concurrently([job(kafka), job(cassandra)], abort)
    except KeyboardInterrupt:
        say("interrupted: stopping what was started")
        stop(kafka, cassandra, paths)
        return 130
    failures = [error for error in errors if not isinstance(error, AbortedError)]
    if not failures:
        say("\n".join(env_lines(kafka, cassandra)))
        return 0
    for failure in failures:
        if isinstance(failure, ServerFailedError) and failure.show_logs:
            print_log_tails(failure.server, paths)
    say("stopping everything this script started ...")
    stop(kafka, cassandra, paths)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    print(
        "What to do: read the log lines above (all logs are under "
        f"{paths.run}), fix the cause and run `make services` again; on a slow machine raise "
        f"the deadline ({TIMEOUT_ENV}=300); or point the tests at servers you already have with "
        f"{KAFKA_ENV}=host:port / {CASSANDRA_ENV}=host:port.",
        file=sys.stderr,
    )
    return 1


def stop(kafka: Server, cassandra: Server, paths: Paths) -> int:
    found = [
        (server, process) for server in (kafka, cassandra) if (process := running(server, paths))
    ]
    reports: list[str] = []

    def job(server: Server, process: Running) -> Callable[[], None]:
        return lambda: reports.append(terminate(server, paths, process))

    errors = run_concurrently([job(server, process) for server, process in found]) if found else []
    for line in reports:
        say(line)
    still_open = wait_ports_closed([port for server, _ in found for port in server.ports])
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if still_open:
        print(
            f"error: port(s) {', '.join(map(str, still_open))} on {HOST} still listen after stop; "
            "see `ss -ltnp` for the process holding them.",
            file=sys.stderr,
        )
    if not found:
        say("nothing to stop: no Kafka or Cassandra started by this script is running")
    return 1 if errors or still_open else 0


def status(kafka: Server, cassandra: Server, paths: Paths) -> int:
    quiet_client_logs()
    all_ready = True
    for server in (kafka, cassandra):
        external = external_address(server)
        if external is not None:
            addresses = parse_addresses(external, server.standard_port)
            answer = probe(server, addresses)
            state = f"ready ({answer})" if answer else "NOT reachable"
            say(f"{server.title}: external {server.env_var}={external}: {state}")
            all_ready = all_ready and answer is not None
            continue
        process = running(server, paths)
        if process is None:
            say(f"{server.title} {server.version}: stopped")
            all_ready = False
            continue
        answer = probe(server, [(HOST, server.port)])
        state = f"ready on {HOST}:{server.port} ({answer})" if answer else "running, NOT ready"
        say(f"{server.title} {server.version}: pid {process.pid}, {state}")
        all_ready = all_ready and answer is not None
    return 0 if all_ready else 3


def fetch_all(kafka: Server, cassandra: Server, paths: Paths) -> int:
    libs: list[str] = []

    def job(server: Server) -> Callable[[], None]:
        return lambda: libs.append(f"{server.title} {server.version}: {fetch(server, paths)}")

    errors = run_concurrently([job(kafka), job(cassandra)])
    for line in sorted(libs):
        say(line)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="services.py", description="Local Apache Kafka and Apache Cassandra for the tests."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="fetch the server jars from Maven Central into the cache")
    start_parser = commands.add_parser("start", help="start both servers and wait until ready")
    start_parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait for readiness (default ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT_S:.0f})",
    )
    commands.add_parser("stop", help="stop the servers this script started")
    commands.add_parser("status", help="show which server is running / ready (exit 3 if not all)")
    commands.add_parser("env", help="print `export` lines for eval")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        kafka, cassandra = servers(read_versions())
        paths = default_paths()
        if args.command == "env":
            print("\n".join(env_lines(kafka, cassandra)))
            return 0
        if args.command == "fetch":
            return fetch_all(kafka, cassandra, paths)
        if args.command == "start":
            timeout = args.timeout if args.timeout is not None else default_timeout()
            return start(kafka, cassandra, paths, timeout)
        if args.command == "stop":
            return stop(kafka, cassandra, paths)
        return status(kafka, cassandra, paths)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
