"""Calls on a cassandra-driver session from asyncio, shared by the Cassandra adapters.

The driver does its I/O on its own thread (libev reactor); every request is sent with
`execute_async` and its `ResponseFuture` is turned into an asyncio future with
`loop.call_soon_threadsafe`, so the event loop never waits on the network. Only the few
calls the driver offers solely as blocking ones (connect, prepare, shutdown) run in a thread.
"""

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from cassandra import InvalidRequest, OperationTimedOut, RequestExecutionException
from cassandra.cluster import NoHostAvailable, ResponseFuture, Session
from cassandra.connection import ConnectionBusy, ConnectionException
from cassandra.query import PreparedStatement, SimpleStatement, Statement

from service.adapters.record_codec import from_epoch_ms
from service.errors import StoreUnavailable

S = TypeVar("S")

# Schema changes wait for schema agreement between nodes, which can outlast a query timeout.
SCHEMA_TIMEOUT_S = 60.0

# What the driver raises when the cluster, not the request, is at fault.
_UNAVAILABLE = (
    OperationTimedOut,
    RequestExecutionException,
    NoHostAvailable,
    ConnectionException,
    ConnectionBusy,
)

# The epoch of the naive UTC datetimes the driver hands back for a `timestamp`.
_DRIVER_EPOCH = datetime(1970, 1, 1)
_ONE_MS = timedelta(milliseconds=1)


def _settle(future: "asyncio.Future[Any]", rows: Any, error: BaseException | None) -> None:
    # The awaiting task may have been cancelled while the driver was still working.
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(rows)


def bridge(response: ResponseFuture, loop: asyncio.AbstractEventLoop) -> "asyncio.Future[Any]":
    """An asyncio future resolved from the driver's I/O thread when `response` completes."""
    future: asyncio.Future[Any] = loop.create_future()
    response.add_callbacks(
        callback=lambda rows: loop.call_soon_threadsafe(_settle, future, rows, None),
        errback=lambda error: loop.call_soon_threadsafe(_settle, future, None, error),
    )
    return future


@contextmanager
def unavailable_on_driver_errors() -> Iterator[None]:
    """Raise the driver's availability errors (timeouts, no host, lost connections) as
    `StoreUnavailable`, which callers answer with a 503 or retry; anything else is a bug."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"Cassandra did not answer ({type(exc).__name__}).") from exc


def not_migrated(exc: InvalidRequest) -> StoreUnavailable:
    """A missing keyspace or table: not ready rather than broken (a worker started before
    `db migrate` waits for it)."""
    return StoreUnavailable(
        f"the keyspace or its tables are missing ({exc}); run `shapstream db migrate`"
    )


async def execute(
    session: Session,
    statement: Statement,
    values: Sequence[Any] | None = None,
    *,
    timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """Send through the driver and await the rows; the profile's timeout applies unless one is
    given, and the driver's availability errors are raised as `StoreUnavailable`."""
    loop = asyncio.get_running_loop()
    with unavailable_on_driver_errors():
        if timeout_s is None:
            response = session.execute_async(statement, values)
        else:
            response = session.execute_async(statement, values, timeout=timeout_s)
        rows: list[dict[str, Any]] | None = await bridge(response, loop)
    return rows or []


def prepare(
    session: Session, keyspace: str, cql: str, *, idempotent: bool, page_rows: int | None = None
) -> PreparedStatement:
    """Prepare `cql` for `keyspace` (blocking: call it in a thread); `idempotent` lets the
    driver retry it, `page_rows` sets its page size."""
    statement: PreparedStatement = session.prepare(cql.format(keyspace=keyspace))
    statement.is_idempotent = idempotent
    if page_rows is not None:
        statement.fetch_size = page_rows
    return statement


class Prepared(Generic[S]):
    """An adapter's statements, prepared once per session on first use (after `migrate`)."""

    def __init__(self, prepare_all: Callable[[], S]) -> None:
        self._prepare_all = prepare_all
        self._statements: S | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> S:
        if self._statements is None:
            async with self._lock:
                if self._statements is None:
                    try:
                        self._statements = await asyncio.to_thread(self._prepare_all)
                    except InvalidRequest as exc:
                        raise not_migrated(exc) from exc
        return self._statements


def driver_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of a `timestamp` the driver read back.

    Cassandra stores whole milliseconds, but the driver rebuilds a naive UTC datetime from
    float seconds, which can land a microsecond short: round, don't floor.
    """
    return round((moment - _DRIVER_EPOCH) / _ONE_MS)


def from_driver(moment: datetime) -> datetime:
    """A `timestamp` the driver read back, as the aware UTC datetime that was stored."""
    return from_epoch_ms(driver_ms(moment))


async def create_tables(session: Session, keyspace: str, schema: Sequence[str]) -> None:
    """Run an adapter's CREATE ... IF NOT EXISTS statements (each safe to repeat)."""
    for cql in schema:
        statement = SimpleStatement(cql.format(keyspace=keyspace))
        await execute(session, statement, timeout_s=SCHEMA_TIMEOUT_S)
