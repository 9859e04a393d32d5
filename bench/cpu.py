"""CPU time of server processes from /proc (Linux), to report CPU per request over a window.

A process's time is utime + stime of the process and of its live descendants, plus the
cutime + cstime of children it has already reaped, so a server that forks is counted whole.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
TCP_LISTEN = "0A"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards), or None if gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces or parentheses itself.
    return text[text.rindex(")") + 2 :].split()


def _own_ticks(fields: list[str], reaped: bool) -> int:
    # utime, stime, cutime, cstime are fields 14 to 17 (1-based), i.e. 11 to 14 here.
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def _children(parents: Mapping[int, int], pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds used so far by `pid` and its children (live and reaped); None if gone."""
    root = _stat_fields(pid)
    if root is None:
        return None
    ticks = _own_ticks(root, reaped=True)
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    for child in _children(parents, pid):
        if (fields := _stat_fields(child)) is not None:
            # A live child's reaped grandchildren are not yet in the root's cutime.
            ticks += _own_ticks(fields, reaped=True)
    return ticks / TICKS_PER_S


def read_cpu(pids: Mapping[str, int | None]) -> dict[str, float | None]:
    """CPU seconds so far of each named process (None where its pid is unknown or gone)."""
    return {name: None if pid is None else process_cpu_s(pid) for name, pid in pids.items()}


def per_op_us(
    start: Mapping[str, float | None], end: Mapping[str, float | None], ops: int
) -> dict[str, float | None]:
    """Microseconds of CPU per operation of each process between two readings."""
    out: dict[str, float | None] = {}
    for name, before in start.items():
        after = end.get(name)
        if before is None or after is None or ops <= 0:
            out[name] = None
        else:
            out[name] = 1e6 * (after - before) / ops
    return out


def fmt_us(value: float | None, width: int = 8) -> str:
    """Microseconds right-aligned in `width` (0: no padding), or n/a."""
    return f"{'n/a':>{width}s}" if value is None else f"{value:{width}.0f}"


# --------------------------------------------------------------------- finding server pids


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (PROC / "net" / table).read_text().splitlines()[1:]:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def pid_listening_on(port: int) -> int | None:
    """The local process listening on TCP `port`, if this user may see its sockets."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
    return None


def is_loopback(host: str) -> bool:
    """Whether every address of `host` is on this machine's loopback."""
    with contextlib.suppress(OSError):
        return all(
            info[4][0] in ("127.0.0.1", "::1")
            for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        )
    return False
