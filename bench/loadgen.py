"""A small HTTP/1.1 keep-alive load generator (httpx would be the bottleneck at 1,000 req/s)."""

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Body = Callable[[int], bytes]
# The status counted for a request whose connection failed before an answer came.
NO_ANSWER = 0


@dataclass
class Result:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def ok_rate(self) -> float:
        """Answers with status 200 per second."""
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        return (
            f"{len(self.latencies_s)} requests, {self.rate:.0f} req/s, "
            f"p50 {self.percentile_ms(0.5):.2f} ms, p99 {self.percentile_ms(0.99):.2f} ms, "
            f"statuses {dict(sorted(self.statuses.items()))}"
        )


def cycling(payloads: Sequence[bytes]) -> Body:
    """Request i sends payloads[i % len(payloads)]."""
    return lambda i: payloads[i % len(payloads)]


def with_transaction_ids(prefix: str, payloads: Sequence[bytes]) -> Body:
    """Like `cycling`, each JSON object body led by its own "transaction_id": prefix + i.

    Spliced as bytes: serialising every request again would load the client, not the server.
    """
    head = b'{"transaction_id":"' + prefix.encode()
    tails = [b'",' + p[1:] if p[1:2] != b"}" else b'"}' for p in payloads]
    return lambda i: head + str(i).encode() + tails[i % len(tails)]


def header_lines(headers: Mapping[str, str] | None) -> bytes:
    """Extra request headers (e.g. Authorization), encoded once for every request."""
    return "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()).encode()


class Connection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, host: str, port: int, extra_headers: bytes = b"") -> None:
        self.host = host
        self.port = port
        self._extra = extra_headers
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        self._writer.write(head + self._extra + b"\r\n" + body)
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        payload = await self._reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def request(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Like `post`, but a failed connection is an answer: NO_ANSWER, then reconnect."""
        try:
            return await self.post(path, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            await self.close()
            return NO_ANSWER, b""

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def closed_loop(
    host: str,
    port: int,
    path: str,
    body: Body,
    concurrency: int,
    seconds: float,
    headers: Mapping[str, str] | None = None,
) -> Result:
    """`concurrency` clients, each sending its next request as soon as the last is answered."""
    result = Result()
    deadline = time.perf_counter() + seconds
    counter = iter(range(1 << 62))

    async def client() -> None:
        conn = Connection(host, port, header_lines(headers))
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                status, _ = await conn.request(path, body(next(counter)))
                result.latencies_s.append(time.perf_counter() - start)
                result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - start
    return result


async def open_loop(
    host: str,
    port: int,
    path: str,
    body: Body,
    rate: float,
    seconds: float,
    connections: int = 64,
    keep_bodies: bool = False,
    progress: Callable[[str], None] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Result:
    """Send at a fixed rate; latency counts from the scheduled time (no coordinated omission)."""
    result = Result()
    total = int(rate * seconds)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Connection(host, port, header_lines(headers)))
    start = time.perf_counter()

    async def one(i: int, scheduled: float) -> None:
        conn = await pool.get()
        try:
            status, payload = await conn.request(path, body(i))
        finally:
            pool.put_nowait(conn)
        result.latencies_s.append(time.perf_counter() - scheduled)
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if keep_bodies and status == 200:
            result.bodies.append(payload)

    tasks: list[asyncio.Task[None]] = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
        if progress is not None and i and i % int(rate * 10) == 0:
            progress(f"sent {i}/{total} ({time.perf_counter() - start:.0f} s)")
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - start
    while not pool.empty():
        await pool.get_nowait().close()
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
