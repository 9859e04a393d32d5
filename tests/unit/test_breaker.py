"""The circuit breaker and the guard around a dependency's calls: fail fast while it is away."""

import asyncio

import pytest

from service.core.breaker import BreakerState, CircuitBreaker, Guard
from service.errors import StoreUnavailable


def state(breaker: CircuitBreaker) -> BreakerState:
    # A call, so the type checker does not narrow the property between two reads.
    return breaker.state


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_failures_in_a_row_and_probes_once_when_due() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=3, open_s=2.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    assert state(breaker) is BreakerState.CLOSED
    breaker.failed()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after_s() == pytest.approx(2.0)

    clock.now += 2.0
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failed()
    assert state(breaker) is BreakerState.OPEN

    clock.now += 2.0
    assert breaker.allow()
    breaker.succeeded()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failures_to_open=2, open_s=1.0, clock=Clock())
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    assert state(breaker) is BreakerState.CLOSED


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, open_s=1.0, clock=clock)
    breaker.failed()
    clock.now += 1.0
    assert breaker.allow()
    breaker.abandoned()
    assert breaker.allow()


async def test_guard_times_out_counts_and_then_fails_fast() -> None:
    breaker = CircuitBreaker(failures_to_open=2, open_s=30.0)
    guard = Guard("explanation store", breaker, 0.05, StoreUnavailable)
    calls = 0

    async def stalled() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(10)

    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="did not answer in time"):
            await guard.call(stalled)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StoreUnavailable, match="not answering") as refused:
        await guard.call(stalled)
    assert loop.time() - started < 0.01
    assert calls == 2
    assert 30 <= int(refused.value.response_headers()["Retry-After"]) <= 90


async def test_guard_counts_unavailable_but_not_other_errors() -> None:
    breaker = CircuitBreaker(failures_to_open=1, open_s=30.0)
    guard = Guard("explanation store", breaker, 1.0, StoreUnavailable)

    async def bug() -> None:
        raise KeyError("not a dependency failure")

    async def away() -> None:
        raise StoreUnavailable("no host")

    with pytest.raises(KeyError):
        await guard.call(bug)
    assert state(breaker) is BreakerState.CLOSED
    with pytest.raises(StoreUnavailable):
        await guard.call(away)
    assert state(breaker) is BreakerState.OPEN


async def test_guard_returns_the_result_and_stays_closed() -> None:
    guard = Guard("store", CircuitBreaker(1, 1.0), 1.0, StoreUnavailable)

    async def answer() -> int:
        return 42

    assert await guard.call(answer) == 42
    assert state(guard.breaker) is BreakerState.CLOSED
