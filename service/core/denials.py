"""Refused attempts (401, 403, a 404 on an explanation) in the access log, off the request path.

A refusal is noted in memory (a dict update, no I/O) and the request is answered at once; a
background task writes what was noted once per window (FLUSH_INTERVAL_S), in one store call.
Attempts alike (same action, key name, request and client) within a window are one entry with
their count, so a flood of bad keys costs one batch a second, not a write per request:

- at most MAX_ITEMIZED entries a window name their request;
- past that, attempts are counted per action, key name and client (another MAX_BY_CLIENT);
- past that, per action only: the entry says how many attempts were not itemized.

A window writes at most MAX_ITEMIZED + MAX_BY_CLIENT + len(Action) entries, whatever the
load. A successful request never reaches this module. A write that fails is logged and its
counts are merged into the next window (within the same bounds), never retried in a loop.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from prometheus_client import Counter

from service.core.access import AccessEntry, Action, to_millis
from service.core.ports import AccessStore

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S: Final = 1.0
# A window's write waits this long at most; a store that does not answer costs a log line.
FLUSH_TIMEOUT_S: Final = 5.0
MAX_ITEMIZED: Final = 64
MAX_BY_CLIENT: Final = 32
# A path in an entry is cut to this length (an unknown route's path is the caller's text).
MAX_PATH: Final = 200


@dataclass(frozen=True, slots=True)
class Attempt:
    """What was tried: `request` as "METHOD /path", the client's address, why it was refused."""

    action: Action
    key_name: str
    request: str
    client: str
    reason: str = ""

    def target(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.request} from {self.client}{why}"


def request_line(method: str, path: str) -> str:
    """`METHOD /path` for an entry, the path cut to MAX_PATH characters."""
    return f"{method} {path if len(path) <= MAX_PATH else path[:MAX_PATH] + '...'}"


@dataclass(slots=True)
class _Tally:
    """Attempts counted under one entry, and the keys of its level and those below it."""

    first_at: float
    last_at: float
    count: int
    keys: tuple["_Key", ...]

    def merge(self, other: "_Tally") -> None:
        self.first_at = min(self.first_at, other.first_at)
        self.last_at = max(self.last_at, other.last_at)
        self.count += other.count


# (action, key name, target): one entry of the access log.
_Key = tuple[Action, str, str]
# Entries per level and window: itemized, by client; by action is bounded by `Action` itself.
_BOUNDS: Final = (MAX_ITEMIZED, MAX_BY_CLIENT)
ANY_KEY: Final = "(any)"


def _keys(attempt: Attempt) -> tuple[_Key, _Key, _Key]:
    """The entry an attempt is counted under at each level: itemized, by client, by action."""
    return (
        (attempt.action, attempt.key_name, attempt.target()),
        (attempt.action, attempt.key_name, f"requests not itemized, from {attempt.client}"),
        (attempt.action, ANY_KEY, "requests not itemized"),
    )


class DenialLog:
    """Notes refused attempts and writes them to `store` in bounded batches (see the module)."""

    def __init__(
        self,
        store: AccessStore,
        counter: Counter | None = None,
        interval_s: float = FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._counter = counter
        self._interval_s = interval_s
        self._clock = clock
        self._levels: tuple[dict[_Key, _Tally], ...] = ({}, {}, {})
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Store calls made: one per window that noted something.
        self.writes = 0

    def note(self, attempt: Attempt) -> None:
        """Count a refused attempt; written within about FLUSH_INTERVAL_S. No I/O, no await."""
        now = self._clock()
        keys = _keys(attempt)
        self._add(_Tally(now, now, 1, keys))
        if self._counter is not None:
            self._counter.labels(action=attempt.action.value).inc()
        if not self._wake.is_set():
            self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="denial-log")

    @property
    def pending(self) -> int:
        """Entries waiting for the next write."""
        return sum(map(len, self._levels))

    async def flush(self) -> None:
        """Write what was noted so far now (at shutdown, and for tests)."""
        taken = [tally for level in self._levels for tally in level.values()]
        self._levels = ({}, {}, {})
        if not taken:
            return
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await self._store.record_many([_entry(tally) for tally in taken])
            self.writes += 1
        # A background write: whatever failed, the requests were answered long ago. The counts
        # go back into the next window (bounded as any window) and the failure is logged.
        except Exception:
            log.exception("could not record %d refused attempts in the access log", len(taken))
            for tally in taken:
                self._add(tally)

    async def close(self) -> None:
        """Write what is left and stop the background task."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            # The window: attempts noted meanwhile join this write.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            self._wake.clear()
            await self.flush()

    def _add(self, tally: _Tally) -> None:
        """Count under the tally's own entry if there is room, else one level down."""
        while True:
            level = len(self._levels) - len(tally.keys)
            table, key = self._levels[level], tally.keys[0]
            kept = table.get(key)
            if kept is not None:
                kept.merge(tally)
                return
            if level >= len(_BOUNDS) or len(table) < _BOUNDS[level]:
                table[key] = tally
                return
            tally.keys = tally.keys[1:]


def _entry(tally: _Tally) -> AccessEntry:
    action, key_name, target = tally.keys[0]
    if tally.count > 1:
        span = tally.last_at - tally.first_at
        target = f"{target}: {tally.count} attempts in {span:.1f} s"
    at = to_millis(datetime.fromtimestamp(tally.first_at, UTC))
    return AccessEntry(at=at, key_name=key_name, action=action, target=target)
