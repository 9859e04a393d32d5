"""How a worker process is doing, for its probes: the worker writes it, the HTTP endpoints read it.

Liveness is progress of the consume loop: a restart is the remedy for a loop wedged in a call
that never returns. Readiness is whether the worker can do its job now: in its consumer group,
and no step failing. A failing store is not the worker's fault and a restart would not fix it
(it would only move its partitions around), so that makes the worker unready, never unhealthy:
the loop keeps progressing through its retries.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """A probe's answer: `ok`, and a JSON-ready body saying what is wrong when it is not."""

    ok: bool
    body: dict[str, Any]


@dataclass(frozen=True)
class _Failing:
    step: str
    dependency: str
    hint: str
    since: float
    attempts: int
    error: str


class WorkerHealth:
    """Heartbeat of the consume loop, state of the consumer, and the step being retried, if any.

    Times come from `clock` (monotonic seconds), so tests can drive it.
    """

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._stall_after_s = stall_after_s
        self._clock = clock
        # Start-up counts as progress: joining Kafka and Cassandra gets the same bound as a batch.
        self._last_progress = clock()
        self._consumer = "not started"
        self._in_group: Callable[[], bool] = lambda: False
        self._failing: _Failing | None = None

    # ------------------------------------------------------------ written by the worker

    def progressed(self) -> None:
        """One iteration of the consume loop completed (a batch, an empty poll, an attempt)."""
        self._last_progress = self._clock()

    def consumer_started(self, in_group: Callable[[], bool]) -> None:
        """The consumer is started; `in_group` says whether it is a member of its group now."""
        self._consumer = "started"
        self._in_group = in_group

    def consumer_stopped(self) -> None:
        self._consumer = "stopped"

    def step_failed(self, step: str, dependency: str, hint: str, error: BaseException) -> None:
        """An attempt at `step` failed; it will be retried. Also counts as progress."""
        now = self._clock()
        previous = self._failing
        if previous is not None and previous.step == step:
            since, attempts = previous.since, previous.attempts + 1
        else:
            since, attempts = now, 1
        # The type only: the message may name hosts or internals, and the log has it anyway.
        error_type = type(error).__name__
        self._failing = _Failing(step, dependency, hint, since, attempts, error_type)
        self._last_progress = now

    def step_succeeded(self) -> None:
        """The step being run (or retried) succeeded. Also counts as progress."""
        self._failing = None
        self._last_progress = self._clock()

    # ------------------------------------------------------------ read by the probes

    def seconds_since_progress(self) -> float:
        return max(0.0, self._clock() - self._last_progress)

    def liveness(self) -> Verdict:
        """Alive while the consume loop completed an iteration within `stall_after_s`."""
        idle = self.seconds_since_progress()
        facts = {"seconds_since_progress": round(idle, 3), "stall_after_s": self._stall_after_s}
        if idle <= self._stall_after_s:
            return Verdict(True, {"status": "alive", **facts})
        detail = (
            f"the consume loop has made no progress for {idle:.1f} s (limit "
            f"{self._stall_after_s:g} s, SHAPSTREAM_WORKER_STALL_AFTER_S), as if stuck in a call "
            "that does not return; restart the process (its uncommitted batch is redelivered)"
        )
        return Verdict(False, {"status": "stalled", "detail": detail, **facts})

    def readiness(self) -> Verdict:
        """Ready while the consumer is in its group and no step is being retried."""
        problems: list[dict[str, Any]] = []
        if self._consumer != "started":
            problems.append({"check": "consumer", "detail": f"the consumer is {self._consumer}"})
        elif not self._in_group():
            problems.append(
                {
                    "check": "consumer",
                    "detail": "the consumer is not a member of its group (joining or rebalancing)",
                }
            )
        failing = self._failing
        if failing is not None:
            for_s = max(0.0, self._clock() - failing.since)
            problems.append(
                {
                    "check": failing.dependency,
                    "step": failing.step,
                    "detail": (
                        f"{failing.step} is failing ({failing.attempts} attempts over {for_s:.1f} "
                        f"s, last error {failing.error}) and is being retried; nothing is "
                        f"committed until it succeeds: {failing.hint}"
                    ),
                    "attempts": failing.attempts,
                    "failing_for_s": round(for_s, 3),
                    "error": failing.error,
                }
            )
        if problems:
            return Verdict(False, {"status": "not ready", "problems": problems})
        return Verdict(True, {"status": "ready"})
