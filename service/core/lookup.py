"""Finding a stored record, optionally waiting for the worker to write it."""

import asyncio
import time
from typing import NamedTuple

from service.core.ports import ExplanationStore
from service.core.records import DecisionRecord

FIRST_POLL_S = 0.01
MAX_POLL_S = 0.2


class Lookup(NamedTuple):
    record: DecisionRecord | None
    # From the first miss until the record was found or the wait ran out; 0 when none was.
    waited_s: float


async def wait_for_record(store: ExplanationStore, transaction_id: str, wait_s: float) -> Lookup:
    """The record, polling with growing intervals for up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    interval = FIRST_POLL_S
    first_miss: float | None = None
    while True:
        record = await store.get(transaction_id)
        now = time.monotonic()
        remaining = deadline - now
        if record is not None or remaining <= 0:
            return Lookup(record, 0.0 if first_miss is None else now - first_miss)
        if first_miss is None:
            first_miss = now
        await asyncio.sleep(min(interval, remaining))
        interval = min(interval * 2, MAX_POLL_S)
