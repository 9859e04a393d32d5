"""How old a worker's backlog is: the oldest event on its partitions not yet in the store.

Kept apart from the consumer so the bookkeeping can be tested without a broker.
"""

import time
from collections.abc import Callable, Iterable, Mapping

from aiokafka import TopicPartition


class OldestUnwritten:
    """Per assigned partition, the Kafka timestamp (ms) of the oldest event not yet written.

    Exact for a partition with a batch in flight: the batch's first record (everything before it
    is written). Once a batch is written, a partition that was still behind keeps the batch's
    newest timestamp, which the next event's own (unknown until fetched) is at or after: its age
    is over-stated by at most the gap between two consecutive events, until it is fetched. A
    partition never fetched is not counted, as in the lag in events.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._oldest_ms: dict[TopicPartition, int] = {}

    def fetched(self, first_ms: Mapping[TopicPartition, int]) -> None:
        """A batch was handed out; `first_ms` is each partition's first record timestamp."""
        self._oldest_ms.update(first_ms)

    def caught_up(self, partitions: Iterable[TopicPartition]) -> None:
        """Nothing is left to read or write on `partitions`."""
        for tp in partitions:
            self._oldest_ms.pop(tp, None)

    def written(self, newest_ms: Mapping[TopicPartition, int], behind: set[TopicPartition]) -> None:
        """The batch is in the store; `newest_ms` is each partition's last record timestamp."""
        for tp, newest in newest_ms.items():
            if tp in behind:
                self._oldest_ms[tp] = newest
            else:
                self._oldest_ms.pop(tp, None)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """The partitions are no longer this member's (revoked)."""
        self.caught_up(partitions)

    def clear(self) -> None:
        """The consumer stopped: it owns no backlog any more."""
        self._oldest_ms.clear()

    def age_s(self) -> float:
        """Seconds since the oldest unwritten event was produced; 0 when there is none."""
        if not self._oldest_ms:
            return 0.0
        # Producer clocks may run ahead of ours: never a negative age.
        return max(0.0, self._clock() - min(self._oldest_ms.values()) / 1000)
