"""A gateway's memory of caller transaction ids: bounded, expiring, and merging concurrent ones."""

import asyncio

import pytest

from service.core.idempotency import Abandoned, RecentIds
from service.core.records import Claim


def claim(n: int, request_hash: str = "h") -> Claim:
    return Claim(transaction_id=f"txn-{n}", request_hash=request_hash, response=b"{}")


def test_remembers_until_expiry() -> None:
    now = [0.0]
    recent = RecentIds(capacity=10, ttl_s=5.0, clock=lambda: now[0])
    recent.remember(claim(1))
    assert recent.answered("txn-1") == claim(1)
    assert recent.answered("txn-2") is None
    now[0] = 5.0
    assert recent.answered("txn-1") is None


def test_forgets_the_oldest_beyond_capacity() -> None:
    recent = RecentIds(capacity=2, ttl_s=60.0)
    for n in range(3):
        recent.remember(claim(n))
    assert recent.answered("txn-0") is None
    assert recent.answered("txn-1") == claim(1)
    assert recent.answered("txn-2") == claim(2)


def test_capacity_zero_remembers_nothing() -> None:
    recent = RecentIds(capacity=0, ttl_s=60.0)
    recent.remember(claim(1))
    assert recent.answered("txn-1") is None


async def test_a_decision_under_way_is_shared_with_its_waiters() -> None:
    recent = RecentIds(capacity=10, ttl_s=60.0)
    assert recent.deciding("txn-1") is None
    recent.begin("txn-1")
    leader = recent.deciding("txn-1")
    assert leader is not None
    waiter = asyncio.ensure_future(asyncio.shield(leader))
    recent.finish("txn-1", claim(1), None)
    assert await waiter == claim(1)
    assert recent.deciding("txn-1") is None


async def test_waiters_see_the_failure_and_a_cancelled_decision_as_abandoned() -> None:
    recent = RecentIds(capacity=10, ttl_s=60.0)
    recent.begin("txn-1")
    failed = recent.deciding("txn-1")
    assert failed is not None
    recent.finish("txn-1", None, ValueError("store away"))
    with pytest.raises(ValueError, match="store away"):
        await failed

    recent.begin("txn-2")
    cancelled = recent.deciding("txn-2")
    assert cancelled is not None
    recent.finish("txn-2", None, asyncio.CancelledError())
    with pytest.raises(Abandoned):
        await cancelled
