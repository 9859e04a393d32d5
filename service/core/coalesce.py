"""Merging concurrent single-item calls into batch calls, without waiting to fill a batch.

Per request, Cassandra and its driver spend most of their CPU on the request itself, not the
row: 16 claim reads in one `IN` query cost a fraction of 16 separate reads on both sides
(docs/decision-path.md). A `Coalescer` sends an item at once when no batch is in flight;
items arriving while one is out go together in the next one, which leaves early only when
it is full (`max_batch`), up to `max_in_flight` batches. An idle service pays no added
latency; a busy one sends few, large batches; a very busy one sends full ones in parallel.
"""

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class Coalescer(Generic[K, R]):
    """`submit(key)` returns what `run_batch` maps `key` to; keys submitted together share it."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[K]], Awaitable[Mapping[K, R]]],
        *,
        max_batch: int,
        max_in_flight: int,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        # One future per call, so a caller that gives up cancels only its own.
        self._pending: list[tuple[K, asyncio.Future[R]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    async def submit(self, key: K) -> R:
        """The batch result for `key`; a caller that stops waiting leaves the batch unharmed
        (its own future is cancelled, and the batch skips settling it)."""
        return await self.submit_nowait(key)

    def submit_nowait(self, key: K) -> "asyncio.Future[R]":
        """Queue `key` for the next batch without waiting; the future settles with its result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((key, future))
        self._maybe_send()
        return future

    def _maybe_send(self) -> None:
        while self._pending:
            out = len(self._in_flight)
            full = len(self._pending) >= self._max_batch
            if out >= self._max_in_flight or (out > 0 and not full):
                return
            calls, self._pending = (
                self._pending[: self._max_batch],
                self._pending[self._max_batch :],
            )
            task = asyncio.create_task(self._send(calls), name="coalesced-batch")
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: "asyncio.Task[None]") -> None:
        self._in_flight.discard(task)
        self._maybe_send()

    async def _send(self, calls: list[tuple[K, "asyncio.Future[R]"]]) -> None:
        futures = [future for _, future in calls]
        try:
            # A key asked twice in one batch is asked once.
            results = await self._run_batch(list(dict.fromkeys(key for key, _ in calls)))
        # Whatever failed the batch failed each of its callers: they get it, not this task.
        except Exception as exc:  # noqa: BLE001
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
                    # Taken here too: a caller that gave up must not leave it unretrieved.
                    future.exception()
            return
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        for key, future in calls:
            if not future.done():
                future.set_result(results[key])

    async def close(self) -> None:
        """Wait for the batches in flight (their callers may still be waiting)."""
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
