"""Finding a stored record, optionally waiting for the worker to write it."""

import asyncio
import time

from service.core.records import DecisionRecord
from service.ports import ExplanationStore

FIRST_POLL_S = 0.01
MAX_POLL_S = 0.2


async def wait_for_record(
    store: ExplanationStore, transaction_id: str, wait_s: float
) -> DecisionRecord | None:
    """The record, polling with growing intervals for up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    interval = FIRST_POLL_S
    while True:
        record = await store.get(transaction_id)
        remaining = deadline - time.monotonic()
        if record is not None or remaining <= 0:
            return record
        await asyncio.sleep(min(interval, remaining))
        interval = min(interval * 2, MAX_POLL_S)
