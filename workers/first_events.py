"""The first event of a transaction id in the log is its decision; later ones are copies or
conflicts.

All events of an id share a Kafka key, hence a partition, hence one order that every worker
sees the same way. A worker remembers the ids it stored lately (bounded): an event of an id it
already stored, or met earlier in the same batch, is a copy when it carries the same request
and decision (skipped: rewriting it would add a second row with another `decided_at` to the
by-day table) and a conflict otherwise (dead-lettered, so it is seen, never stored over the
first). See docs/decision-path.md for when a copy can get past this memory.
"""

from collections import OrderedDict
from enum import Enum

from service.core.records import DecisionEvent

# (request hash, model version, margins): what makes two events the same decision.
Identity = tuple[str | None, str, tuple[float, ...]]


class Verdict(Enum):
    FIRST = "first"
    SAME = "same"
    CONFLICT = "conflict"


def identity(event: DecisionEvent) -> Identity:
    return (event.request_hash, event.model.version, tuple(event.prediction.margins))


class FirstEvents:
    """Ids stored lately with the identity of their first event; oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._stored: OrderedDict[str, Identity] = OrderedDict()

    def verdict(self, event: DecisionEvent, earlier_in_batch: dict[str, Identity]) -> Verdict:
        """Judge `event` against what was stored and what came before it in its batch."""
        txn = event.transaction_id
        first = earlier_in_batch.get(txn) or self._stored.get(txn)
        if first is None:
            earlier_in_batch[txn] = identity(event)
            return Verdict.FIRST
        return Verdict.SAME if first == identity(event) else Verdict.CONFLICT

    def stored(self, events: list[DecisionEvent]) -> None:
        """Remember events once their records are written."""
        for event in events:
            self._stored[event.transaction_id] = identity(event)
            self._stored.move_to_end(event.transaction_id)
        while len(self._stored) > self._capacity:
            self._stored.popitem(last=False)
