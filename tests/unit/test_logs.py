"""Client libraries' repeated errors during an outage are logged once in a while, not each time."""

import logging

from service.logs import FirstOfRepeats


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_the_same_message_passes_once_per_period() -> None:
    now = [0.0]
    repeats = FirstOfRepeats(every_s=30.0, clock=lambda: now[0])
    assert repeats.filter(record("aiokafka", "Unable connect to %s", "node 1"))
    # The same template with other arguments is a repeat too.
    assert not repeats.filter(record("aiokafka", "Unable connect to %s", "node 2"))
    assert repeats.filter(record("aiokafka", "Another message"))
    assert repeats.filter(record("cassandra.cluster", "Unable connect to %s", "node 1"))
    now[0] = 30.0
    assert repeats.filter(record("aiokafka", "Unable connect to %s", "node 1"))
