"""A circuit breaker: after repeated failures of a dependency, fail at once for a while.

A stalled dependency otherwise costs every request its full timeout, requests pile up
behind it, and the pile-up outlives the stall (a metastable failure). Open, the breaker
refuses at once; after `open_s` it lets one call through (half-open) and closes again on
its success.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TypeVar

from service.errors import Unavailable

T = TypeVar("T")


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Counts consecutive failures of one dependency; single event loop, no locking needed."""

    def __init__(
        self,
        failures_to_open: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failures_to_open = failures_to_open
        self._open_s = open_s
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._failures < self._failures_to_open:
            return BreakerState.CLOSED
        if self._clock() < self._open_until or self._probing:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def retry_after_s(self) -> float:
        """Seconds until a call may be let through again (0 when closed)."""
        return max(0.0, self._open_until - self._clock())

    def allow(self) -> bool:
        """Whether a call may go ahead now; in half-open state, only one at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self._failures >= self._failures_to_open:
            self._open_until = self._clock() + self._open_s

    def abandoned(self) -> None:
        """A call let through ended without a verdict (cancelled): let another one try."""
        self._probing = False


class Guard:
    """A deadline and a circuit breaker around the calls a request makes to one dependency.

    A call that misses `timeout_s` or raises `error` counts as a failure and is raised as
    `error` (a 503 for the client); while the breaker is open, calls fail at once.
    """

    def __init__(
        self, name: str, breaker: CircuitBreaker, timeout_s: float, error: type[Unavailable]
    ) -> None:
        self.name = name
        self.breaker = breaker
        self._timeout_s = timeout_s
        self._error = error

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise self._error(
                f"The {self.name} is not answering; retry in a moment.",
                retry_after_s=self.breaker.retry_after_s(),
            )
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await operation()
        except TimeoutError as exc:
            self.breaker.failed()
            raise self._error(f"The {self.name} did not answer in time.") from exc
        except Unavailable:
            self.breaker.failed()
            raise
        except BaseException:
            self.breaker.abandoned()
            raise
        self.breaker.succeeded()
        return result
