"""Logging set-up for the processes the CLI starts (never at import)."""

import logging
import os
import time
from collections.abc import Callable

# While Kafka or Cassandra is away, their clients log the same error for every reconnect
# attempt: ~1,400 lines in 20 s of a Kafka outage here. One line per message every this many
# seconds says as much; our own code logs the outage (and its end) once.
REPEAT_EVERY_S = 30.0


class FirstOfRepeats(logging.Filter):
    """Passes a record unless the same logger logged the same message template lately."""

    def __init__(
        self, every_s: float = REPEAT_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._every_s = every_s
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()  # bounded: a flood of distinct messages starts over
        self._last[key] = now
        return True


def configure_logging() -> None:
    """One line per record on stderr; level from SHAPSTREAM_LOG_LEVEL (default INFO)."""
    logging.basicConfig(
        level=os.environ.get("SHAPSTREAM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The Cassandra driver and aiokafka are chatty at INFO, and repeat themselves in outages.
    repeats = FirstOfRepeats()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_only_for(("cassandra", "aiokafka"), repeats))
    for noisy in ("cassandra", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _only_for(prefixes: tuple[str, ...], inner: logging.Filter) -> logging.Filter:
    """`inner`, applied to records of loggers under `prefixes` only."""

    class Scoped(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.name.split(".", 1)[0] not in prefixes:
                return True
            return inner.filter(record)

    return Scoped()
