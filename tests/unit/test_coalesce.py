"""Concurrent single-item calls merged into batch calls, without waiting to fill a batch."""

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from service.core.coalesce import Coalescer


async def settle() -> None:
    """Let the tasks just scheduled run until they wait."""
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    """A batch call that records what it was given and can be held back."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def __call__(self, keys: Sequence[int]) -> Mapping[int, int]:
        self.batches.append(list(keys))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return {k: k * 10 for k in keys}


async def test_an_idle_call_goes_at_once_and_callers_waiting_meanwhile_share_one() -> None:
    calls = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(calls, max_batch=100, max_in_flight=1)
    calls.release.clear()
    first = asyncio.ensure_future(coalescer.submit(1))
    await settle()
    assert calls.batches == [[1]]  # sent without waiting for company
    rest = [asyncio.ensure_future(coalescer.submit(k)) for k in (2, 3, 4, 3)]
    await settle()
    calls.release.set()
    assert await first == 10
    assert [await r for r in rest] == [20, 30, 40, 30]
    assert calls.batches == [[1], [2, 3, 4]]  # the repeated key is asked once


async def test_batches_are_cut_at_max_batch() -> None:
    calls = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(calls, max_batch=2, max_in_flight=1)
    results = await asyncio.gather(*(coalescer.submit(k) for k in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert all(len(batch) <= 2 for batch in calls.batches)
    assert sorted(k for batch in calls.batches for k in batch) == list(range(5))


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    calls = Recorder()
    calls.fail = TimeoutError("no answer")
    coalescer: Coalescer[int, int] = Coalescer(calls, max_batch=10, max_in_flight=1)
    outcomes = await asyncio.gather(
        *(coalescer.submit(k) for k in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, TimeoutError) for o in outcomes)


async def test_a_caller_that_stops_waiting_leaves_the_others_their_answer() -> None:
    calls = Recorder()
    calls.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(calls, max_batch=10, max_in_flight=1)
    busy = asyncio.ensure_future(coalescer.submit(0))  # keeps the next two waiting together
    await settle()
    impatient = asyncio.ensure_future(coalescer.submit(1))
    patient = asyncio.ensure_future(coalescer.submit(1))
    await settle()
    impatient.cancel()
    calls.release.set()
    assert await patient == 10
    assert await busy == 0
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert calls.batches == [[0], [1]]
    await coalescer.close()


async def test_only_a_full_batch_leaves_while_another_is_out() -> None:
    calls = Recorder()
    calls.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(calls, max_batch=3, max_in_flight=2)
    waiting = [asyncio.ensure_future(coalescer.submit(k)) for k in range(1)]
    await settle()
    waiting += [asyncio.ensure_future(coalescer.submit(k)) for k in (1, 2)]
    await settle()
    assert calls.batches == [[0]]  # two waiting: not a full batch, they wait for the first
    waiting += [asyncio.ensure_future(coalescer.submit(k)) for k in (3, 4, 5, 6)]
    await settle()
    assert calls.batches == [[0], [1, 2, 3]]  # a full batch goes; then the bound of two holds
    calls.release.set()
    assert [await w for w in waiting] == [k * 10 for k in range(7)]
    assert calls.batches[2:] == [[4, 5, 6]]
