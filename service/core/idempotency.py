"""What one gateway process remembers of caller transaction ids: recent answers and decisions
being made right now.

A repeat of a recent id is answered from memory (no store read), and two requests with the
same id at the same time in one process are decided once: the second waits for the first.
Across processes the store's claims do that job (see docs/decision-path.md).
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.core.records import Claim


class Abandoned(Exception):
    """The request deciding this id stopped (its client went, or it was cancelled)."""


@dataclass(frozen=True, slots=True)
class _Remembered:
    claim: Claim
    expires_at: float


class RecentIds:
    """A bounded, expiring memory of answered ids, and the ids being decided now."""

    def __init__(
        self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._clock = clock
        self._answered: OrderedDict[str, _Remembered] = OrderedDict()
        self._deciding: dict[str, asyncio.Future[Claim]] = {}

    def answered(self, transaction_id: str) -> Claim | None:
        """The answer given for `transaction_id`, if it is still remembered."""
        remembered = self._answered.get(transaction_id)
        if remembered is None:
            return None
        if remembered.expires_at <= self._clock():
            del self._answered[transaction_id]
            return None
        return remembered.claim

    def remember(self, claim: Claim) -> None:
        if self._capacity == 0:
            return
        self._answered.pop(claim.transaction_id, None)
        self._answered[claim.transaction_id] = _Remembered(claim, self._clock() + self._ttl_s)
        while len(self._answered) > self._capacity:
            self._answered.popitem(last=False)

    def deciding(self, transaction_id: str) -> "asyncio.Future[Claim] | None":
        """The decision of `transaction_id` under way in this process, if any."""
        return self._deciding.get(transaction_id)

    def begin(self, transaction_id: str) -> "asyncio.Future[Claim]":
        """Mark `transaction_id` as being decided; settle the future with `finish`."""
        future: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._deciding[transaction_id] = future
        return future

    def finish(self, transaction_id: str, claim: Claim | None, error: BaseException | None) -> None:
        """Settle the decision under way: with its claim, or with the error it ended in."""
        future = self._deciding.pop(transaction_id, None)
        if future is None or future.done():
            return
        if claim is not None:
            future.set_result(claim)
            return
        future.set_exception(error if isinstance(error, Exception) else Abandoned())
        # Waiters, if any, take the error; without waiters it must not be logged as lost.
        future.exception()
