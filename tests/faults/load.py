"""Open-loop load of callers that retry: each decision is a client with its own transaction id.

A new decision starts every 1/rate seconds whatever the gateway does (open loop: a stalled
gateway does not slow the arrivals down, as with real callers). Each one retries a 503 after
its Retry-After (1 s without one) and a lost answer (connection error, client timeout) after
1 s, always with the same transaction id and body, until it gets any other answer or gives up.
Every attempt is recorded with its send and answer times on one monotonic clock.

The HTTP/1.1 client is a small keep-alive one over asyncio streams (like bench/loadgen.py,
plus headers and GET): at a few hundred requests per second it costs a fraction of what httpx
would on a two-core machine that also runs the gateway, a worker, Kafka and Cassandra.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Statuses recorded for attempts that got no HTTP answer.
NO_CONNECTION = 0  # refused, reset or closed before a complete answer
CLIENT_TIMEOUT = -1  # no answer within the client's own timeout
# Idle keep-alive connections older than this are closed rather than reused: uvicorn closes
# them after 5 s, and a request on a connection the server just closed would look like a
# failure of the gateway.
IDLE_REUSE_S = 2.0


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection; its requests are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle_since = time.monotonic()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def open(self) -> bool:
        return self._writer is not None

    async def request(self, method: str, path: str, headers: bytes, body: bytes = b"") -> Answer:
        """Send one request and read its answer; raises OSError-like errors when it fails."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + headers + b"\r\n" + body)
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        status = int(status_line.split()[1])
        found: dict[str, str] = {}
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            found[name.strip().lower()] = value.strip()
        payload = await self._reader.readexactly(int(found.get("content-length", "0")))
        if found.get("connection", "").lower() == "close":
            await self.close()
        self.idle_since = time.monotonic()
        return Answer(status, found, payload)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class Client:
    """Keep-alive connections to one server, opened as needed (never a queue for one)."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str]) -> None:
        self.host = host
        self.port = port
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()

    async def request(
        self, method: str, path: str, body: bytes = b"", timeout_s: float = 5.0
    ) -> Answer:
        """One request on an idle connection or a new one; a failed connection is dropped."""
        conn = await self._take()
        try:
            async with asyncio.timeout(timeout_s):
                answer = await conn.request(method, path, self._headers, body)
        except BaseException:
            await conn.close()
            self._busy.discard(conn)
            raise
        self._busy.discard(conn)
        if conn.open:
            self._idle.append(conn)
        return answer

    async def _take(self) -> Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < IDLE_REUSE_S:
                self._busy.add(conn)
                return conn
            await conn.close()
        conn = Connection(self.host, self.port)
        self._busy.add(conn)
        return conn

    async def close(self) -> None:
        for conn in [*self._idle, *self._busy]:
            await conn.close()
        self._idle.clear()
        self._busy.clear()


@dataclass(frozen=True)
class Attempt:
    """One request of a transaction: times are `time.monotonic()` seconds."""

    number: int
    sent: float
    done: float
    status: int  # HTTP status, or NO_CONNECTION / CLIENT_TIMEOUT
    body: bytes = b""
    content_type: str = ""
    retry_after: str | None = None
    error: str = ""

    @property
    def answered(self) -> bool:
        return self.status > 0

    @property
    def latency_s(self) -> float:
        return self.done - self.sent


@dataclass
class Transaction:
    """One caller's decision: its id, its body, and every attempt it made."""

    txn: str
    body: bytes
    scheduled: float
    attempts: list[Attempt] = field(default_factory=list)
    gave_up: bool = False

    @property
    def final(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def ok(self) -> Attempt | None:
        """The first attempt answered 200, if any."""
        return next((a for a in self.attempts if a.status == 200), None)

    @property
    def finished(self) -> bool:
        final = self.final
        return self.gave_up or (final is not None and final.status not in RETRIED)


RETRIED = frozenset({503, NO_CONNECTION, CLIENT_TIMEOUT})


@dataclass(frozen=True)
class Policy:
    """How each caller behaves."""

    rate_per_s: float = 100.0
    client_timeout_s: float = 5.0
    # After a lost answer, and after a 503 without a usable Retry-After.
    retry_s: float = 1.0
    give_up_after_s: float = 60.0


def retry_delay(attempt: Attempt, policy: Policy) -> float:
    if attempt.status == 503 and attempt.retry_after is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(attempt.retry_after))
    return policy.retry_s


class Load:
    """Decisions arriving at a fixed rate until `stop_sending()`, each retried to its end."""

    def __init__(
        self,
        client: Client,
        policy: Policy,
        request: Callable[[int], tuple[str, bytes]],
        path: str = "/v1/predictions",
    ) -> None:
        self.client = client
        self.policy = policy
        self._request = request
        self._path = path
        self.transactions: list[Transaction] = []
        self.started = 0.0
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def stop_sending(self) -> None:
        """No new decisions from now on; those started keep retrying until they finish."""
        self._stop.set()

    async def run(self) -> list[Transaction]:
        """Send until stopped, then wait for every transaction to finish or give up."""
        loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        interval = 1.0 / self.policy.rate_per_s
        index = 0
        while not self._stop.is_set():
            scheduled = self.started + index * interval
            delay = scheduled - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                if self._stop.is_set():
                    break
            txn, body = self._request(index)
            transaction = Transaction(txn, body, scheduled)
            self.transactions.append(transaction)
            task = loop.create_task(self._caller(transaction))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            index += 1
        while self._tasks:
            await asyncio.gather(*self._tasks)
        return self.transactions

    async def _caller(self, transaction: Transaction) -> None:
        policy = self.policy
        give_up_at = time.monotonic() + policy.give_up_after_s
        while True:
            attempt = await self._attempt(transaction, len(transaction.attempts) + 1)
            transaction.attempts.append(attempt)
            if attempt.status not in RETRIED:
                return
            wait = retry_delay(attempt, policy)
            if time.monotonic() + wait > give_up_at:
                transaction.gave_up = True
                return
            await asyncio.sleep(wait)

    async def _attempt(self, transaction: Transaction, number: int) -> Attempt:
        sent = time.monotonic()
        try:
            answer = await self.client.request(
                "POST", self._path, transaction.body, self.policy.client_timeout_s
            )
        except TimeoutError:
            return Attempt(number, sent, time.monotonic(), CLIENT_TIMEOUT, error="client timeout")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
            return Attempt(
                number, sent, time.monotonic(), NO_CONNECTION, error=type(error).__name__
            )
        return Attempt(
            number,
            sent,
            time.monotonic(),
            answer.status,
            answer.body,
            answer.headers.get("content-type", ""),
            answer.headers.get("retry-after"),
        )

    def snapshot(self) -> dict[str, int]:
        """Counts so far, for progress lines."""
        statuses: dict[str, int] = {}
        for transaction in list(self.transactions):
            for attempt in transaction.attempts:
                key = str(attempt.status) if attempt.answered else attempt.error or "no answer"
                statuses[key] = statuses.get(key, 0) + 1
        done = sum(t.finished for t in self.transactions)
        return {"decisions": len(self.transactions), "finished": done, **statuses}
