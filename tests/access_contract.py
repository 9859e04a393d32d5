"""One behaviour for every `AccessStore`: the SQLite and the Cassandra tests both run these."""

import random
import uuid
from datetime import UTC, datetime, timedelta

from service.core.access import AccessEntry, Action, Scope, hash_key, new_api_key
from service.core.ports import AccessStore


def a_quiet_day() -> datetime:
    """Midnight of a random past UTC day, well within retention (which counts from the entry).

    The stores under test keep entries 400 days (tests/integration/test_access_cassandra.py):
    an entry older than that is written with a TTL of 1 s and may be gone before it is read.
    """
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=random.randrange(30, 300))


async def check_keys(access: AccessStore) -> None:
    name = f"contract-{uuid.uuid4().hex[:8]}"
    created = datetime(2024, 5, 6, 7, 8, 9, 123_000, tzinfo=UTC)
    key, record = new_api_key(name, frozenset({Scope.PREDICT, Scope.AUDIT_EXPORT}), created)
    assert await access.get_key(record.key_hash) is None
    await access.put_key(record)
    assert await access.get_key(hash_key(key)) == record
    assert record in await access.keys()
    await access.delete_key(record.key_hash)
    assert await access.get_key(record.key_hash) is None
    assert record not in await access.keys()


async def check_entries(access: AccessStore) -> list[AccessEntry]:
    """Entries over two UTC days come back in time order, within [start, end), up to a limit."""
    day = a_quiet_day()
    run = uuid.uuid4().hex[:8]
    moments = [day - timedelta(milliseconds=1), day, day + timedelta(hours=23, minutes=59)]
    moments += [day + timedelta(days=1, milliseconds=n) for n in (0, 0, 5)]
    written = [
        AccessEntry(at, f"reader-{run}", Action.EXPLANATION_READ, f"txn-{run}-{n}")
        for n, at in enumerate(moments)
    ]
    for entry in reversed(written):
        await access.record(entry)

    def mine(entries: list[AccessEntry]) -> list[AccessEntry]:
        # Other runs sharing a Cassandra keyspace may have picked the same day.
        return [e for e in entries if e.key_name == f"reader-{run}"]

    found = mine(await access.entries(day, day + timedelta(days=2), 100))
    targets = [e.target for e in found]
    # Entries 3 and 4 share a millisecond: their order is the store's (by entry id).
    assert targets[:2] + sorted(targets[2:4]) + targets[4:] == [e.target for e in written[1:]]
    assert found == sorted(found, key=lambda e: e.at)
    assert [(e.at, e.key_name, e.action) for e in found] == [
        (e.at, e.key_name, e.action) for e in written[1:]
    ]
    assert mine(await access.entries(day, day + timedelta(days=1), 100)) == found[:2]
    assert len(await access.entries(day, day + timedelta(days=2), 3)) == 3
    assert await access.entries(day, day, 100) == []
    await check_many(access)
    return written


async def check_many(access: AccessStore) -> None:
    """`record_many` stores every entry of a batch (more than one request's worth, over two
    days), as `record` would one by one; an empty batch is nothing."""
    day = a_quiet_day()
    name = f"refused-{uuid.uuid4().hex[:8]}"
    written = [
        AccessEntry(
            day + timedelta(hours=23, minutes=59, seconds=n),
            name,
            Action.DENIED_UNAUTHENTICATED,
            f"POST /v1/predictions from 192.0.2.{n} (unknown key): {n + 1} attempts in 0.9 s",
        )
        for n in range(150)
    ]
    await access.record_many(written)
    await access.record_many([])
    found = await access.entries(day, day + timedelta(days=2), 1_000)
    assert [e for e in found if e.key_name == name] == written
